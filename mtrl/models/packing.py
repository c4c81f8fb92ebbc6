"""Padding-free ("packed") forward passes and the one forward function the agents use.

Batches follow ``docs/DATA_LAYOUT.md``: ``input_ids`` (B, L) = left-padded prompt + right-padded
response, ``attention_mask`` (B, L), ``position_ids`` (B, L) for text models or (B, D, L) for Qwen-VL
mRoPE (D = 3, or 4 with a leading text-position row). Padding-free mode removes every padding token
and concatenates the B sequences into one row:

    padded (B=2, L=5)          packed (1, T=7)             cu_seqlens
    [p p a a a]                [a a a b b b b]             [0, 3, 7]
    [p b b b b]

so the model spends no FLOPs on padding. The attention kernel learns the sequence boundaries from
``cu_seqlens`` (see :mod:`mtrl.models.attention`; the model must have been switched with
``enable_padding_free_attention``). Outputs are scattered back to (B, L, ...) with :func:`unpack`.

Position ids of the packed row (what the models in transformers 5 expect):

* text models (qwen2, ...): (1, T) -- each sequence's own positions, restarting at 0;
* Qwen2-VL / Qwen2.5-VL / Qwen3-VL: (D, 1, T) -- the per-sample (D, L_i) mRoPE ids concatenated
  along the length. D = 3 (t, h, w) or D = 4 (text row first, then t, h, w); both work.
  :func:`forward_micro_batch` always sends 4 rows (it prepends the text row to 3-row ids), so the
  attention can also find the sequence boundaries from the text positions.

Public API: :class:`PackedInputs`, :func:`pack_padded`, :func:`unpack`,
:func:`model_position_ids`, :func:`forward_micro_batch`, and the pieces
:mod:`mtrl.models.shared_prompts` builds on: :func:`response_targets`, :func:`vision_kwargs`,
:func:`head_outputs`, :func:`scatter_response`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from mtrl.models.attention import CU_SEQLENS_KWARG, MAX_SEQLEN_KWARG, padding_free_attention_enabled
from mtrl.models.multimodal import batch_multimodal_inputs, is_vision_config, mm_token_type_ids

__all__ = ["PackedInputs", "pack_padded", "unpack", "model_position_ids", "forward_micro_batch", "response_targets",
           "vision_kwargs", "head_outputs", "scatter_response"]


# ----------------------------------------------------------------------------------------------
# Packing / unpacking
# ----------------------------------------------------------------------------------------------
@dataclass
class PackedInputs:
    """Real tokens of a padded batch concatenated into one row.

    Attributes:
        input_ids: (1, T) token ids of all real tokens, row after row.
        position_ids: (1, T) for text models, (D, 1, T) for mRoPE models -- the layout the model's
            ``forward(position_ids=...)`` takes.
        cu_seqlens: (B + 1,) int32 cumulative sequence lengths (``cu_seqlens[i]`` = start of row i).
        max_seqlen: length of the longest sequence (python int; flash-attn wants it on the host).
        indices: (T,) int64 positions of the real tokens in the flattened (B * L) padded batch.
        batch_size, seq_len: B and L of the padded batch, for :func:`unpack`.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    indices: torch.Tensor
    batch_size: int
    seq_len: int

    @property
    def total_tokens(self) -> int:
        return int(self.indices.numel())

    def attention_kwargs(self) -> Dict[str, Any]:
        """Forward kwargs that carry the segment boundaries to the varlen attention function.

        mtrl's own names, not transformers' ``cu_seq_lens_q``: the kwargs also reach the vision tower,
        whose flash path passes ``cu_seq_lens_q`` itself (see :mod:`mtrl.models.attention`).
        """
        return {CU_SEQLENS_KWARG: self.cu_seqlens, MAX_SEQLEN_KWARG: self.max_seqlen}

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """(1, T, ...) or (T, ...) -> (B, L, ...) with zeros at padding. See :func:`unpack`."""
        return unpack(values, self.indices, self.batch_size, self.seq_len)


