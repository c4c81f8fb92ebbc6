"""Log-probs and entropies from logits: memory-bounded kernels over the vocabulary.

Every function here works on fp32 (or, for fp64 input, fp64) chunks of ``_VOCAB_CHUNK_TOKENS`` rows,
so the working copy never is the whole (batch, len, vocab) tensor.
"""

from typing import Callable

import torch

from mtrl.optimization.masked import compute_dtype

# Rows of logits handled at once by the vocabulary-wide functions: bounds the fp32 working copy
# (1024 x 152k vocab x 4 bytes = 0.6 GB) whatever the batch and sequence length.
_VOCAB_CHUNK_TOKENS = 1024


class _LabelLogProb(torch.autograd.Function):
    """log softmax(logits)[label], in chunks, saving only the logits for backward.

    Autograd through ``log_softmax(logits.float())`` would keep a full fp32 copy of the logits
    (batch x len x vocab) alive until backward; here backward recomputes the softmax chunk by chunk.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1, 1)
        dtype = compute_dtype(logits.dtype)
        out = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
        for start in range(0, flat.shape[0], _VOCAB_CHUNK_TOKENS):
            chunk = flat[start:start + _VOCAB_CHUNK_TOKENS].to(dtype)
            picked = chunk.gather(-1, flat_labels[start:start + _VOCAB_CHUNK_TOKENS]).squeeze(-1)
            out[start:start + _VOCAB_CHUNK_TOKENS] = picked - torch.logsumexp(chunk, dim=-1)
        ctx.save_for_backward(logits, labels)
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1, 1)
        dtype = compute_dtype(logits.dtype)
        flat_grad_out = grad_out.reshape(-1, 1).to(dtype)
        grad = torch.empty_like(flat)
        for start in range(0, flat.shape[0], _VOCAB_CHUNK_TOKENS):
            rows = slice(start, start + _VOCAB_CHUNK_TOKENS)
            g = flat_grad_out[rows]
            # d log p_y / d z = onehot(y) - softmax(z)
            chunk_grad = -torch.softmax(flat[rows].to(dtype), dim=-1) * g
            chunk_grad.scatter_add_(-1, flat_labels[rows], g)
            grad[rows] = chunk_grad.to(grad.dtype)
        return grad.view_as(logits), None


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., label]`` in fp32 (or fp64 for fp64 logits), differentiable.

    ``logits`` (..., vocab), ``labels`` (...) integer ids. Memory-friendly: the fp32 working copy
    is one chunk of rows at a time in forward and backward, never the whole logits tensor.
    """
    return _LabelLogProb.apply(logits, labels.long())


def _map_token_chunks(fn: Callable[..., torch.Tensor], *logits: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to fp32 chunks of rows of (..., vocab) tensors of one shape; result has shape (...)."""
    shape = logits[0].shape[:-1]
    dtype = compute_dtype(logits[0].dtype)
    flats = [x.reshape(-1, x.shape[-1]) for x in logits]
    parts = [fn(*(flat[start:start + _VOCAB_CHUNK_TOKENS].to(dtype) for flat in flats))
             for start in range(0, flats[0].shape[0], _VOCAB_CHUNK_TOKENS)]
    if not parts:
        return torch.zeros(shape, dtype=dtype, device=logits[0].device)
    return torch.cat(parts).view(shape)


def _entropy(chunk: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(chunk, dim=-1) - (torch.softmax(chunk, dim=-1) * chunk).sum(dim=-1)


def _kl(chunk: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(chunk, dim=-1)
    return (log_p.exp() * (log_p - torch.log_softmax(other, dim=-1))).sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``logsumexp(z) - sum(softmax(z) * z)`` of each distribution in ``logits`` (..., vocab).

    Computed in fp32 chunk by chunk; differentiable, but callers that only need it for filtering or
    metrics should call it under no_grad, so that no fp32 chunk is kept for backward.
    """
    return _map_token_chunks(_entropy, logits)


def kl_from_logits(logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(softmax(logits) || softmax(other_logits))`` per position, over the vocabulary (..., vocab)."""
    return _map_token_chunks(_kl, logits, other_logits)
