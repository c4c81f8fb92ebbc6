"""Segment-causal ("varlen") attention for padding-free training.

Padding-free training packs the real tokens of a micro-batch into one row of shape (1, T) and tells
the attention where each sequence starts with cumulative sequence lengths ``cu_seqlens`` (B + 1,),
e.g. ``[0, 5, 12, 20]`` for three sequences of 5, 7 and 8 tokens. Each token may only attend to the
earlier tokens *of its own sequence*.

transformers' built-in ``sdpa`` / ``eager`` / ``flex_attention`` kernels ignore those boundaries on
CPU (and flex has no CPU backward), so we register our own attention function with
``transformers.AttentionInterface`` and switch the *text decoder* of a loaded model to it:

* with varlen metadata in the forward kwargs -- :data:`CU_SEQLENS_KWARG` / :data:`MAX_SEQLEN_KWARG`
  (what :mod:`mtrl.models.packing` passes), or transformers' own packed-batch names ``cu_seq_lens_q``
  / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``, or as a last resort text ``position_ids``
  that restart at 0 for every sequence -- it attends causally inside each segment:
  ``flash_attn_varlen_func`` on CUDA when ``flash_attn`` is installed, otherwise plain torch: the
  segments, bucketed by length, are copied into padded blocks and each bucket is one batched
  ``torch.nn.functional.scaled_dot_product_attention`` call (works on CPU, differentiable; one sdpa
  call per segment was the old way, and its slice backward alone cost O(segments x T));
* without varlen metadata (ordinary padded batches, ``generate`` with a KV cache) it behaves exactly
  like transformers' ``sdpa`` implementation, so one model object serves the padded path, the
  packed path and rollouts.

Under Ulysses sequence parallelism (:mod:`mtrl.models.ulysses`) the decoder hook adds the sp group to
the kwargs; the function then all-to-alls q/k/v to whole sequences over a share of the heads, runs the
same segment-causal (or padded-causal) attention and all-to-alls the output back.

The vision tower of Qwen-VL models is left on its own implementation (sdpa, eager or
flash_attention_2): it builds its own per-image ``cu_seqlens``. Why mtrl uses its *own* kwarg names
for the text segments: transformers forwards the top-level ``**kwargs`` into the vision tower too,
and its flash path there calls the attention with ``cu_seq_lens_q=<per-image>`` explicitly, so a
text ``cu_seq_lens_q`` in the kwargs would arrive twice (TypeError). ``mtrl_cu_seqlens`` is ignored
by every built-in implementation.

Public API:
    ``enable_padding_free_attention(model, backend="auto")``, ``padding_free_attention_enabled(model)``,
    ``register_varlen_attention()`` (call before ``from_pretrained(attn_implementation="mtrl_varlen")``),
    ``VARLEN_ATTENTION`` / ``VARLEN_ATTENTION_TORCH`` / ``VARLEN_ATTENTION_FA`` (registered names),
    ``CU_SEQLENS_KWARG`` / ``MAX_SEQLEN_KWARG`` (forward kwargs), ``varlen_attention_forward``,
    ``flash_attn_available()``, ``cu_seqlens_from_position_ids(position_ids)``.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from mtrl.models.ulysses import SP_GROUP_KWARG, SP_PADDING_MASK_KWARG, ulysses_attention
from mtrl.utils.logger import get_logger

logger = get_logger(__name__)

#: Name of the auto-dispatching implementation (flash-attn on CUDA when installed, torch otherwise).
VARLEN_ATTENTION = "mtrl_varlen"
#: Always the plain-torch kernel (bucketed, batched sdpa calls; any device).
VARLEN_ATTENTION_TORCH = "mtrl_varlen_torch"
#: Always flash-attn's ``flash_attn_varlen_func`` (CUDA + fp16/bf16 only).
#: The name must not contain the substring "flash": transformers treats any such name as a flash
#: attention implementation (``is_flash_attention_requested``) and changes code paths accordingly.
VARLEN_ATTENTION_FA = "mtrl_varlen_fa"

#: Forward kwargs carrying the packed text segments (cumulative lengths, int32 (B + 1,); max length).
CU_SEQLENS_KWARG = "mtrl_cu_seqlens"
MAX_SEQLEN_KWARG = "mtrl_max_seqlen"

_BACKEND_TO_NAME = {"auto": VARLEN_ATTENTION, "torch": VARLEN_ATTENTION_TORCH, "flash": VARLEN_ATTENTION_FA}
_NAME_TO_BACKEND = {name: backend for backend, name in _BACKEND_TO_NAME.items()}

_FLASH_INSTALL_HINT = (
    "flash-attn is not installed. Install it with `pip install flash-attn --no-build-isolation` "
    "(or `pip install mtrl[flash]`), or use the plain-torch backend (backend='torch' / 'auto')."
)


# ----------------------------------------------------------------------------------------------
# flash-attn (lazy: importing it is slow and it is absent on CPU machines)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen_func() -> Callable:
    if not flash_attn_available():
        raise ImportError(_FLASH_INSTALL_HINT)
    from flash_attn import flash_attn_varlen_func  # noqa: PLC0415 (lazy on purpose)

    return flash_attn_varlen_func


# ----------------------------------------------------------------------------------------------
# Segment metadata
# ----------------------------------------------------------------------------------------------
def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence lengths of a packed row whose position ids restart at 0 per sequence.

    ``position_ids``: (T,) or (1, T) text position ids, e.g. ``[0 1 2 0 1 0 1 2 3]`` -> ``[0 3 5 9]``.
    Returns int32 (num_seqs + 1,). Only valid when every sequence starts at position 0 (true for
    the packed batches built by :mod:`mtrl.models.packing`).
    """
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0, as_tuple=False).reshape(-1)
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    total = torch.tensor([pos.numel()], device=pos.device, dtype=starts.dtype)
    return torch.cat([starts, total]).to(torch.int32)


