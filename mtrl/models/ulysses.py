"""Ulysses sequence parallelism: the ranks of a sequence-parallel (sp) group share one micro-batch's sequence.

With ``worker.actor.ulysses_size = sp > 1`` the world is cut into consecutive blocks of sp ranks (a (dp, sp)
layout; FSDP still shards over all ranks). For each micro-batch the group runs the text decoder on the
*same* rows, each rank holding one contiguous 1/sp slice of the sequence:

* outside the decoder nothing changes: the embeddings, the vision tower (unsplit, on every rank) and the
  scatter of image features into the sequence run on the whole sequence, and so do the position ids
  (Qwen-VL's mRoPE ids are computed on the whole sequence by the data pipeline, then sliced here);
* a forward pre-hook on the text decoder pads the sequence to a multiple of sp and keeps this rank's
  slice of ``input_ids`` / ``inputs_embeds`` and ``position_ids`` (a padded batch's 2-D padding mask is
  handed to the attention whole, in a kwarg, since the causal mask of a slice is not a slice of a mask);
* inside every attention layer q/k/v go through an all-to-all from (seq/sp, heads) to (seq, heads/sp),
  attend over the whole sequence (within the packed segments, or with the padding mask), and an
  all-to-all brings the output back to (seq/sp, heads);
* a forward hook gathers the decoder's hidden states back along the sequence, so the LM / value head,
  log-probs, entropies and the loss see the full sequence on every rank of the group (each rank then
  seeds backward with 1/sp of the loss: summed over the group that is the loss once).

The padding added for the split forms one extra packed segment (or masked-out padding) and is cut off
after the gather, so it never reaches a real token. Qwen3-VL's deepstack features are sliced with the
sequence. Everything travels through autograd (all-to-all backward is the inverse all-to-all; the
gather's backward sums the group's gradients of each slice), and the sp information reaches the
attention through forward kwargs, so gradient checkpointing's recomputation takes the same path.

Public API: :class:`SequenceParallel` (``create(size)``, ``active()``, ``each_member(mb)``),
:func:`install_sequence_parallel` (hooks on a model's text decoder), :func:`check_heads_divisible`,
:func:`ulysses_attention` (used by :mod:`mtrl.models.attention`), :data:`SP_GROUP_KWARG`,
:data:`SP_PADDING_MASK_KWARG`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mtrl.protocol import DataBatch

#: Forward kwargs the decoder hook adds for the attention: the sp process group, a padded batch's (B, L') mask.
SP_GROUP_KWARG = "mtrl_sp_group"
SP_PADDING_MASK_KWARG = "mtrl_sp_padding_mask"

# The group whose decoder forwards are split right now (set by `SequenceParallel.active`).
_ACTIVE_GROUP: Optional[dist.ProcessGroup] = None


# ----------------------------------------------------------------------------------------------
# Collectives with autograd
# ----------------------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Chunk i of `x` along `scatter_dim` goes to rank i; the chunks received are concatenated along `gather_dim`."""
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


class _GatherSequence(torch.autograd.Function):
    """Concatenate the group's equal slices along `dim`; backward: this rank's slice of the summed gradients."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.length = group, dim, x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on every slice: the gradient of a slice is the sum over the group.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.length
        return grad.narrow(ctx.dim, start, ctx.length), None, None


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    return _GatherSequence.apply(x, group, dim)


def _pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    pad = length - x.shape[dim]
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _local_slice(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's slice of `x` (already padded to a multiple of the group size) along `dim`."""
    length = x.shape[dim] // dist.get_world_size(group)
    return x.narrow(dim, dist.get_rank(group) * length, length)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def ulysses_attention(attend: Callable, module: nn.Module, query, key, value, group, padding_mask,
                      scaling: Optional[float], dropout: float, kwargs: dict):
    """Attention of a sequence slice: (B, H, S/sp, D) q/k/v -> all-to-all -> attend over S -> back.

    `attend(module, q, k, v, attention_mask, scaling=, dropout=, **kwargs)` is the varlen attention for
    the whole sequence (packed segments from `kwargs`); with a `padding_mask` (B, S) the call is a padded
    batch and runs causal sdpa with that mask here. Returns ((B, S/sp, H, D), None).
    """
    q, k, v = (_AllToAll.apply(t, group, 1, 2) for t in (query, key, value))  # (B, H/sp, S, D)
    seq_len = q.shape[2]
    kwargs.pop("position_ids", None)  # this rank's slice only: the segments come from the kwargs below
    if padding_mask is not None:
        out = _padded_causal_attention(q, k, v, padding_mask, scaling, dropout if module.training else 0.0)
    else:
        from mtrl.models.attention import CU_SEQLENS_KWARG, MAX_SEQLEN_KWARG  # noqa: PLC0415 (imports this module)

        cu = kwargs.get(CU_SEQLENS_KWARG)
        if cu is not None and int(cu[-1]) < seq_len:  # the split's padding: one more segment of its own
            pad = seq_len - int(cu[-1])
            kwargs[CU_SEQLENS_KWARG] = torch.cat([cu, cu.new_tensor([seq_len])])
            if kwargs.get(MAX_SEQLEN_KWARG) is not None:
                kwargs[MAX_SEQLEN_KWARG] = max(int(kwargs[MAX_SEQLEN_KWARG]), pad)
        out, _ = attend(module, q, k, v, None, scaling=scaling, dropout=dropout, **kwargs)
    return _AllToAll.apply(out, group, 1, 2), None  # (B, S, H/sp, D) -> (B, S/sp, H, D)


