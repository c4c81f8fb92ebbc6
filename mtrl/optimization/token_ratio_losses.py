"""Policy losses that reshape the token importance ratio instead of PPO's hard clip of the surrogate:
CISPO (``"cispo"``, a clipped, stop-gradient weight on the REINFORCE term) and SAPO (``"sapo"``, a soft
sigmoid gate). The signature is the registry's (``policy_losses`` module docstring).
"""

from typing import Optional, Tuple

import torch

from mtrl.optimization.config import OptimizationConfig
from mtrl.optimization.masked import Metrics, Number
from mtrl.optimization.policy_losses import (
    DEFAULT_SETTINGS,
    aggregate_policy_loss,
    policy_loss_metrics,
    register_policy_loss,
)


def _token_ratio(old_log_probs: torch.Tensor, log_probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    log_ratio = torch.clamp(log_probs - old_log_probs, min=-20.0, max=20.0)
    return log_ratio, torch.exp(log_ratio)


@register_policy_loss("cispo")
def compute_cispo_loss(old_log_probs: torch.Tensor, log_probs: torch.Tensor, advantages: torch.Tensor,
                       response_mask: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float,
                       clip_ratio_dual: float, loss_agg_mode: str = "token-mean",
                       token_mask: Optional[torch.Tensor] = None, *,
                       settings: OptimizationConfig = DEFAULT_SETTINGS,
                       rollout_is_weights: Optional[torch.Tensor] = None,
                       **normalisers: Optional[Number]) -> Tuple[torch.Tensor, Metrics]:
    """CISPO (MiniMax-M1, arXiv 2506.13585):
    ``L_t = -sg(clip(r_t, 1 - clip_ratio_low, 1 + clip_ratio_high)) A_t log pi_t``.

    The clipped ratio is only a weight: unlike PPO no token loses its gradient, a token outside the
    bounds is just weighted by the bound (the paper's setting is a huge ``clip_ratio_low``, i.e. an upper
    clip only). The loss value is that of the REINFORCE term, not of a surrogate. ``r_t`` as PPO's
    (log-ratio clamped to [-20, 20]). Metrics: ``pg_clipfrac`` (ratio outside the bounds), ``ppo_kl``;
    ``pg_clipfrac_lower`` is 0.
    """
    log_ratio, ratio = _token_ratio(old_log_probs, log_probs)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    losses = -clipped_ratio.detach() * advantages * log_probs
    loss = aggregate_policy_loss(losses, response_mask, token_mask, loss_agg_mode, rollout_is_weights, **normalisers)
    return loss, policy_loss_metrics(log_ratio, response_mask, ratio != clipped_ratio)


@register_policy_loss("sapo")
def compute_sapo_loss(old_log_probs: torch.Tensor, log_probs: torch.Tensor, advantages: torch.Tensor,
                      response_mask: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float,
                      clip_ratio_dual: float, loss_agg_mode: str = "token-mean",
                      token_mask: Optional[torch.Tensor] = None, *,
                      settings: OptimizationConfig = DEFAULT_SETTINGS,
                      rollout_is_weights: Optional[torch.Tensor] = None,
                      **normalisers: Optional[Number]) -> Tuple[torch.Tensor, Metrics]:
    """SAPO, soft adaptive policy optimisation (Gao et al. 2025, arXiv 2511.20347):
    ``L_t = -A_t f(r_t)`` with the gate ``f(r) = (4 / tau) sigmoid(tau (r - 1))``, ``tau`` =
    ``settings.sapo_tau_positive`` where ``A_t > 0`` else ``settings.sapo_tau_negative``.

    ``f`` has slope 1 at ``r = 1`` (the on-policy gradient is PPO's) and fades smoothly as the ratio moves
    away, instead of cutting the gradient at a clip bound; a larger ``tau`` fades faster (negative
    tokens, whose ratios can grow without bound, get the larger one). No clip ratio is used. verl
    always aggregates SAPO with ``seq-mean-token-mean``; MTRL follows the actor's ``loss_agg_mode``.
    Metrics: ``ppo_kl``; both clip fractions are 0.
    """
    log_ratio, ratio = _token_ratio(old_log_probs, log_probs)
    tau = torch.where(advantages > 0, advantages.new_tensor(settings.sapo_tau_positive),
                      advantages.new_tensor(settings.sapo_tau_negative))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss = aggregate_policy_loss(-gate * advantages, response_mask, token_mask, loss_agg_mode, rollout_is_weights,
                                 **normalisers)
    return loss, policy_loss_metrics(log_ratio, response_mask)
