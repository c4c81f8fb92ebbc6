"""The `optimization` config section: advantage estimation, divergence control, TPRL, CHORD, DPO, reward models."""

from dataclasses import dataclass, field
from typing import Optional

# Allowed values of the choice keys. Those naming a registry or table of mtrl/optimization/ are kept equal to
# its keys by tests (test_policy_optimization.py, test_registries.py), so that this module needs no torch.
ADVANTAGE_ESTIMATOR_NAMES = ("gae", "grpo", "rloo", "remax", "reinforce_plus_plus")
POLICY_LOSS_NAMES = ("ppo", "gspo", "gspo_token", "cispo", "sapo", "gmpo", "clip_cov", "kl_cov")
DIVERGENCE_PENALTY_NAMES = ("kl", "abs", "mse", "low_var_kl")
CONTROLLER_TYPE_NAMES = ("fixed", "adaptive")
DEPENDENCY_ESTIMATOR_NAMES = ("sampled_k3", "full_kl")
FILTER_SCOPE_NAMES = ("sequence", "batch")
DPO_LOSS_TYPE_NAMES = ("sigmoid", "hinge", "ipo")
ROLLOUT_CORRECTION_NAMES = ("none", "tis", "mis")
ROLLOUT_CORRECTION_LEVEL_NAMES = ("token", "sequence")


@dataclass
class ChordConfig:
    """CHORD (SPEC section 6): mix an SFT loss on expert rows (`dataset.sft_files`) into every RL update."""

    enable: bool = False
    # Fraction of every update batch that is expert rows (added on top of the rollout rows).
    expert_data_ratio: float = 0.2
    mu_warmup_steps: int = 0
    mu_decay_steps: int = 0
    mu_peak: float = 0.1
    mu_valley: float = 0.1
    # CHORD-phi: weight each expert token's loss by sg(p (1 - p)); false = CHORD-mu.
    enable_phi_function: bool = False
    sft_loss_agg_mode: str = "token-mean"


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0


@dataclass
class RewardModelLossConfig:
    # Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin): a constant margin, plus the row's
    # own `margin_key` value when a preference row has one.
    margin: float = 0.0
    margin_key: str = "margin"


@dataclass
class OptimizationConfig:
    # Return / advantage estimation.
    gamma: float = 1.0
    lam: float = 0.95
    advantage_estimator: str = "gae"
    norm_adv_by_std_in_grpo: bool = True
    # The actor's policy-gradient loss, by its name in the policy-loss registry (docs/algorithms.md):
    # "ppo" = dual-clip PPO. The clipped losses (ppo, gspo, gspo_token, cispo, gmpo, clip_cov) take
    # worker.actor's clip ratios; the keys below are the settings of one loss each (verl's defaults).
    policy_loss: str = "ppo"
    # sapo: the gate temperatures of positive- and negative-advantage tokens.
    sapo_tau_positive: float = 1.0
    sapo_tau_negative: float = 1.05
    # clip_cov: detach the gradient of a random clip_cov_ratio of the tokens whose centred
    # advantage x log-prob covariance lies in (clip_cov_lb, clip_cov_ub).
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    # kl_cov: add kl_cov_coef * |log ratio| to the loss of the kl_cov_ratio of the tokens with the
    # largest covariance.
    kl_cov_ratio: float = 0.0002
    kl_cov_coef: float = 0.1

    # Rollout correction (mtrl/optimization/rollout_correction.py): the rollout engine's sampled-token
    # log-probs differ from the actor's old log-probs (other kernels, dtype); every policy loss's per-token
    # loss is multiplied by an importance weight w of r = pi_old / pi_rollout, detached. "tis": w =
    # min(r, rollout_is_cap); "mis": w = r inside [1 / rollout_is_cap, rollout_is_cap], 0 outside. "sequence"
    # level: r is the product over the response (exp of the summed log-ratios), one weight per sequence.
    rollout_correction: str = "none"
    rollout_correction_level: str = "token"
    rollout_is_cap: float = 2.0

    # DAPO soft overlong punishment, added to each training score on the controller (0 = off):
    # a response longer than max_response_length - overlong_buffer_length loses up to
    # overlong_penalty_factor, linearly over the buffer. Validation scores are not shaped.
    overlong_buffer_length: int = 0
    overlong_penalty_factor: float = 1.0

    # Divergence from the reference policy: as a reward penalty (default) or as a loss term.
    disable_divergence: bool = False
    use_divergence_loss: bool = False
    divergence_penalty: str = "kl"
    divergence_coef: float = 0.01
    divergence_type: str = "fixed"
    divergence_target: float = 6.0
    divergence_horizon: float = 10000.0

    # Online filtering: drop prompt groups whose mean `filter_key` reward is outside [low, high]; a step draws
    # further prompts (at most max_filter_tries generations) from the training data, which so lasts fewer steps
    # (training ends after total_epochs of data or max_steps, whichever comes first).
    online_filtering: bool = False
    filter_key: str = "overall"
    filter_low: float = 0.01
    filter_high: float = 0.99
    max_filter_tries: int = 4

    # TPRL token gradient filtering (TGF).
    enable_entropy_filtering: bool = False
    top_p_entropy_tokens: float = 0.2
    enable_perception_filtering: bool = False
    top_p_perception_tokens: float = 0.2
    filter_scope: str = "sequence"

    # TPRL perception pass: patch blackening of every image, then token visual dependency.
    dependency_estimator: str = "sampled_k3"
    # Side of a blackened cell in pixels: a multiple of the vision patch (14 for Qwen2/2.5-VL, 16 for
    # Qwen3-VL); null = the model's own patch size.
    perception_patch_size: Optional[int] = None
    perception_mask_prob: float = 0.5

    # TPRL trajectory advantage shaping (TAS).
    enable_trajectory_reweighting: bool = False
    trajectory_scaling_min: float = 0.8
    trajectory_scaling_max: Optional[float] = None

    use_entropy_penalty: bool = False
    entropy_penalty_coef: float = 0.06
    # Entropy bonus (verl's `actor.entropy_coeff`): loss -= coef * agg(entropy of the full next-token
    # distribution); keeps the policy exploring where it would otherwise collapse. 0 = off (fixed).
    # adaptive: the coefficient starts at entropy_bonus_coef and moves by entropy_bonus_step per step
    # towards holding the mean response-token entropy at entropy_target (Skywork-OR1).
    entropy_bonus_coef: float = 0.0
    entropy_bonus_type: str = "fixed"
    entropy_target: float = 0.5
    entropy_bonus_step: float = 0.005

    chord: ChordConfig = field(default_factory=ChordConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward_model: RewardModelLossConfig = field(default_factory=RewardModelLossConfig)

    @property
    def needs_perception_pass(self) -> bool:
        return self.enable_perception_filtering or self.enable_trajectory_reweighting
