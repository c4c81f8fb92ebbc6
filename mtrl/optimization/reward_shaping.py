"""Shaping of the sequence scores on the controller, between the reward function and the advantages."""

import torch


def overlong_penalty(response_lengths: torch.Tensor, max_response_length: int, buffer_length: int,
                     penalty_factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, section 3.4): the ``(batch,)``
    penalties ``-min(1, max(0, l - (L - B)) / B) * penalty_factor`` to add to the scores, for responses of
    ``response_lengths`` l, maximum length ``L = max_response_length`` and buffer ``B = buffer_length``.

    A response within ``L - B`` tokens is not penalised; inside the buffer the penalty grows linearly to
    ``penalty_factor`` at ``L`` (a response cut at the limit). ``B = 0`` turns the shaping off (all zeros).
    Same numbers as verl's DAPO reward manager (``reward_model.overlong_buffer``).
    """
    if buffer_length == 0:
        return torch.zeros(response_lengths.shape, dtype=torch.float32)
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(f"the overlong buffer must lie in (0, max_response_length = {max_response_length}], "
                         f"got {buffer_length}")
    excess = (response_lengths.float() - (max_response_length - buffer_length)).clamp(min=0)
    return -torch.clamp(excess / buffer_length, max=1.0) * penalty_factor
