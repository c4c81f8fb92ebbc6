"""The optimizer step every agent (and the critic) takes after accumulating a mini-batch's gradients,
and the count of steps skipped because the gradient was not finite.

A non-finite loss gives a non-finite gradient, hence a non-finite global norm. Under FSDP2 that norm
is a DTensor whose `full_tensor()` reduces the shards' partial norms over all ranks, so every rank sees
the same value and skips (or takes) the same step: the ranks stay in step. The skipped step's
gradients are dropped, the optimizer state is left untouched.
"""

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from mtrl.utils.errors import UserError


def clipped_optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip by the global norm over all shards, step unless the norm is not finite, zero the grads.

    Returns the norm before clipping (inf/nan when the step was skipped).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # an FSDP2 (DTensor) norm: reduced over all ranks, the same on each
        norm = norm.full_tensor()
    norm = float(norm)
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class SkippedUpdates:
    """Counts optimizer steps skipped for a non-finite gradient norm, for one model (`prefix`: actor, critic).

    `metrics()` gives `{prefix}/skipped_updates` (skipped since the last call) and
    `{prefix}/skipped_updates_in_a_row` (the current run of skips, across calls), which the controller
    checks against `training.max_skipped_updates` (`stop_after_skipped_updates`).
    """

    prefix: str
    since_report: int = 0
    in_a_row: int = 0

    def record(self, grad_norm: float) -> float:
        """Count one optimizer step by its gradient norm; returns the norm."""
        if math.isfinite(grad_norm):
            self.in_a_row = 0
        else:
            self.since_report += 1
            self.in_a_row += 1
        return grad_norm

    def metrics(self) -> Dict[str, float]:
        out = {f"{self.prefix}/skipped_updates": float(self.since_report),
               f"{self.prefix}/skipped_updates_in_a_row": float(self.in_a_row)}
        self.since_report = 0
        return out


class TooManySkippedUpdates(UserError, RuntimeError):
    """`training.max_skipped_updates` optimizer steps in a row had a non-finite gradient (the run stops, exit 2)."""


def stop_after_skipped_updates(metrics: Mapping[str, float], limit: Optional[int], step: int) -> None:
    """Raise `TooManySkippedUpdates` when any model's run of skipped updates reached `limit` (None or 0: never)."""
    if not limit:
        return
    for key, value in metrics.items():
        if key.endswith("/skipped_updates_in_a_row") and value >= limit:
            model = key.split("/", 1)[0]
            raise TooManySkippedUpdates(
                f"Step {step}: the last {int(value)} {model} optimizer steps were skipped because the loss or the "
                f"gradient was not finite (NaN / inf); training.max_skipped_updates = {limit}. Usual causes: a "
                f"learning rate too high (worker.actor.optim.lr, worker.critic.optim.lr), rewards or advantages out "
                f"of range, bf16 overflow. Check the {model}/* and reward/* metrics of the steps before, fix the "
                f"cause and resume from the last checkpoint (training.find_last_checkpoint=true).")
