"""Turning per-sample rewards into logged metrics and into token-level scores."""

from typing import Dict, List, Sequence, Union

import numpy as np
import torch

COUNTED_METRICS = ("errors",)


def reward_metrics(scores: Union[torch.Tensor, Sequence[float]],
                   metrics: Dict[str, List[float]]) -> Dict[str, float]:
    """Batch means for logging: `{"reward/overall": mean(scores), "reward/<name>": mean(values), ...}`.

    `errors` (1.0 per sample scored 0 by worker.reward.on_error=zero) is summed: `reward/errors` is a count.
    An empty batch gives `{}` (there is nothing to average, and NaN would poison running means).
    """
    scores = scores.detach().float().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, float)
    if scores.size == 0:
        return {}
    out = {"reward/overall": float(scores.mean())}
    for name, values in metrics.items():
        values = np.asarray(values, dtype=float)
        out[f"reward/{name}"] = float(values.sum() if name in COUNTED_METRICS else values.mean())
    return out


def token_level_scores(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence scores -> (B, R) float tensor, each score on the row's last valid response token.

    "Last valid" is the last position where `response_mask` is 1 (the EOS token, or the last token of a
    truncated response); everything else is 0. A row with no valid token is an error: its reward
    would silently vanish, and the rollout always produces at least one token.
    """
    if scores.dim() != 1 or response_mask.dim() != 2 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(f"token_level_scores: expected scores (B,) and response_mask (B, R); got "
                         f"{tuple(scores.shape)} and {tuple(response_mask.shape)}.")
    valid = response_mask.bool()
    empty = (~valid.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"token_level_scores: response_mask has no valid token in row(s) {empty}.")
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    # Largest position holding a 1: works for right padding and for holes inside the mask alike.
    last = torch.where(valid, positions, -1).max(dim=-1).values
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    out[torch.arange(out.shape[0], device=out.device), last] = scores.to(out.device, torch.float32)
    return out
