"""Clip-Cov (``"clip_cov"``) and KL-Cov (``"kl_cov"``): entropy-aware PPO variants that restrain the few
tokens whose advantage and log-probability covary most (Cui et al. 2025, "The Entropy Mechanism of
Reinforcement Learning for Reasoning Language Models", arXiv 2505.22617). Those tokens drive the
collapse of the policy entropy; detaching them (Clip-Cov) or pulling them back with a KL term (KL-Cov)
keeps the policy exploring. The signature is the registry's (``policy_losses`` module docstring).

The covariance ``C_t = (A_t - mean A) (log pi_t - mean log pi)`` (means over the micro-batch) and the
number of tokens selected are taken over the kept tokens (TPRL's ``token_mask``): only tokens that
receive gradient can move the entropy, so a selection among filtered ones would do nothing. As in verl
the selection is per micro-batch.
"""

from typing import Optional, Tuple

import torch

from mtrl.optimization.config import OptimizationConfig
from mtrl.optimization.masked import Metrics, Number, masked_mean
from mtrl.optimization.policy_losses import (
    DEFAULT_SETTINGS,
    aggregate_policy_loss,
    kept_tokens,
    policy_loss_metrics,
    register_policy_loss,
)


def covariance(advantages: torch.Tensor, log_probs: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``C_t`` over the ``kept`` tokens (no gradient); other positions hold values that mean nothing."""
    with torch.no_grad():
        return (advantages - masked_mean(advantages, kept)) * (log_probs - masked_mean(log_probs, kept))


def selection_count(ratio: float, kept: torch.Tensor) -> int:
    """``max(1, int(ratio * kept tokens))``: how many tokens a covariance loss restrains."""
    return max(int(ratio * int(kept.sum())), 1)


@register_policy_loss("clip_cov")
def compute_clip_cov_loss(old_log_probs: torch.Tensor, log_probs: torch.Tensor, advantages: torch.Tensor,
                          response_mask: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float,
                          clip_ratio_dual: float, loss_agg_mode: str = "token-mean",
                          token_mask: Optional[torch.Tensor] = None, *,
                          settings: OptimizationConfig = DEFAULT_SETTINGS,
                          rollout_is_weights: Optional[torch.Tensor] = None,
                          **normalisers: Optional[Number]) -> Tuple[torch.Tensor, Metrics]:
    """Clip-Cov: PPO's clipped surrogate ``max(-A r, -A clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))``
    (no dual clip, ``r`` unclamped as in verl), with the gradient detached (loss set to 0) on
    ``selection_count(settings.clip_cov_ratio)`` tokens drawn uniformly at random (``torch.randperm``
    on the default generator, verl's draw) among the kept tokens not already clipped whose covariance
    lies in ``(settings.clip_cov_lb, settings.clip_cov_ub)``.
    Metrics: ``pg_clipfrac``: fraction of valid tokens detached; ``ppo_kl``; ``pg_clipfrac_lower`` is 0.
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    kept = kept_tokens(response_mask, token_mask)
    cov = covariance(advantages, log_probs, kept)
    candidates = kept & ~(clipped > unclipped) & (cov > settings.clip_cov_lb) & (cov < settings.clip_cov_ub)
    positions = torch.nonzero(candidates)
    keep_gradient = torch.ones_like(advantages)
    if len(positions):  # no draw without candidates, so the generator's stream stays verl's
        chosen = positions[torch.randperm(len(positions))[:selection_count(settings.clip_cov_ratio, kept)]]
        keep_gradient[chosen[:, 0], chosen[:, 1]] = 0
    loss = aggregate_policy_loss(torch.maximum(unclipped, clipped) * keep_gradient, response_mask, token_mask,
                                 loss_agg_mode, rollout_is_weights, **normalisers)
    return loss, policy_loss_metrics(log_ratio, response_mask, keep_gradient == 0)


@register_policy_loss("kl_cov")
def compute_kl_cov_loss(old_log_probs: torch.Tensor, log_probs: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float,
                        clip_ratio_dual: float, loss_agg_mode: str = "token-mean",
                        token_mask: Optional[torch.Tensor] = None, *,
                        settings: OptimizationConfig = DEFAULT_SETTINGS,
                        rollout_is_weights: Optional[torch.Tensor] = None,
                        **normalisers: Optional[Number]) -> Tuple[torch.Tensor, Metrics]:
    """KL-Cov: the unclipped policy gradient ``-A r`` (``r`` unclamped, no clip ratio used), plus
    ``settings.kl_cov_coef * |log r|`` on the ``selection_count(settings.kl_cov_ratio)`` kept tokens of
    largest covariance (``torch.topk``).
    Metrics: ``pg_clipfrac``: fraction of valid tokens penalised; ``ppo_kl`` (k1, like every loss: verl
    logs the mean ``|log r|`` under that name here); ``pg_clipfrac_lower`` is 0.
    """
    log_ratio = log_probs - old_log_probs
    surrogate = -advantages * torch.exp(log_ratio)
    kept = kept_tokens(response_mask, token_mask)
    penalised = torch.zeros_like(kept)
    if kept.any():
        cov = covariance(advantages, log_probs, kept)[kept]
        top = torch.topk(cov, selection_count(settings.kl_cov_ratio, kept)).indices
        penalised.view(-1)[torch.nonzero(kept.view(-1)).squeeze(-1)[top]] = True
    losses = torch.where(penalised, surrogate + settings.kl_cov_coef * log_ratio.abs(), surrogate)
    loss = aggregate_policy_loss(losses, response_mask, token_mask, loss_agg_mode, rollout_is_weights, **normalisers)
    return loss, policy_loss_metrics(log_ratio, response_mask, penalised)
