"""Rollout-vs-training mismatch: how far the rollout engine's sampled-token log-probs are from the actor's
old log-probs, and the importance weights that correct the policy loss for it (truncated / masked IS).

The engine samples from pi_rollout (its own kernels, dtype, weights copy); the loss treats the samples as
drawn from pi_old (the actor's forward of the same tokens). With ``r = pi_old / pi_rollout`` per token
(``log r = old_log_probs - rollout_log_probs``), or per sequence ``r = prod_t r_t = exp(sum_t log r_t)``:

* ``tis`` (truncated IS; Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
  training"): ``w = min(r, cap)``.
* ``mis`` (masked IS; Liu, Li et al. 2025, "When speed kills stability"): ``w = r`` where
  ``1 / cap <= r <= cap``, else 0.

The weight multiplies each token's policy-gradient loss (detached; ``policy_losses.aggregate_policy_loss``),
so a masked token keeps its place in the loss denominator like a TPRL-filtered one. Both are verl 0.9.1's
``rollout_corr_helper.compute_rollout_correction_weights``: ``tis`` = ``rollout_is=<level>,
rollout_is_threshold=cap``; ``mis`` = ``rollout_is_threshold="<1/cap>_<cap>"`` (IcePop), which at sequence
level equals verl's Seq-MIS preset (``decoupled_seq_is_rs``: sequence TIS + ``seq_sum_k1`` rejection in
[1/cap, cap]) except that verl's rejection also drops the tokens from the loss denominator.
Weights are per row (a token's or its own sequence's ratio), so any split over ranks or micro-batches
gives the same ones; the controller computes them once per step on the whole batch (``apply_rollout_correction``),
or, on-policy without the old-log-prob pass, the actor's update on each micro-batch from its own forward
(``rollout_correction``; ``worker.actor.old_log_probs``).
"""

import math
from typing import Dict, Mapping, MutableMapping, Optional, Tuple

import torch

from mtrl.optimization.config import OptimizationConfig
from mtrl.optimization.masked import masked_mean, masked_sum

# verl's SAFETY_BOUND: log-ratios are clamped to [-20, 20] before exp.
MAX_LOG_RATIO = 20.0
# The metric of `rollout_correction` that is a maximum over tokens, not a mean.
ROLLOUT_MAX_METRICS = ("rollout/logprob_abs_diff_max",)


def rollout_log_ratio(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, response_mask: torch.Tensor,
                      level: str = "token") -> torch.Tensor:
    """``log(pi_old / pi_rollout)`` per token (``level="token"``), or each sequence's sum over its response
    tokens broadcast to all of its positions (``"sequence"``); (B, R), unclamped."""
    log_ratio = old_log_probs - rollout_log_probs
    if level == "token":
        return log_ratio
    if level == "sequence":
        return masked_sum(log_ratio, response_mask, dim=-1).unsqueeze(-1).expand_as(log_ratio)
    raise ValueError(f"unknown rollout correction level {level!r}; known: ['sequence', 'token']")


def compute_rollout_is_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor,
                               response_mask: torch.Tensor, correction: str, level: str = "token",
                               cap: float = 2.0) -> torch.Tensor:
    """The (B, R) importance weights of ``correction`` (``"tis"`` / ``"mis"``, module docstring) at ``level``,
    0 on padding, without gradient."""
    with torch.no_grad():
        log_ratio = rollout_log_ratio(old_log_probs, rollout_log_probs, response_mask, level)
        ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)) * response_mask.to(log_ratio.dtype)
        if correction == "tis":
            return ratio.clamp(max=cap)
        if correction == "mis":
            return torch.where((ratio >= 1.0 / cap) & (ratio <= cap), ratio, torch.zeros_like(ratio))
        raise ValueError(f"unknown rollout correction {correction!r}; known: ['mis', 'tis']")