def model_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Batch layout -> model layout: (B, L) stays, (B, D, L) becomes (D, B, L) (what Qwen-VL expects)."""
    if position_ids.dim() == 3:
        return position_ids.transpose(0, 1)
    return position_ids


def _default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row (0 at padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pack_padded(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    add_text_position_row: bool = False,
) -> PackedInputs:
    """Remove padding: (B, L) tensors -> one packed row of the T real tokens.

    Args:
        input_ids: (B, L) token ids (any padding side; a row's real tokens must be contiguous
            for the positions to make sense, which the data layout guarantees).
        attention_mask: (B, L) 1 on real tokens.
        position_ids: (B, L) or (B, D, L) in the batch layout; ``None`` = 0..n-1 per row (text only).
        add_text_position_row: for 3-row mRoPE ids, prepend a 4th row of plain text positions
            (0..n-1 per sequence) -> (4, 1, T). Qwen-VL models split that row off and hand it to the
            attention as ``position_ids``, where its restarts at 0 mark the sequence boundaries:
            a second, independent source of the segments besides the explicit ``cu_seqlens``.

    Returns:
        :class:`PackedInputs`. Rows keep their order, so per-row vision inputs concatenated in row
        order still line up with the image placeholder tokens.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (B, L); got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    batch_size, seq_len = input_ids.shape
    mask = attention_mask.bool()
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if batch_size > 0 else 0

    packed_ids = input_ids.reshape(-1)[indices].unsqueeze(0)  # (1, T)
    if position_ids is None:
        position_ids = _default_position_ids(attention_mask)
    if position_ids.dim() == 2:  # (B, L) -> (1, T)
        packed_pos = position_ids.reshape(-1)[indices].unsqueeze(0)
    elif position_ids.dim() == 3:  # (B, D, L) -> (D, 1, T)
        d = position_ids.shape[1]
        packed_pos = position_ids.transpose(0, 1).reshape(d, -1)[:, indices].unsqueeze(1)
        if add_text_position_row and d == 3:
            text_row = _default_position_ids(attention_mask).reshape(-1)[indices]
            packed_pos = torch.cat([text_row.to(packed_pos.dtype).view(1, 1, -1), packed_pos], dim=0)
    else:
        raise ValueError(f"position_ids must be (B, L) or (B, D, L), got {tuple(position_ids.shape)}")

    return PackedInputs(
        input_ids=packed_ids,
        position_ids=packed_pos,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        indices=indices,
        batch_size=batch_size,
        seq_len=seq_len,
    )


