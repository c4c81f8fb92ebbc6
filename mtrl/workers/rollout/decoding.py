"""The `hf` engine's decode loop: the model's own forward over a `DynamicCache`, with less work than `generate`.

What `generate(do_sample=False, logits_processor=...)` computes, token for token, with less work done for the
same result:
- the prompts are prefilled once each, with their images and videos, and the cache is copied for each of the
  prompt's responses (`copies`), instead of prefilling every response row;
- rows that have emitted an EOS leave the forward's batch (`generate` keeps computing them until every row
  has finished);
- the key/value cache is allocated once for the whole generation and each step writes its token in place
  (`DynamicCache` concatenates, copying the whole cache at every step: ~20% of a decode step of an 18M model).

The logits processors see the whole batch at every step, as in `generate` (a finished row keeps its last
scores, and its token is the pad id whatever they pick), so per-row recorders such as `SampledTokenLogProbs`
plug in unchanged. Positions are the prompt's own `position_ids` (the collate layout's, equal to what the
model computes itself); a generated token takes the row's largest prompt position plus one per step, in all
three rows for multimodal RoPE, which is what transformers' `rope_deltas` add up to.
"""

from typing import Callable, Dict, Sequence

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mtrl.models.packing import model_position_ids


# A finished row leaves the forward's batch once this share of the batch has finished: each drop copies the
# cache of the rows that stay, each finished row kept costs a row of every forward until then.
DROP_FINISHED_SHARE = 0.25


class InPlaceLayer(DynamicLayer):
    """A cache layer whose keys and values are views of buffers `capacity` tokens long, written in place."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._buffers = [s.new_empty(*s.shape[:2], self.capacity, s.shape[3]) for s in (key_states, value_states)]
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        for buffer, states in zip(self._buffers, (key_states, value_states)):
            buffer[:, :, start:end] = states
        self.keys, self.values = (buffer[:, :, :end] for buffer in self._buffers)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        end = self.get_seq_length()
        self._buffers = [buffer[indices] for buffer in self._buffers]
        self.keys, self.values = (buffer[:, :, :end] for buffer in self._buffers)


def in_place_cache(model: nn.Module, capacity: int) -> DynamicCache:
    """The model's `DynamicCache` with each plain (full-attention) layer made an `InPlaceLayer`."""
    cache = DynamicCache(config=model.config)
    cache.layers = [InPlaceLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
           vision: Dict[str, torch.Tensor], copies: torch.Tensor,
           processors: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
           eos_token_ids: Sequence[int], pad_token_id: int, max_new_tokens: int) -> torch.Tensor:
    """(sum(copies), G) generated ids, G <= `max_new_tokens`: `copies[i]` responses to prompt row i, in order.

    `input_ids`, `attention_mask` (P, L) left-padded prompts, `position_ids` (P, L) or (P, 3, L) as the collate
    layout has them, `vision` the model's vision inputs of those P prompts (with `mm_token_type_ids`).
    `processors` (logits processors, called in order as `LogitsProcessorList` does, without its per-call
    signature inspection) turn a step's (rows, V) float32 logits into the scores whose argmax is the token.
    Stops when every row has emitted one of `eos_token_ids`, after which a row holds `pad_token_id`.
    """
    device = input_ids.device
    rows = torch.arange(len(input_ids), device=device).repeat_interleave(copies.to(device))
    cache = in_place_cache(model, input_ids.shape[1] + max_new_tokens)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=model_position_ids(position_ids),
                past_key_values=cache, use_cache=True, logits_to_keep=1, **vision)
    cache.batch_select_indices(rows)  # one copy of the prompt's cache per response
    scores = out.logits[rows, -1].float()
    del out
    sequences, mask = input_ids[rows], attention_mask[rows]
    next_position = position_ids.flatten(1).amax(-1)[rows] + 1  # the first generated token's position
    multimodal_rope = position_ids.dim() == 3
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    active = torch.arange(len(rows), device=device)  # the rows of the forward's batch, by row number
    for step in range(max_new_tokens):
        step_scores = scores
        for processor in processors:
            step_scores = processor(sequences, step_scores)
        tokens = step_scores.argmax(-1).masked_fill(finished, pad_token_id)
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        finished |= torch.isin(tokens, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        keep = ~finished[active]
        if len(active) - int(keep.sum()) >= max(1, DROP_FINISHED_SHARE * len(active)):
            kept = keep.nonzero().squeeze(-1)
            active, mask, next_position = active[kept], mask[kept], next_position[kept]
            cache.batch_select_indices(kept)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        positions = (next_position + step)[:, None]
        if multimodal_rope:
            positions = positions[None].expand(3, -1, -1)
        logits = model(input_ids=tokens[active, None], attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True).logits
        scores = scores.index_copy(0, active, logits[:, -1].float())
    return sequences[:, input_ids.shape[1]:]