def rollout_mismatch_metrics(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor,
                             response_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Over the response tokens: ``logprob_abs_diff_mean`` / ``_max`` (``|old - rollout|``) and
    ``kl_actor_vs_rollout``, the k3 estimate ``mean(r - log r - 1)`` of KL(pi_rollout || pi_old) from the
    rollout's own samples (non-negative, unbiased; verl's ``rollout_corr/k3_kl``)."""
    with torch.no_grad():
        log_ratio = old_log_probs - rollout_log_probs
        valid = response_mask.bool()
        abs_diff = torch.where(valid, log_ratio.abs(), torch.zeros_like(log_ratio))
        return {"logprob_abs_diff_mean": masked_mean(abs_diff, response_mask),
                "logprob_abs_diff_max": abs_diff.max() if abs_diff.numel() else abs_diff.new_zeros(()),
                "kl_actor_vs_rollout": masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, response_mask)}


def rollout_is_weight_metrics(weights: torch.Tensor, old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor,
                              response_mask: torch.Tensor, level: str, cap: float) -> Dict[str, torch.Tensor]:
    """Over the response tokens (a sequence-level weight counts once per token): ``is_weight_mean`` (verl's
    ``rollout_is_mean``), ``ratio_fraction_high`` / ``_low`` (the token's or its sequence's ratio above
    ``cap`` / below ``1 / cap``: truncated by tis, masked by mis) and ``masked_fraction`` (weight 0)."""
    with torch.no_grad():
        log_ratio = rollout_log_ratio(old_log_probs, rollout_log_probs, response_mask, level)
        log_cap = math.log(cap)
        return {"is_weight_mean": masked_mean(weights, response_mask),
                "ratio_fraction_high": masked_mean((log_ratio > log_cap).float(), response_mask),
                "ratio_fraction_low": masked_mean((log_ratio < -log_cap).float(), response_mask),
                "masked_fraction": masked_mean((weights == 0).float(), response_mask)}


def rollout_correction(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, response_mask: torch.Tensor,
                       opt: OptimizationConfig) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
    """The weights of ``opt.rollout_correction`` (None when it is off) and the metrics under their logged names
    (``rollout/...``, and ``rollout_corr/...`` with the weights), computed in fp64 on any set of whole rows:
    every metric is a mean over the response tokens but ``ROLLOUT_MAX_METRICS``, a maximum."""
    # fp64: matched engines differ by ~1e-7 per token, whose k3 term (~l^2 / 2) fp32 rounds to 0.
    old, rollout, mask = (x.double() for x in (old_log_probs, rollout_log_probs, response_mask))
    metrics = {f"rollout/{k}": v for k, v in rollout_mismatch_metrics(old, rollout, mask).items()}
    if opt.rollout_correction == "none":
        return None, metrics
    level, cap = opt.rollout_correction_level, opt.rollout_is_cap
    weights = compute_rollout_is_weights(old, rollout, mask, opt.rollout_correction, level, cap)
    metrics.update({f"rollout_corr/{k}": v
                    for k, v in rollout_is_weight_metrics(weights, old, rollout, mask, level, cap).items()})
    return weights.float(), metrics


def check_rollout_log_probs(tensors: Mapping[str, torch.Tensor], opt: OptimizationConfig) -> bool:
    """Whether the batch has the engine's ``rollout_log_probs``; raises when the correction is on without them."""
    if "rollout_log_probs" in tensors:
        return True
    if opt.rollout_correction != "none":
        raise RuntimeError(f"optimization.rollout_correction={opt.rollout_correction} needs the rollout "
                           "engine's `rollout_log_probs` (RolloutEngine.generate); this batch has none")
    return False


def apply_rollout_correction(tensors: MutableMapping[str, torch.Tensor], opt: OptimizationConfig) -> Dict[str, float]:
    """The controller's step after the old-log-prob pass, on the whole batch's ``tensors``: the mismatch
    metrics (``rollout/...``) when the batch has ``rollout_log_probs``; with ``opt.rollout_correction`` on,
    also the weights (``tensors["rollout_is_weights"]``, read by the actor's policy loss) and their
    metrics (``rollout_corr/...``). (Without the pass, on-policy, the actor's update computes the same from
    its own forward: ``ParallelPolicyAgent``.)"""
    if not check_rollout_log_probs(tensors, opt):
        return {}
    weights, metrics = rollout_correction(tensors["old_log_probs"], tensors["rollout_log_probs"],
                                          tensors["response_mask"], opt)
    if weights is not None:
        tensors["rollout_is_weights"] = weights
    return {k: float(v) for k, v in metrics.items()}
