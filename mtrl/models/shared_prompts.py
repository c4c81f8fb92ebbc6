"""Forward passes that run each distinct prompt of a micro-batch once (GRPO groups share their prompt).

A rollout holds every prompt G times, once per sampled response. :func:`forward_micro_batch` runs all
B = P x G rows, prompt and images included; here each distinct prompt (and its images) runs once and
its key/value cache is copied to its responses, which then run on their own:

    stage 1  prompts (P', Lp), left-padded       -> KV cache per layer, logits of the last prompt token
    stage 2  responses (B, R') on the copied KV  -> logits of every response position but the last

Same outputs as :func:`forward_micro_batch` (within float rounding), gradients included: the copies
are an index into the stage-1 keys/values, so each response's gradient flows back into its prompt.
Work drops from sum(Lp + R) tokens to P' x Lp + B x R' (R' the micro-batch's longest response),
and the vision tower encodes P' instead of B images.

The caches of both stages are functional (a layer's call returns the same keys and values however
often it runs), so activation checkpointing, which runs each layer again in the backward pass, works
too once :func:`keep_cache_under_checkpointing` has been applied. :func:`shared_prompt_plan` decides, per
micro-batch, whether sharing applies and saves work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mtrl.models.packing import head_outputs, model_position_ids, response_targets, scatter_response, vision_kwargs

__all__ = ["SharedPrompts", "can_share_prompts", "keep_cache_under_checkpointing", "prompt_groups",
           "shared_prompt_plan", "forward_shared_prompts"]

# The shared forward is two model calls instead of one: take it only when it computes clearly fewer tokens.
MIN_TOKEN_SAVING = 0.8


@dataclass
class SharedPrompts:
    """`first_rows` (P',): a row holding each distinct prompt; `group` (B,): the distinct prompt of each row;
    `prompt_start`: first column any prompt occupies; `response_width`: columns up to the longest response."""

    first_rows: torch.Tensor
    group: torch.Tensor
    prompt_start: int
    response_width: int


class _PromptLayer(DynamicLayer):
    """Stage 1: the prompt's keys and values as computed; a recomputed layer replaces them with equal ones
    (a `DynamicLayer` would append them)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _ResponseLayer(DynamicLayer):
    """Stage 2: each response's copy of its prompt's keys and values in front of its own, never stored."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)


def can_share_prompts(model: torch.nn.Module) -> bool:
    """Whether every layer's cache is plain keys and values (not sliding-window or linear attention)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def keep_cache_under_checkpointing(model: torch.nn.Module) -> None:
    """Let checkpointed decoder layers take a cache in training: transformers drops it there because a
    `DynamicLayer` would append the recomputed keys again, which the functional layers above do not."""
    for module in model.modules():
        if hasattr(module, "_can_checkpoint_with_cache"):
            module._can_checkpoint_with_cache = True


def _same_vision(a: Optional[dict], b: Optional[dict]) -> bool:
    a, b = a or {}, b or {}
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def prompt_groups(micro_batch: Dict[str, torch.Tensor], multi_modal_inputs: Optional[List[dict]],
                  response_length: int) -> Tuple[List[int], List[int]]:
    """(first_rows, group): a row holding each distinct prompt, and each row's distinct prompt. Rows share a
    prompt when their prompt token ids, attention mask and vision inputs are all equal."""
    input_ids, attention_mask = micro_batch["input_ids"], micro_batch["attention_mask"]
    prompt_len = input_ids.shape[1] - response_length
    keys = torch.cat([input_ids[:, :prompt_len], attention_mask[:, :prompt_len].to(input_ids.dtype)], 1)
    first_rows: List[int] = []
    group: List[int] = []
    by_prompt: Dict[bytes, List[int]] = {}
    for row in range(len(input_ids)):
        candidates = by_prompt.setdefault(keys[row].cpu().numpy().tobytes(), [])
        for g in candidates:
            if multi_modal_inputs is None or _same_vision(multi_modal_inputs[first_rows[g]], multi_modal_inputs[row]):
                group.append(g)
                break
        else:
            candidates.append(len(first_rows))
            group.append(len(first_rows))
            first_rows.append(row)
    return first_rows, group


def shared_prompt_plan(micro_batch: Dict[str, torch.Tensor], multi_modal_inputs: Optional[List[dict]],
                       response_length: int, padding_free: bool) -> Optional[SharedPrompts]:
    """How the rows share prompts, or None when sharing would not save work: the two stages' positions
    (padding included) against the padding-free forward's real tokens, or the padded batch's B x L."""
    first_rows, group = prompt_groups(micro_batch, multi_modal_inputs, response_length)
    attention_mask = micro_batch["attention_mask"]
    batch_size, seq_len = attention_mask.shape
    if len(first_rows) == batch_size:
        return None
    prompt_len = seq_len - response_length
    prompt_start = int(attention_mask[first_rows, :prompt_len].bool().any(0).int().argmax())
    response_width = int(attention_mask[:, prompt_len:].sum(-1).max())
    if response_width < 2:
        return None  # one-token responses: the prompts alone give every log-prob, at no saving
    shared = len(first_rows) * (prompt_len - prompt_start) + batch_size * response_width
    plain = int(attention_mask.sum()) if padding_free else batch_size * seq_len
    if shared > MIN_TOKEN_SAVING * plain:
        return None
    return SharedPrompts(torch.tensor(first_rows), torch.tensor(group), prompt_start, response_width)


def forward_shared_prompts(model: torch.nn.Module, micro_batch: Dict[str, torch.Tensor],
                           multi_modal_inputs: Optional[List[dict]], response_length: int, plan: SharedPrompts,
                           temperature: float = 1.0, return_entropy: bool = False, return_logits: bool = False,
                           entropy_grad: bool = False) -> Dict[str, torch.Tensor]:
    """:func:`mtrl.models.packing.forward_micro_batch`'s policy outputs (``log_probs`` (B, R) [+ ``entropy``,
    ``logits``]), each distinct prompt run once (`plan` from :func:`shared_prompt_plan`)."""
    input_ids, attention_mask = micro_batch["input_ids"], micro_batch["attention_mask"]
    position_ids = micro_batch.get("position_ids")
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    valid = response_targets(attention_mask, response_length)  # (B, R)
    prompt_end = input_ids.shape[1] - response_length
    response_end = prompt_end + plan.response_width
    first, group = plan.first_rows.to(input_ids.device), plan.group.to(input_ids.device)

    # Stage 1: the distinct prompts, with their images; the last position predicts the first response token.
    # (The layers use `past_key_values` whatever `use_cache` says; False only stops transformers returning it
    # and warning about it under activation checkpointing.)
    prompt_ids = input_ids[first, plan.prompt_start:prompt_end]
    prompt_mask = attention_mask[first, plan.prompt_start:prompt_end]
    cache = DynamicCache(config=model.config)
    cache.layers = [_PromptLayer() for _ in cache.layers]
    vision = None if multi_modal_inputs is None else [multi_modal_inputs[int(i)] for i in plan.first_rows]
    first_logits = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=model_position_ids(position_ids[first, ..., plan.prompt_start:prompt_end]),
                         past_key_values=cache, use_cache=False, logits_to_keep=1,
                         **vision_kwargs(model, vision, prompt_ids)).logits[:, -1]  # (P', V)

    # Stage 2: every response on its prompt's cache; position c predicts response token c + 1.
    rows, cols = torch.nonzero(valid, as_tuple=True)
    # A new cache object: a recomputed stage-1 layer (activation checkpointing) still finds its _PromptLayer.
    copies = DynamicCache(config=model.config)
    copies.layers = [_ResponseLayer(layer.keys[group], layer.values[group]) for layer in cache.layers]
    response_ids = input_ids[:, prompt_end:response_end - 1]
    mask = torch.cat([prompt_mask[group], attention_mask[:, prompt_end:response_end - 1]], 1)
    logits = model(input_ids=response_ids, attention_mask=mask,
                   position_ids=model_position_ids(position_ids[..., prompt_end:response_end - 1]),
                   past_key_values=copies, use_cache=False).logits  # (B, R' - 1, V)
    later = cols > 0
    picks = [first_logits[group[rows[~later]]], logits[rows[later], cols[later] - 1]]
    # Back to the (rows, cols) order of `valid`: the col-0 picks first, then the others.
    order = torch.cat([torch.nonzero(~later).squeeze(-1), torch.nonzero(later).squeeze(-1)])
    logits = torch.cat(picks)[torch.argsort(order)]
    labels = input_ids[:, prompt_end:][rows, cols]
    outputs = head_outputs(logits, labels, temperature, return_entropy, return_logits, entropy_grad)
    return {key: scatter_response(value, valid) for key, value in outputs.items()}
