"""Masked reductions over per-token tensors, and the types and compute dtype the other modules share.

``mask`` is 1 on valid response tokens and 0 on padding (bool, int or float all work).
"""

from typing import Dict, Optional, Union

import torch

Number = Union[int, float, torch.Tensor]
Metrics = Dict[str, torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions over the vocabulary or the batch run in: bf16/fp16 are promoted to fp32;
    fp64 stays fp64 (gradcheck, reference computations)."""
    return torch.promote_types(dtype, torch.float32)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is non-zero, over ``dim`` (all elements when None)."""
    # torch.where instead of a product: inf/NaN sitting in padding must not leak into the sum.
    selected = torch.where(mask.bool(), values, torch.zeros_like(values)) * mask.to(values.dtype)
    return selected.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is non-zero, over ``dim``; 0 where the mask is empty."""
    count = mask.to(values.dtype).sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1e-8)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked elements (Bessel-corrected when ``unbiased``); 0 for fewer than two."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        # n / (n - 1) for n >= 2; a single element (or none) has variance 0 and needs no correction.
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` with mean and unbiased variance taken over the mask.

    Applied to every element (padding included). With ``shift_mean=False`` the mean is added back,
    so only the scale changes.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    return whitened if shift_mean else whitened + mean
