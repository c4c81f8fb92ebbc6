"""The public import surface of MTRL's RL math: ``from mtrl.optimization import policy_optimization as po``.

Each concept has its own module; this one only re-exports their public names (SPEC section 4):

* ``masked`` -- masked sum / mean / var / whiten.
* ``advantages`` -- advantage estimators and their registry (``compute_advantage_return``).
* ``divergence`` -- divergence estimators, the in-reward penalty, the coefficient controllers.
* ``policy_losses`` -- loss aggregation, the policy-loss registry (``"ppo"`` = ``compute_policy_loss``),
  value loss, entropy penalty and bonus; the other registered policy losses in ``sequence_ratio_losses``
  (GSPO, GSPO-token, GMPO), ``token_ratio_losses`` (CISPO, SAPO) and ``covariance_losses`` (Clip-Cov,
  KL-Cov), all registered once this module is imported.
* ``reward_shaping`` -- DAPO's overlong penalty on the controller's scores.
* ``rollout_correction`` -- rollout-vs-actor log-prob mismatch metrics and the truncated / masked
  importance weights of the policy loss; ``apply_rollout_correction`` runs them on a batch.
* ``log_probs`` -- log-prob / entropy / KL kernels over the vocabulary.
* ``tprl`` -- visual dependency, token selection, trajectory scaling; ``apply_tprl`` runs them on a batch.
* ``sft_losses`` -- SFT loss, CHORD mu / phi; ``preference_losses`` -- DPO, Bradley-Terry.

Conventions shared by every function:

* Per-token tensors are ``(batch, response_len)``; ``response_mask`` is 1 on valid response tokens and
  0 on padding (bool, int or float all work).
* Per-token outputs are exactly zero on padding positions (``masked_whiten`` excepted: it transforms
  every element with statistics taken over the mask).
* Advantage estimators, dependency scores and trajectory factors are computed without gradient;
  losses, divergences, log-probs and entropies are differentiable.
* Metric dictionaries use bare names (``pg_clipfrac``, ``entropy_token_fraction``, ...) mapping to
  detached 0-d tensors; the caller adds its prefix (``actor/``) when logging.
* Names accepted by the config (advantage estimators, policy losses, divergence penalties, loss
  aggregation modes) are the keys of ``ADVANTAGE_ESTIMATORS``, ``POLICY_LOSSES``,
  ``DIVERGENCE_PENALTIES`` and ``LOSS_AGG_MODES``.

Formulas and their papers are listed in ``docs/algorithms.md``.
"""

from mtrl.optimization.advantages import (
    ADVANTAGE_ESTIMATORS,
    advantage_estimator_inputs,
    compute_advantage_return,
    compute_gae_advantage_return,
    compute_grpo_outcome_advantage,
    compute_reinforce_plus_plus_outcome_advantage,
    compute_remax_outcome_advantage,
    compute_rloo_outcome_advantage,
    get_advantage_estimator,
    register_advantage_estimator,
)
from mtrl.optimization.covariance_losses import compute_clip_cov_loss, compute_kl_cov_loss
from mtrl.optimization.divergence import (
    DIVERGENCE_PENALTIES,
    AdaptiveDivergenceController,
    DivergenceController,
    FixedDivergenceController,
    apply_divergence_penalty,
    build_divergence_controller,
    compute_divergence,
)
from mtrl.optimization.log_probs import entropy_from_logits, kl_from_logits, log_probs_from_logits
from mtrl.optimization.masked import masked_mean, masked_sum, masked_var, masked_whiten
from mtrl.optimization.policy_losses import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    EntropyBonusController,
    aggregate_loss,
    compute_entropy_bonus,
    compute_entropy_penalty,
    compute_policy_loss,
    compute_value_loss,
    get_policy_loss,
    register_policy_loss,
)
from mtrl.optimization.preference_losses import (
    DPO_LOSS_TYPES,
    compute_bradley_terry_loss,
    compute_dpo_loss,
    sequence_log_probs,
)
from mtrl.optimization.reward_shaping import overlong_penalty
from mtrl.optimization.rollout_correction import (
    ROLLOUT_MAX_METRICS,
    apply_rollout_correction,
    check_rollout_log_probs,
    compute_rollout_is_weights,
    rollout_correction,
    rollout_is_weight_metrics,
    rollout_mismatch_metrics,
)
from mtrl.optimization.sequence_ratio_losses import compute_gmpo_loss, compute_gspo_loss, compute_gspo_token_loss
from mtrl.optimization.sft_losses import compute_chord_mu, compute_chord_phi, compute_sft_loss
from mtrl.optimization.token_ratio_losses import compute_cispo_loss, compute_sapo_loss
from mtrl.optimization.tprl import (
    DEPENDENCY_ESTIMATORS,
    FILTER_SCOPES,
    apply_tprl,
    compute_tprl_token_mask,
    compute_trajectory_metrics,
    compute_trajectory_scaling,
    compute_visual_dependency,
    select_top_tokens,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "advantage_estimator_inputs", "compute_advantage_return", "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage", "compute_reinforce_plus_plus_outcome_advantage",
    "compute_remax_outcome_advantage", "compute_rloo_outcome_advantage", "get_advantage_estimator",
    "register_advantage_estimator",
    "DIVERGENCE_PENALTIES", "AdaptiveDivergenceController", "DivergenceController", "FixedDivergenceController",
    "apply_divergence_penalty", "build_divergence_controller", "compute_divergence",
    "entropy_from_logits", "kl_from_logits", "log_probs_from_logits",
    "masked_mean", "masked_sum", "masked_var", "masked_whiten",
    "LOSS_AGG_MODES", "POLICY_LOSSES", "EntropyBonusController", "aggregate_loss", "compute_entropy_bonus",
    "compute_entropy_penalty", "compute_policy_loss", "compute_value_loss", "get_policy_loss", "register_policy_loss",
    "compute_gspo_loss", "compute_gspo_token_loss", "compute_gmpo_loss", "compute_cispo_loss", "compute_sapo_loss",
    "compute_clip_cov_loss", "compute_kl_cov_loss", "overlong_penalty",
    "ROLLOUT_MAX_METRICS", "apply_rollout_correction", "check_rollout_log_probs", "compute_rollout_is_weights",
    "rollout_correction", "rollout_is_weight_metrics", "rollout_mismatch_metrics",
    "DPO_LOSS_TYPES", "compute_bradley_terry_loss", "compute_dpo_loss", "sequence_log_probs",
    "compute_chord_mu", "compute_chord_phi", "compute_sft_loss",
    "DEPENDENCY_ESTIMATORS", "FILTER_SCOPES", "apply_tprl", "compute_tprl_token_mask", "compute_trajectory_metrics",
    "compute_trajectory_scaling", "compute_visual_dependency", "select_top_tokens",
]