def _padded_causal_attention(q, k, v, padding_mask, scaling, dropout):
    """Causal sdpa over real keys; a padding query also sees itself, so no softmax row is empty (NaN)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    seq_len = q.shape[2]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    eye = torch.eye(seq_len, dtype=torch.bool, device=q.device)
    mask = (causal & padding_mask.bool()[:, None, None, :]) | eye
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# Decoder hooks
# ----------------------------------------------------------------------------------------------
def _split_inputs(module: nn.Module, args: tuple, kwargs: dict):
    group = _ACTIVE_GROUP
    if group is None:
        return None
    if args:
        raise TypeError("sequence parallelism expects the text decoder to be called with keyword arguments")
    if kwargs.get("position_ids") is None:
        raise ValueError("sequence parallelism needs the batch's position_ids (they are sliced with the sequence)")
    size = dist.get_world_size(group)
    tokens = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
    length = tokens.shape[1]
    padded = -(-length // size) * size
    module._mtrl_sp_lengths.append(length)
    for name in ("input_ids", "inputs_embeds"):
        if kwargs.get(name) is not None:
            kwargs[name] = _local_slice(_pad_to(kwargs[name], padded, 1), group, 1)
    kwargs["position_ids"] = _local_slice(_pad_to(kwargs["position_ids"], padded, -1), group, -1)
    mask = kwargs.pop("attention_mask", None)
    if mask is not None:
        kwargs[SP_PADDING_MASK_KWARG] = _pad_to(mask, padded, 1)
    if kwargs.get("visual_pos_masks") is not None:  # Qwen3-VL deepstack: keep the features of this slice
        full = _pad_to(kwargs["visual_pos_masks"].bool(), padded, 1)
        local = torch.zeros_like(full)
        local.narrow(1, dist.get_rank(group) * (padded // size), padded // size).fill_(True)
        rows = local[full]  # over the visual tokens in (row, position) order: in this slice?
        kwargs["visual_pos_masks"] = _local_slice(full, group, 1)
        kwargs["deepstack_visual_embeds"] = [e[rows.to(e.device)] for e in kwargs["deepstack_visual_embeds"]]
    kwargs[SP_GROUP_KWARG] = group
    return args, kwargs


def _gather_outputs(module: nn.Module, args: tuple, kwargs: dict, output: Any):
    group = kwargs.get(SP_GROUP_KWARG)
    if group is None:
        return None
    length = module._mtrl_sp_lengths.pop()
    output.last_hidden_state = gather_sequence(output.last_hidden_state, group, 1).narrow(1, 0, length)
    return output


def install_sequence_parallel(model: nn.Module) -> None:
    """Add the split / gather hooks to the text decoder of `model` (idempotent; inactive outside `active()`)."""
    from mtrl.models.attention import padding_free_attention_enabled  # noqa: PLC0415 (it imports this module)
    from mtrl.models.loader import language_model  # noqa: PLC0415

    if not padding_free_attention_enabled(model):
        raise ValueError("sequence parallelism runs in the varlen attention: call "
                         "mtrl.models.attention.enable_padding_free_attention(model) first")
    decoder = language_model(model)
    if getattr(decoder, "_mtrl_sp_lengths", None) is not None:
        return
    decoder._mtrl_sp_lengths = []
    decoder.register_forward_pre_hook(_split_inputs, with_kwargs=True)
    decoder.register_forward_hook(_gather_outputs, with_kwargs=True)


def check_heads_divisible(model_config, size: int) -> None:
    """Each rank of an sp group attends with heads/sp query and key-value heads: both must divide."""
    text = getattr(model_config, "text_config", None) or model_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % size or kv_heads % size:
        raise ValueError(f"`worker.actor.ulysses_size` = {size} must divide the model's attention heads "
                         f"({heads} query, {kv_heads} key-value heads)")


# ----------------------------------------------------------------------------------------------
# The group
# ----------------------------------------------------------------------------------------------
@dataclass
class SequenceParallel:
    """This rank's sequence-parallel group: ranks [k * size, (k + 1) * size) of the world (size 1: none)."""

    size: int = 1
    group: Optional[dist.ProcessGroup] = None
    ranks: Tuple[int, ...] = (0,)

    @classmethod
    def create(cls, size: int) -> "SequenceParallel":
        """Every rank must call this (each group is created by all ranks)."""
        if size == 1:
            return cls()
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % size:
            raise ValueError(f"`worker.actor.ulysses_size` = {size} must divide the number of workers ({world})")
        mine = None
        for start in range(0, world, size):
            ranks = tuple(range(start, start + size))
            group = dist.new_group(list(ranks))
            if rank in ranks:
                mine = cls(size, group, ranks)
        return mine

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Split the text decoder forwards of models with `install_sequence_parallel` hooks inside this block."""
        global _ACTIVE_GROUP
        previous, _ACTIVE_GROUP = _ACTIVE_GROUP, self.group
        try:
            yield
        finally:
            _ACTIVE_GROUP = previous

    def each_member(self, micro_batch: DataBatch) -> Iterator[Tuple[DataBatch, bool]]:
        """The micro-batch of every rank of the group in turn, and whether it is this rank's own.

        Ranks hold different rows (the controller's dispatch is unchanged); the group runs each member's
        micro-batch together, so a rank's share of a forward is 1/sp of one micro-batch's tokens.
        """
        if self.size == 1:
            yield micro_batch, True
            return
        me = dist.get_rank()
        for owner in self.ranks:
            shared = [micro_batch if owner == me else None]
            dist.broadcast_object_list(shared, src=owner, group=self.group)
            yield shared[0], owner == me