def _segment_metadata(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict):
    """Return ``(cu_q, cu_k, max_q, max_k)`` if this call is a packed varlen call, else ``None``.

    A call is packed when the caller passed :data:`CU_SEQLENS_KWARG` (what mtrl does) or
    ``cu_seq_lens_q`` (transformers' name), or when there is no padding mask, a single row, no KV
    cache (q and k lengths equal) and the text ``position_ids`` restart at 0 after the first token.
    """
    cu = kwargs.get(CU_SEQLENS_KWARG)
    if cu is not None:
        max_len = kwargs.get(MAX_SEQLEN_KWARG)
        max_len = int((cu[1:] - cu[:-1]).max()) if max_len is None else int(max_len)
        return cu, cu, max_len, max_len

    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k
        max_q = kwargs.get("max_length_q")
        max_k = kwargs.get("max_length_k")
        max_q = int((cu_q[1:] - cu_q[:-1]).max()) if max_q is None else int(max_q)
        max_k = int((cu_k[1:] - cu_k[:-1]).max()) if max_k is None else int(max_k)
        return cu_q, cu_k, max_q, max_k

    position_ids = kwargs.get("position_ids")
    if (
        position_ids is None
        or attention_mask is not None
        or query.shape[0] != 1
        or query.shape[2] != key.shape[2]
        or position_ids.reshape(-1).numel() != query.shape[2]
    ):
        return None
    pos = position_ids.reshape(-1)
    if not bool((pos[1:] == 0).any()):
        return None  # one ordinary sequence: the plain causal path is the same thing
    cu = cu_seqlens_from_position_ids(pos)
    max_len = int((cu[1:] - cu[:-1]).max())
    return cu, cu, max_len, max_len


# ----------------------------------------------------------------------------------------------
# Varlen kernels. Inputs follow transformers' convention: query (1, H, T, D), key/value (1, Hkv, S, D).
# Output (1, T, H, D) like every transformers attention function.
# ----------------------------------------------------------------------------------------------
#: Segments are batched into padded sdpa calls; a new bucket starts where padding the next (shorter)
#: segment up to the bucket's longest one would make the bucket more than this many times its real
#: tokens (bounds the padding work and memory on long-tailed length mixes).
_MAX_BUCKET_PADDING = 1.5


