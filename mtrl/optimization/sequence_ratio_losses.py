"""Policy losses whose importance ratio is one number per sequence: GSPO (``"gspo"``), GSPO-token
(``"gspo_token"``) and geometric-mean PPO (``"gmpo"``). The signature is the registry's
(``policy_losses`` module docstring).

With TPRL's ``token_mask`` a filtered token is left out of its sequence's ratio (the mean of log-ratios is
over the kept tokens) and of the gradient, and stays in the loss normaliser like with every loss: the
clip then bounds how far the update has moved the tokens it trains (docs/algorithms.md gives the reason).
"""

from typing import Optional, Tuple

import torch

from mtrl.optimization.config import OptimizationConfig
from mtrl.optimization.masked import Metrics, Number, masked_sum
from mtrl.optimization.policy_losses import (
    DEFAULT_SETTINGS,
    aggregate_policy_loss,
    kept_tokens,
    policy_loss_metrics,
    register_policy_loss,
)

# verl clamps the sequence log-ratio from above only, before exp (a long, improbable sequence may have
# a very negative one, which exp takes to 0 without harm).
MAX_SEQUENCE_LOG_RATIO = 10.0


def sequence_mean(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` mean of ``values`` over each row's ``kept`` tokens (0 for a row without any)."""
    return masked_sum(values, kept, dim=-1) / kept.sum(dim=-1).clamp(min=1).to(values.dtype)


def _gspo(old_log_probs: torch.Tensor, log_probs: torch.Tensor, advantages: torch.Tensor,
          response_mask: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float, loss_agg_mode: str,
          token_mask: Optional[torch.Tensor], token_level: bool, rollout_is_weights: Optional[torch.Tensor],
          normalisers: dict) -> Tuple[torch.Tensor, Metrics]:
    log_ratio = log_probs - old_log_probs
    kept = kept_tokens(response_mask, token_mask)
    sequence_log_ratio = sequence_mean(log_ratio, kept).unsqueeze(-1)
    if token_level:
        # Value s_i on every token, gradient that of the token's own log-prob: s_i * grad log pi_t.
        sequence_log_ratio = log_probs - log_probs.detach() + sequence_log_ratio.detach()
    ratio = torch.exp(torch.clamp(sequence_log_ratio, max=MAX_SEQUENCE_LOG_RATIO)).expand_as(log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = aggregate_policy_loss(torch.maximum(unclipped, clipped), response_mask, token_mask, loss_agg_mode,
                                 rollout_is_weights, **normalisers)
    return loss, policy_loss_metrics(log_ratio, response_mask, clipped > unclipped)


@register_policy_loss("gspo")
def compute_gspo_loss(old_log_probs: torch.Tensor, log_probs: torch.Tensor, advantages: torch.Tensor,
                      response_mask: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float,
                      clip_ratio_dual: float, loss_agg_mode: str = "token-mean",
                      token_mask: Optional[torch.Tensor] = None, *,
                      settings: OptimizationConfig = DEFAULT_SETTINGS,
                      rollout_is_weights: Optional[torch.Tensor] = None,
                      **normalisers: Optional[Number]) -> Tuple[torch.Tensor, Metrics]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): the sequence-level importance ratio
    ``s_i = exp(mean_t log(pi / pi_old))`` (the geometric mean of the token ratios), clipped per sequence:
    token ``t`` of sequence ``i`` gets ``max(-A_t s_i, -A_t clip(s_i, 1 - clip_ratio_low, 1 + clip_ratio_high))``,
    aggregated by ``loss_agg_mode`` (the paper's objective is ``seq-mean-token-mean`` with one advantage
    per sequence). The gradient reaches every kept token through ``s_i``; with token-varying advantages
    each token's loss moves the whole sequence (``gspo_token`` does not). No dual clip.
    Metrics: ``pg_clipfrac`` (clipped term active), ``ppo_kl``; ``pg_clipfrac_lower`` is 0.
    """
    return _gspo(old_log_probs, log_probs, advantages, response_mask, clip_ratio_low, clip_ratio_high,
                 loss_agg_mode, token_mask, False, rollout_is_weights, normalisers)


@register_policy_loss("gspo_token")
def compute_gspo_token_loss(old_log_probs: torch.Tensor, log_probs: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float,
                            clip_ratio_dual: float, loss_agg_mode: str = "token-mean",
                            token_mask: Optional[torch.Tensor] = None, *,
                            settings: OptimizationConfig = DEFAULT_SETTINGS,
                            rollout_is_weights: Optional[torch.Tensor] = None,
                            **normalisers: Optional[Number]) -> Tuple[torch.Tensor, Metrics]:
    """GSPO-token (arXiv 2507.18071, section 4.3; verl's ``"gspo"``): the per-token ratio
    ``s_{i,t} = sg(s_i) pi_t / sg(pi_t)``, whose value is the sequence ratio ``s_i`` and whose gradient is
    ``s_i grad log pi_t``, clipped like PPO per token. With one advantage per sequence it equals ``gspo``
    in value and gradient; with token-level advantages each token is weighted by its own.
    Metrics: ``pg_clipfrac``, ``ppo_kl``; ``pg_clipfrac_lower`` is 0.
    """
    return _gspo(old_log_probs, log_probs, advantages, response_mask, clip_ratio_low, clip_ratio_high,
                 loss_agg_mode, token_mask, True, rollout_is_weights, normalisers)


@register_policy_loss("gmpo")
def compute_gmpo_loss(old_log_probs: torch.Tensor, log_probs: torch.Tensor, advantages: torch.Tensor,
                      response_mask: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float,
                      clip_ratio_dual: float, loss_agg_mode: str = "token-mean",
                      token_mask: Optional[torch.Tensor] = None, *,
                      settings: OptimizationConfig = DEFAULT_SETTINGS,
                      rollout_is_weights: Optional[torch.Tensor] = None,
                      **normalisers: Optional[Number]) -> Tuple[torch.Tensor, Metrics]:
    """Geometric-mean policy optimisation (GMPO, Zhao et al. 2025, arXiv 2507.20673; verl's ``"geo_mean"``).

    Each token's log-ratio ``l_t`` is clipped in log space towards the advantage's sign,
    ``l'_t = sgn(A) min(sgn(A) l_t, sgn(A) clip(l_t, -clip_ratio_low, clip_ratio_high))``; the sequence
    ratio is their geometric mean ``r_i = exp(mean_t l'_t)`` and the sequence loss ``L_i = -mean_t(A_t) r_i``,
    put on each of its tokens and aggregated by ``loss_agg_mode``: ``seq-mean-token-mean`` is the paper's
    ``mean_i L_i`` (verl always takes that mean; MTRL follows the actor's mode like every loss).
    Metrics: ``pg_clipfrac`` / ``pg_clipfrac_lower``: fraction of tokens whose log-ratio was clipped with
    ``A > 0`` / ``A < 0``; ``ppo_kl``.
    """
    log_ratio = log_probs - old_log_probs
    kept = kept_tokens(response_mask, token_mask)
    sign = torch.sign(advantages)
    clamped = torch.clamp(log_ratio, -clip_ratio_low, clip_ratio_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clamped)
    ratio = torch.exp(sequence_mean(pessimistic, kept))
    sequence_loss = -sequence_mean(advantages, kept) * ratio
    if rollout_is_weights is not None:
        # One loss per sequence, so one weight: the geometric mean of its tokens' (verl's geo_mean; a
        # sequence-level weight is its own mean).
        log_weights = torch.log(rollout_is_weights.detach().clamp(min=1e-10))
        rollout_is_weights = torch.exp(sequence_mean(log_weights, kept)).unsqueeze(-1).expand_as(log_probs)
    loss = aggregate_policy_loss(sequence_loss.unsqueeze(-1).expand_as(log_probs), response_mask, token_mask,
                                 loss_agg_mode, rollout_is_weights, **normalisers)
    was_clipped = log_ratio != clamped
    return loss, policy_loss_metrics(log_ratio, response_mask, was_clipped & (advantages > 0),
                                     was_clipped & (advantages < 0))
