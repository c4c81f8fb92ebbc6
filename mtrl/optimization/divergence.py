"""Divergence from the reference policy: per-token estimators, the in-reward penalty, and the
controllers that hold (and, adaptive, steer) its coefficient."""

from typing import Callable, Dict, Tuple

import torch

from mtrl.optimization.masked import Number, masked_mean


def _k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs - ref_log_probs


def _absolute(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return (log_probs - ref_log_probs).abs()


def _k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_probs - ref_log_probs) ** 2


def _k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    # The inner clamp keeps exp() finite; the outer one bounds the few huge values (as verl does),
    # which would otherwise dominate the batch mean with a high-variance estimate.
    log_ratio = torch.clamp(ref_log_probs - log_probs, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, min=-10.0, max=10.0)


DIVERGENCE_PENALTIES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": _k1,
    "abs": _absolute,
    "mse": _k2,
    "low_var_kl": _k3,
}


def compute_divergence(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, penalty: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman's k1/k2/k3).

    ``kl``: ``d = log_probs - ref_log_probs`` (k1); ``abs``: ``|d|``; ``mse``: ``d**2 / 2`` (k2);
    ``low_var_kl``: ``exp(-d) + d - 1`` (k3) with ``-d`` clamped to [-20, 20] and the result to [-10, 10].
    Differentiable; the caller masks. As a loss term: ``aggregate_loss(compute_divergence(...), mask, mode)``.
    """
    if penalty not in DIVERGENCE_PENALTIES:
        raise ValueError(f"unknown divergence penalty {penalty!r}; known: {sorted(DIVERGENCE_PENALTIES)}")
    return DIVERGENCE_PENALTIES[penalty](log_probs, ref_log_probs)


@torch.no_grad()
def apply_divergence_penalty(
    token_level_scores: torch.Tensor,
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float,
    penalty: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """In-reward divergence penalty: ``rewards = scores - coef * divergence`` on every valid token.

    ``log_probs`` are the rollout policy's (old) log-probs. Also returns the batch's mean divergence
    (mean over non-empty responses of each response's token mean, a detached 0-d tensor), which is
    what ``AdaptiveDivergenceController.update`` expects (with ``n_steps`` = batch size).
    """
    divergence = compute_divergence(log_probs, ref_log_probs, penalty)
    divergence = torch.where(response_mask.bool(), divergence, torch.zeros_like(divergence))
    rewards = token_level_scores - coef * divergence
    per_response = masked_mean(divergence, response_mask, dim=-1)
    non_empty = response_mask.to(divergence.dtype).sum(dim=-1) > 0
    return rewards, masked_mean(per_response, non_empty)


class DivergenceController:
    """Holds the divergence coefficient ``value``; base of the fixed and adaptive controllers."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_divergence: Number, n_steps: int) -> None:
        """Adjust ``value`` after a batch of ``n_steps`` responses with mean divergence ``current_divergence``."""

    def state_dict(self) -> Dict[str, float]:
        """The coefficient, for checkpoints (the other settings come from the config)."""
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """Restore the coefficient saved by ``state_dict``."""
        self.value = float(state["value"])


class FixedDivergenceController(DivergenceController):
    """Constant coefficient: ``update`` is a no-op."""


class AdaptiveDivergenceController(DivergenceController):
    """Proportional controller steering the measured divergence towards ``target`` (Ziegler et al. 2019).

    ``value *= 1 + clip(current / target - 1, -0.2, 0.2) * n_steps / horizon``.
    Only ``value`` is checkpointed: target and horizon come from the (possibly changed) config.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive divergence control needs target > 0 and horizon > 0, got {target}, {horizon}")
        super().__init__(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_divergence: Number, n_steps: int) -> None:
        """Move ``value`` by at most 20% x n_steps / horizon towards the target divergence."""
        error = min(max(float(current_divergence) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def build_divergence_controller(
    controller_type: str, coef: float, target: float = 6.0, horizon: float = 10000.0
) -> DivergenceController:
    """``fixed`` -> ``FixedDivergenceController(coef)``; ``adaptive`` -> ``AdaptiveDivergenceController``."""
    if controller_type == "fixed":
        return FixedDivergenceController(coef)
    if controller_type == "adaptive":
        return AdaptiveDivergenceController(coef, target, horizon)
    raise ValueError(f"unknown divergence controller type {controller_type!r}; known: ['adaptive', 'fixed']")