def _length_buckets(lengths: list) -> list:
    """Group segment indices, longest first, into buckets of similar length (see _MAX_BUCKET_PADDING)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    buckets, real = [], 0
    for i in order:
        if buckets and (len(buckets[-1]) + 1) * lengths[buckets[-1][0]] <= _MAX_BUCKET_PADDING * (real + lengths[i]):
            buckets[-1].append(i)
            real += lengths[i]
        else:
            buckets.append([i])
            real = lengths[i]
    return buckets


def _padded_slots(starts: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple:
    """Packed positions of segments laid out left-aligned in a (n, width) padded block.

    Returns ``(packed, slots)``: token ``packed[t]`` of the packed row goes to flat slot ``slots[t]``.
    """
    offsets = torch.arange(width, device=starts.device)
    real = offsets[None, :] < lengths[:, None]  # (n, width)
    packed = (starts[:, None] + offsets[None, :])[real]
    slots = torch.nonzero(real.reshape(-1), as_tuple=False).reshape(-1)
    return packed, slots


def _torch_varlen(query, key, value, cu_q, cu_k, scaling, dropout, is_causal, training):
    """Plain torch: segments of similar length run as one padded, batched sdpa call per bucket.

    Each segment is copied left-aligned into a (n, H, width, D) block. With equal query and key
    segments, plain top-left causal attention is then exact for every real query (the padding lies
    after it); otherwise an explicit bottom-right aligned mask (as flash-attn) is built. Padding
    query rows are computed and dropped. Differentiable; the copies are index ops, O(T) each.
    """
    # Grouped-query attention: sdpa shares each kv head across its query heads (no repeated copies).
    gqa = query.shape[1] != key.shape[1]
    # (1, H, T, D) -> (T, H, D): the packed tokens along dim 0, where the index ops work.
    q_tok, k_tok, v_tok = (t[0].transpose(0, 1) for t in (query, key, value))
    cu_q, cu_k = (cu.to(device=query.device, dtype=torch.long) for cu in (cu_q, cu_k))
    len_q, len_k = (cu[1:] - cu[:-1] for cu in (cu_q, cu_k))
    lengths_q, lengths_k = len_q.tolist(), len_k.tolist()
    same_segments = lengths_q == lengths_k
    out = q_tok.new_zeros(q_tok.shape)
    for bucket in _length_buckets(lengths_q):
        rows = torch.tensor(bucket, device=query.device)
        width_q = lengths_q[bucket[0]]
        width_k = width_q if same_segments else max(lengths_k[i] for i in bucket)
        q_packed, q_slots = _padded_slots(cu_q[rows], len_q[rows], width_q)
        k_packed, k_slots = q_packed, q_slots
        if not same_segments:
            k_packed, k_slots = _padded_slots(cu_k[rows], len_k[rows], width_k)

        def block(tokens, packed, slots, width):
            flat = tokens.new_zeros((len(bucket) * width, *tokens.shape[1:]))
            flat = flat.index_copy(0, slots, tokens.index_select(0, packed))
            return flat.view(len(bucket), width, *tokens.shape[1:]).transpose(1, 2)  # (n, H, width, D)

        q = block(q_tok, q_packed, q_slots, width_q)
        k, v = (block(t, k_packed, k_slots, width_k) for t in (k_tok, v_tok))
        mask, causal = None, is_causal
        if not same_segments or not is_causal:
            i = torch.arange(width_q, device=q.device)[:, None]
            j = torch.arange(width_k, device=q.device)[None, :]
            lq, lk = (x[rows][:, None, None] for x in (len_q, len_k))
            mask = j < lk  # (n, width_q, width_k): real keys of each segment
            if is_causal:  # the queries are the last lq tokens of the segment
                mask = mask & (j <= i + (lk - lq))
            mask = (mask | (i >= lq)).unsqueeze(1)  # padding query rows: any key (no empty softmax)
            causal = False
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout if training else 0.0, is_causal=causal, scale=scaling,
            enable_gqa=gqa,
        )
        attn = attn.transpose(1, 2).reshape(len(bucket) * width_q, *q_tok.shape[1:])
        out = out.index_copy(0, q_packed, attn.index_select(0, q_slots))
    return out.unsqueeze(0)  # (1, T, H, D)


def _flash_varlen(query, key, value, cu_q, cu_k, max_q, max_k, scaling, dropout, is_causal, training, kwargs):
    """flash-attn varlen kernel. Needs CUDA tensors in fp16/bf16 (fp32 inputs are cast to bf16)."""
    flash_attn_varlen_func = _flash_attn_varlen_func()
    orig_dtype = query.dtype
    if orig_dtype not in (torch.float16, torch.bfloat16):
        target = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        logger.warning("flash-attn needs fp16/bf16 inputs; casting %s attention inputs to %s.", orig_dtype, target)
        query, key, value = query.to(target), key.to(target), value.to(target)
    # (1, H, T, D) -> (T, H, D): flash-attn's packed layout.
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))
    sliding_window = kwargs.get("sliding_window")
    extra = {}
    if sliding_window is not None:
        extra["window_size"] = (sliding_window - 1, 0)  # same convention as transformers' FA2 path
    if kwargs.get("softcap") is not None:
        extra["softcap"] = kwargs["softcap"]
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=cu_q.to(device=q.device, dtype=torch.int32),
        cu_seqlens_k=cu_k.to(device=q.device, dtype=torch.int32),
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        dropout_p=dropout if training else 0.0,
        softmax_scale=scaling,
        causal=is_causal,
        **extra,
    )
    return out.unsqueeze(0).to(orig_dtype)  # (1, T, H, D)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    backend: str = "auto",
    **kwargs: Any,
):
    """transformers attention function: segment-causal for packed inputs, plain sdpa otherwise.

    Registered under :data:`VARLEN_ATTENTION` (``backend="auto"``), :data:`VARLEN_ATTENTION_TORCH`
    and :data:`VARLEN_ATTENTION_FA`. Returns ``(attn_output (B, T, H, D), None)``.
    """
    sp_group = kwargs.pop(SP_GROUP_KWARG, None)
    if sp_group is not None:  # a sequence slice of a Ulysses group (mtrl.models.ulysses)
        return ulysses_attention(functools.partial(varlen_attention_forward, backend=backend), module, query, key,
                                 value, sp_group, kwargs.pop(SP_PADDING_MASK_KWARG, None), scaling, dropout, kwargs)
    is_causal = kwargs.pop("is_causal", None)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    # Segments are a decoder notion. A bidirectional caller (a vision tower loaded with this
    # implementation too) runs its own per-image chunks and must not pick up the text segments that
    # transformers forwards to it in **kwargs.
    meta = _segment_metadata(query, key, attention_mask, kwargs) if is_causal else None

    if meta is None:
        # Ordinary (padded / cached) call: identical to transformers' sdpa implementation. The mask
        # was built by `_varlen_mask` (= sdpa_mask) below, so it has the format sdpa expects.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

        for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", CU_SEQLENS_KWARG,
                  MAX_SEQLEN_KWARG):
            kwargs.pop(k, None)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )

    if query.shape[0] != 1:
        raise ValueError(f"Packed varlen attention expects a single packed row, got batch size {query.shape[0]}.")
    cu_q, cu_k, max_q, max_k = meta
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    use_flash = backend == "flash" or (
        backend == "auto" and query.is_cuda and flash_attn_available()
        and query.dtype in (torch.float16, torch.bfloat16)
    )
    if use_flash:
        if not query.is_cuda:
            raise RuntimeError("flash-attn varlen attention needs CUDA tensors; use backend='torch' on CPU.")
        out = _flash_varlen(query, key, value, cu_q, cu_k, max_q, max_k, scaling, dropout, is_causal,
                            module.training, kwargs)
    else:
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError("sliding-window attention is not supported by the torch varlen backend.")
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("attention logit softcapping is not supported by the torch varlen backend.")
        out = _torch_varlen(query, key, value, cu_q, cu_k, scaling, dropout, is_causal, module.training)
    return out, None


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
def _varlen_mask(*args, **kwargs):
    """Mask builder paired with the varlen attention (registered in ``AttentionMaskInterface``).

    With a 2D padding mask (padded batches, generation) it builds the same mask as ``sdpa``. Without
    one it returns ``None``: then the call is either one unpadded sequence (the attention runs plain
    causal sdpa) or a packed row, whose segments the attention function takes from the varlen kwargs.
    Building transformers' block-diagonal (T, T) packed-sequence mask there would waste O(T^2) memory.
    """
    from transformers.masking_utils import sdpa_mask  # noqa: PLC0415

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def register_varlen_attention() -> None:
    """Register the three varlen attention names with transformers (idempotent)."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

    for name, backend in _NAME_TO_BACKEND.items():
        # functools.partial keeps one implementation; `backend` selects the kernel.
        AttentionInterface.register(name, functools.partial(varlen_attention_forward, backend=backend))
        AttentionMaskInterface.register(name, _varlen_mask)


