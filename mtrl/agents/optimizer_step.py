"""The optimizer step every agent (and the critic) takes after accumulating a mini-batch's gradients."""

import math

import torch
from torch import nn


def clipped_optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip by the global norm over all shards, step unless the norm is not finite, zero the grads.

    Returns the norm before clipping (inf/nan when the step was skipped).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # an FSDP2 (DTensor) norm
        norm = norm.full_tensor()
    norm = float(norm)
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