def unpack(values: torch.Tensor, indices: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """Scatter packed values back to the padded layout (differentiable).

    ``values``: (1, T, ...) or (T, ...); ``indices``: (T,) from :class:`PackedInputs`.
    Returns (B, L, ...) with zeros at padding positions.
    """
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == indices.numel():
        values = values.squeeze(0)
    if values.shape[0] != indices.numel():
        raise ValueError(f"expected {indices.numel()} packed values, got shape {tuple(values.shape)}")
    out = values.new_zeros((batch_size * seq_len, *values.shape[1:]))
    out = out.index_put((indices,), values)  # out-of-place: keeps autograd simple
    return out.reshape(batch_size, seq_len, *values.shape[1:])


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
def _check_varlen_attention(model: torch.nn.Module) -> None:
    """Packed inputs on a model with ordinary attention would silently attend across sequences."""
    config = getattr(model, "config", None)
    if config is not None and not padding_free_attention_enabled(model):
        current = getattr(getattr(config, "text_config", None) or config, "_attn_implementation", None)
        raise ValueError(
            "padding_free=True needs the model's attention switched to varlen attention first: call "
            "mtrl.models.attention.enable_padding_free_attention(model) after loading it "
            f"(current text attention: {current!r})"
        )


def response_targets(attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """(B, R) bool: response positions holding a real token (those get log-probs / values)."""
    if not 0 < response_length < attention_mask.shape[1]:
        raise ValueError(
            f"response_length must be in [1, L-1] (L = {attention_mask.shape[1]}), got {response_length}"
        )
    valid = attention_mask[:, -response_length:].bool()
    # The token before each real response token must be real too (it is the one predicting it).
    before = attention_mask[:, -response_length - 1 : -1].bool()
    if bool((valid & ~before).any()):
        raise ValueError(
            "a response token has no real token before it (empty prompt, or padding inside the sequence); "
            "cannot compute its log-probability"
        )
    return valid


def vision_kwargs(model: torch.nn.Module, multi_modal_inputs: Optional[List[dict]], input_ids: torch.Tensor) -> dict:
    """Flatten per-row vision inputs (row order) and add ``mm_token_type_ids`` for Qwen-VL models."""
    config = model.config
    kwargs = batch_multimodal_inputs(multi_modal_inputs, device=input_ids.device)
    if is_vision_config(config):
        # transformers 5 needs the token types whenever vision inputs are given (mRoPE bookkeeping);
        # harmless without them. They follow the (packed or padded) input_ids, so derive them here.
        kwargs["mm_token_type_ids"] = mm_token_type_ids(input_ids, config)
    elif kwargs:
        raise ValueError("multi_modal_inputs were given but the model has no vision tower")
    return kwargs


def head_outputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    return_entropy: bool,
    return_logits: bool,
    entropy_grad: bool,
) -> Dict[str, torch.Tensor]:
    """Log-probs (and entropy / scaled logits) for N selected positions: logits (N, V), labels (N,).

    The logits stay in the model's dtype here: ``log_probs_from_logits`` / ``entropy_from_logits``
    upcast to fp32 one chunk of rows at a time, so a full fp32 (N, V) copy never exists (for a 150k
    vocabulary that copy would be the largest tensor of the whole step).
    """
    from mtrl.optimization.policy_optimization import entropy_from_logits, log_probs_from_logits  # noqa: PLC0415

    if temperature != 1.0:
        # Note: for bf16 models this division rounds in bf16 (as verl does). Folding the temperature
        # into the fp32 chunks of the two helpers would be more precise.
        logits = logits / temperature
    out = {"log_probs": log_probs_from_logits(logits, labels)}
    if return_entropy:
        # Entropy is usually only needed for filtering/metrics: without entropy_grad it keeps no graph
        # (the chunked fp32 softmax would otherwise be stored for backward).
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            out["entropy"] = entropy_from_logits(logits)
    if return_logits:
        out["logits"] = logits
    return out


def _value_output(output: Any) -> torch.Tensor:
    """The (..., 1) value tensor of a critic's output: a tensor, a ``values`` entry, or ``logits``."""
    if isinstance(output, torch.Tensor):
        return output
    # ModelOutput is a dict subclass, so `output.values` would be dict.values: look the key up instead.
    values = output.get("values") if isinstance(output, dict) else getattr(output, "values", None)
    return values if isinstance(values, torch.Tensor) else output.logits


def scatter_response(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(N, ...) values of the valid response positions -> (B, R, ...) with zeros elsewhere."""
    out = values.new_zeros((*valid.shape, *values.shape[1:]))
    return out.index_put(tuple(torch.nonzero(valid, as_tuple=True)), values)


def forward_micro_batch(
    model: torch.nn.Module,
    micro_batch: Dict[str, torch.Tensor],
    multi_modal_inputs: Optional[List[dict]],
    response_length: int,
    temperature: float = 1.0,
    padding_free: bool = True,
    return_entropy: bool = False,
    return_logits: bool = False,
    value_head: bool = False,
    entropy_grad: bool = False,
) -> Dict[str, torch.Tensor]:
    """Run the model on one micro-batch and return per-response-token outputs.

    Args:
        model: a transformers causal LM / Qwen-VL model (policy) or, with ``value_head=True``, a model
            whose output ``logits`` (or ``values``) have last dim 1 (e.g. ``*ForTokenClassification``
            with ``num_labels=1``, as verl's critic). For ``padding_free=True`` the model must have
            been switched with :func:`mtrl.models.attention.enable_padding_free_attention`.
        micro_batch: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``position_ids`` (B, L) or
            (B, D, L) as in ``docs/DATA_LAYOUT.md``. Other keys are ignored.
        multi_modal_inputs: one dict per row (``pixel_values``, ``image_grid_thw``, ...; empty for
            text-only rows) or ``None``.
        response_length: R; the response tokens are ``input_ids[:, -R:]``.
        temperature: logits are divided by it before the softmax (use the rollout temperature).
        padding_free: pack the real tokens into one row (no FLOPs on padding) instead of running
            the padded (B, L) batch. Both give the same numbers.
        return_entropy / return_logits: also return ``entropy`` (B, R) / response ``logits`` (B, R, V)
            (in the model's dtype, divided by ``temperature``; for the exact-KL estimator -- large!).
        value_head: return ``values`` (B, R) instead: the value of the position *predicting* each
            response token (verl's convention, i.e. output position ``L - R - 1 + r``).
        entropy_grad: keep the autograd graph of ``entropy`` (only for an entropy loss term; off by
            default because entropy is used for token filtering and metrics, and its graph is large).

    Returns:
        dict with ``log_probs`` (B, R) fp32 [+ ``entropy`` fp32, ``logits``], or ``values`` (B, R) fp32.
        Every output is 0 at response padding; all but ``entropy`` (see ``entropy_grad``) keep the
        autograd graph.
    """
    input_ids = micro_batch["input_ids"]
    attention_mask = micro_batch["attention_mask"]
    position_ids = micro_batch.get("position_ids")
    batch_size, seq_len = input_ids.shape
    valid = response_targets(attention_mask, response_length)  # (B, R)

    # Flat (B * L) positions of the valid response tokens, and of the tokens predicting them.
    rows, cols = torch.nonzero(valid, as_tuple=True)
    target_flat = rows * seq_len + (seq_len - response_length) + cols
    predict_flat = target_flat - 1
    labels = input_ids.reshape(-1)[target_flat]

    forward_kwargs: Dict[str, Any] = {"use_cache": False}
    if padding_free:
        _check_varlen_attention(model)
        packed = pack_padded(input_ids, attention_mask, position_ids, add_text_position_row=True)
        # Map flat padded positions to packed positions: index of a real token among real tokens.
        packed_index = torch.cumsum(attention_mask.reshape(-1).long(), 0) - 1
        keep = packed_index[predict_flat]
        forward_kwargs.update(packed.attention_kwargs())
        vision = vision_kwargs(model, multi_modal_inputs, packed.input_ids)
        if position_ids is None and ("image_grid_thw" in vision or "video_grid_thw" in vision):
            # The model would compute mRoPE ids for the packed row as if it were one sequence.
            raise ValueError("padding-free forwards with images/videos need the batch's mRoPE position_ids")
        forward_kwargs.update(vision)
        model_inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids}
    else:
        keep = predict_flat  # rows of the flattened (B * L) output
        forward_kwargs.update(vision_kwargs(model, multi_modal_inputs, input_ids))
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:
            model_inputs["position_ids"] = model_position_ids(position_ids)

    if value_head:
        values = _value_output(model(**model_inputs, **forward_kwargs))
        if values.shape[-1] != 1:
            raise ValueError(f"value_head=True expects a last output dim of 1, got {tuple(values.shape)}")
        values = values.reshape(-1)[keep]  # (N,): works for (1, T, 1) and (B, L, 1) alike
        return {"values": scatter_response(values.float(), valid)}

    if padding_free:
        # Only project the needed positions onto the vocabulary: (1, N, V).
        logits = model(**model_inputs, **forward_kwargs, logits_to_keep=keep).logits[0]
    else:
        # The last R + 1 positions contain every predicting position (L - R - 1 ... L - 2).
        logits = model(**model_inputs, **forward_kwargs, logits_to_keep=response_length + 1).logits
        logits = logits[rows, cols]  # position L - R - 1 + c of row r sits at index c of the kept window
    outputs = head_outputs(logits, labels, temperature, return_entropy, return_logits, entropy_grad)
    return {key: scatter_response(value, valid) for key, value in outputs.items()}