def _text_and_vision_configs(config) -> tuple[list, list]:
    """Split a (possibly composite) config into text-decoder configs and vision-tower configs."""
    text, vision = [], []
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is None:
            continue
        (vision if "vision" in key or "audio" in key else text).append((key, sub))
    return text, vision


def enable_padding_free_attention(model: torch.nn.Module, backend: str = "auto") -> str:
    """Switch the text decoder of a loaded transformers model to varlen attention; return the name used.

    ``backend``: ``"auto"`` (flash-attn on CUDA when installed, plain torch otherwise), ``"torch"``
    or ``"flash"`` (raises ImportError naming ``pip install flash-attn`` / ``mtrl[flash]`` if missing).
    The vision tower of Qwen-VL models keeps its implementation (moved to ``sdpa`` only if it was on
    one of ours, e.g. after loading the whole model with ``attn_implementation="mtrl_varlen"``).
    Works on any transformers ``PreTrainedModel``; call it before wrapping with FSDP / PEFT.
    """
    if backend not in _BACKEND_TO_NAME:
        raise ValueError(f"backend must be one of {sorted(_BACKEND_TO_NAME)}, got {backend!r}")
    if backend == "flash" and not flash_attn_available():
        raise ImportError(_FLASH_INSTALL_HINT)
    register_varlen_attention()
    name = _BACKEND_TO_NAME[backend]
    config = model.config

    text_subs, vision_subs = _text_and_vision_configs(config)
    for text_cfg in [config] + [sub for _, sub in text_subs]:
        if "sliding_attention" in (getattr(text_cfg, "layer_types", None) or []):
            # The padded/generation fallback builds no sliding-window mask (see `_varlen_mask`).
            raise NotImplementedError(
                "padding-free attention does not support sliding-window layers; disable padding_free "
                "or use_sliding_window for this model"
            )

    if not vision_subs and not text_subs:
        model.set_attn_implementation(name)
        return name

    request: dict[str, Any] = {"": name}
    for key, _ in text_subs:
        request[key] = name
    for key, sub in vision_subs:
        current = sub._attn_implementation
        # Our function has no per-image segment logic for the (bidirectional) vision attention.
        request[key] = "sdpa" if (current is None or current.startswith(VARLEN_ATTENTION)) else current
    model.set_attn_implementation(request)
    return name


def padding_free_attention_enabled(model: torch.nn.Module) -> bool:
    """True when the model's (text) attention is one of the varlen implementations."""
    config = model.config
    text_cfg = getattr(config, "text_config", None) or config
    return str(text_cfg._attn_implementation).startswith(VARLEN_ATTENTION)
