"""All RL formulas of MTRL, as small pure torch functions (no I/O, no config objects).

Conventions shared by every function here:

* Per-token tensors are ``(batch, response_len)``; ``response_mask`` is 1 on valid response tokens and
  0 on padding (bool, int or float all work).
* Per-token outputs are exactly zero on padding positions (``masked_whiten`` excepted: it transforms
  every element with statistics taken over the mask).
* Advantage estimators, dependency scores and trajectory factors are computed without gradient;
  losses, divergences, log-probs and entropies are differentiable.
* Metric dictionaries use bare names (``pg_clipfrac``, ``entropy_token_fraction``, ...) mapping to
  detached 0-d tensors; the caller adds its prefix (``actor/``) when logging.
* Names accepted by the config (advantage estimators, divergence penalties, loss aggregation modes)
  are the keys of ``ADVANTAGE_ESTIMATORS``, ``DIVERGENCE_PENALTIES`` and ``LOSS_AGG_MODES``.

Formulas and their papers are listed in ``docs/algorithms.md``.
"""

import inspect
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

Number = Union[int, float, torch.Tensor]
Metrics = Dict[str, torch.Tensor]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
FILTER_SCOPES = ("sequence", "batch")
DEPENDENCY_ESTIMATORS = ("sampled_k3", "full_kl")

# Rows of logits handled at once by the vocabulary-wide functions: bounds the fp32 working copy
# (1024 x 152k vocab x 4 bytes = 0.6 GB) whatever the batch and sequence length.
_VOCAB_CHUNK_TOKENS = 1024


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------

AdvantageEstimator = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
ADVANTAGE_ESTIMATORS: Dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator registering an estimator under ``name`` (the value of ``optimization.advantage_estimator``).

    An estimator returns ``(advantages, returns)``, both ``(batch, response_len)``.
    """

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name``; ValueError listing the known names otherwise."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def compute_advantage_return(name: str, **inputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run estimator ``name`` on the subset of ``inputs`` its signature names.

    Lets a trainer hand every quantity it has (``token_level_rewards``, ``response_mask``,
    ``values``, ``index``, ``reward_baselines``, ``gamma``, ``lam``, ``epsilon``, ``norm_adv_by_std``)
    to whichever estimator the config picked. A required input that is missing is a ValueError.
    """
    fn = get_advantage_estimator(name)
    params = inspect.signature(fn).parameters
    missing = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty and p not in inputs]
    if missing:
        raise ValueError(f"advantage estimator {name!r} needs {missing}")
    return fn(**{k: v for k, v in inputs.items() if k in params})


@register_advantage_estimator("gae")
@torch.no_grad()
def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the valid tokens.

    Backwards over t: ``delta_t = r_t + gamma * V_next - V_t`` and ``A_t = delta_t + gamma * lam * A_next``,
    where ``V_next`` / ``A_next`` belong to the next *valid* token (0 after the last one): masked
    positions are skipped, carrying the recursion across them. ``returns = A + V`` (before whitening);
    the advantages are then whitened over the mask. Both outputs are 0 on padding.
    """
    mask = response_mask.to(values.dtype)
    batch, length = token_level_rewards.shape
    next_value = values.new_zeros(batch)
    next_advantage = values.new_zeros(batch)
    advantages = torch.zeros_like(values)
    for t in reversed(range(length)):
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        m = mask[:, t]
        next_value = m * values[:, t] + (1 - m) * next_value
        next_advantage = m * advantage + (1 - m) * next_advantage
        advantages[:, t] = next_advantage
    returns = (advantages + values) * mask
    return masked_whiten(advantages, mask) * mask, returns


def _group_statistics(scores: torch.Tensor, index: np.ndarray):
    """Per-row group size, group mean and group sum of squared deviations, in float64."""
    index = np.asarray(index)
    if index.shape != (scores.shape[0],):
        raise ValueError(f"index has shape {index.shape}, expected ({scores.shape[0]},): one group id per row")
    _, inverse = np.unique(index, return_inverse=True)
    group = torch.as_tensor(inverse.reshape(-1), device=scores.device, dtype=torch.long)
    n_groups = int(group.max()) + 1 if group.numel() else 0
    x = scores.double()
    size = x.new_zeros(n_groups).index_add_(0, group, torch.ones_like(x))
    mean = x.new_zeros(n_groups).index_add_(0, group, x) / size
    sq_dev = x.new_zeros(n_groups).index_add_(0, group, (x - mean[group]) ** 2)
    return size[group], mean[group], sq_dev[group]



def _broadcast_group_advantage(advantage: torch.Tensor, size: torch.Tensor, token_level_rewards: torch.Tensor,
                               response_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence group advantages (0 for groups of one) on every valid token; returns == advantages."""
    advantage = torch.where(size > 1, advantage, torch.zeros_like(advantage))
    advantages = advantage.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask.to(token_level_rewards.dtype)
    return advantages, advantages.clone()

@register_advantage_estimator("grpo")
@torch.no_grad()
def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantage (DeepSeekMath): each response's total reward against its group's.

    ``index`` holds one group id (any hashable numpy values, e.g. prompt uids) per row.
    ``A_i = (R_i - mean_g) / (std_g + epsilon)`` with the unbiased group std, or ``R_i - mean_g`` when
    ``norm_adv_by_std`` is False (Dr.GRPO). A group of one has no baseline and gets advantage 0;
    a group of equal rewards also gets 0. Broadcast over the valid tokens; returns == advantages.
    """
    scores = token_level_rewards.sum(dim=-1)
    size, mean, sq_dev = _group_statistics(scores, index)
    advantage = scores.double() - mean
    if norm_adv_by_std:
        std = torch.sqrt(sq_dev / (size - 1).clamp(min=1))
        advantage = advantage / (std + epsilon)
    return _broadcast_group_advantage(advantage, size, token_level_rewards, response_mask)


@register_advantage_estimator("rloo")
@torch.no_grad()
def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): baseline = mean reward of the *other* group members.

    ``A_i = R_i - (sum_g - R_i) / (n - 1) = (R_i - mean_g) * n / (n - 1)``. A group of one has no
    other member and gets advantage 0 (verl uses R_i there). ``epsilon`` is accepted for signature
    parity with GRPO and unused: there is no division by a data-dependent quantity.
    Broadcast over the valid tokens; returns == advantages.
    """
    scores = token_level_rewards.sum(dim=-1)
    size, mean, _ = _group_statistics(scores, index)
    advantage = (scores.double() - mean) * size / (size - 1).clamp(min=1)
    return _broadcast_group_advantage(advantage, size, token_level_rewards, response_mask)


@register_advantage_estimator("reinforce_plus_plus")
@torch.no_grad()
def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): discounted return-to-go per token, whitened over the whole batch.

    ``G_t = r_t + gamma * G_next`` over the valid tokens (masked positions are skipped and carry
    ``G`` across them); advantages are ``G`` whitened over the mask. Both are 0 on padding.
    """
    mask = response_mask.to(token_level_rewards.dtype)
    running = token_level_rewards.new_zeros(token_level_rewards.shape[0])
    returns = torch.zeros_like(token_level_rewards)
    for t in reversed(range(token_level_rewards.shape[1])):
        candidate = token_level_rewards[:, t] + gamma * running
        m = mask[:, t]
        returns[:, t] = candidate * m
        running = m * candidate + (1 - m) * running
    return masked_whiten(returns, mask) * mask, returns


@register_advantage_estimator("remax")
@torch.no_grad()
def compute_remax_outcome_advantage(
    token_level_rewards: torch.Tensor,
    reward_baselines: torch.Tensor,
    response_mask: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ReMax (Li et al. 2023): return-to-go minus the reward of the greedy response to the same prompt.

    ``returns_t = sum_{s >= t} r_s`` (undiscounted, valid tokens only); ``A_t = returns_t - b``
    with ``reward_baselines`` = b, shape (batch,). Both are 0 on padding.
    """
    mask = response_mask.to(token_level_rewards.dtype)
    returns = (token_level_rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask
    advantages = returns - reward_baselines.to(returns.dtype).unsqueeze(-1) * mask
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# Divergence from the reference policy
# ---------------------------------------------------------------------------------------------


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


class EntropyBonusController:
    """The entropy bonus coefficient, fixed or steered towards a target entropy.

    ``fixed``: ``coefficient(entropy)`` is always ``coef``. ``adaptive`` (adaptive entropy control,
    Skywork-OR1, arXiv 2505.22312): after each batch with mean response-token entropy ``H``,
    ``value = max(0, value + step * sign(target - H))``, and the bonus applies only while ``H < target``
    (coefficient 0 above it). The bonus then holds the entropy near the target: it cannot drive the
    policy to noise (as a fixed coefficient large enough to stop a collapse can), nor let it collapse.
    Only ``value`` is checkpointed; target and step come from the config.
    """

    def __init__(self, controller_type: str, coef: float, target: float = 0.5, step: float = 0.005):
        if controller_type not in ("fixed", "adaptive"):
            raise ValueError(f"unknown entropy bonus controller {controller_type!r}; known: ['adaptive', 'fixed']")
        if controller_type == "adaptive" and (target <= 0 or step <= 0):
            raise ValueError(f"adaptive entropy control needs target > 0 and step > 0, got {target}, {step}")
        self.adaptive = controller_type == "adaptive"
        self.value = float(coef)
        self.target = float(target)
        self.step = float(step)

    def coefficient(self, current_entropy: Number) -> float:
        """The coefficient for a batch whose mean response-token entropy is ``current_entropy``
        (adaptive: updates ``value`` first)."""
        if not self.adaptive:
            return self.value
        below = float(current_entropy) < self.target
        self.value = max(0.0, self.value + (self.step if below else -self.step))
        return self.value if below else 0.0

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


# ---------------------------------------------------------------------------------------------
# Loss aggregation and losses
# ---------------------------------------------------------------------------------------------


def aggregate_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    mode: str,
    global_token_count: Optional[Number] = None,
    global_seq_count: Optional[Number] = None,
    *,
    loss_scale_factor: Optional[float] = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``(batch, len)`` to a scalar.

    Modes (a "sequence" counts only if it has at least one valid token):

    * ``token-mean``: sum over valid tokens / number of valid tokens (DAPO).
    * ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
    * ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (original GRPO).
    * ``seq-mean-token-sum-norm``: sum over valid tokens / number of sequences / ``loss_scale_factor``
      (Dr.GRPO; the factor defaults to ``loss_mask.shape[-1]``, verl's choice).

    Micro-batch and data-parallel invariance. Without the optional counts the denominators are
    those of ``loss_mat`` itself. To make the gradient of a mini-batch independent of how it is cut
    into micro-batches and ranks:

    1. Before the micro-batch loop, count over the *whole mini-batch on all data-parallel ranks*
       (all-reduce SUM of the per-rank counts): ``global_token_count`` = number of valid tokens,
       ``global_seq_count`` = number of sequences with at least one valid token.
    2. Pass both to every micro-batch's call (each mode uses the one it needs). For
       ``seq-mean-token-sum-norm`` also pass a constant ``loss_scale_factor`` (e.g. the max response
       length) if micro-batches may be padded to different widths.
    3. The returned micro-batch losses then SUM (over micro-batches and over ranks) to the loss of
       the whole mini-batch: backpropagate each one and accumulate gradients without dividing by the
       number of micro-batches. FSDP/DDP *average* gradients across ranks, so multiply each loss by
       the world size before ``backward()`` to obtain the gradient of the mini-batch loss.
    """
    # Token counts reach 1e5+: bf16 could not even represent them exactly, so reduce in fp32 or wider.
    mask = loss_mask.to(_compute_dtype(loss_mat.dtype))

    def count(local: torch.Tensor, given: Optional[Number]) -> torch.Tensor:
        # An empty (micro-)batch gives 0 / 1 = 0 instead of NaN.
        total = local if given is None else torch.as_tensor(given, dtype=mask.dtype, device=mask.device)
        return total.clamp(min=1)

    if mode == "token-mean":
        return masked_sum(loss_mat, mask) / count(mask.sum(), global_token_count)
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {list(LOSS_AGG_MODES)}")
    tokens_per_seq = mask.sum(dim=-1)
    seq_loss = masked_sum(loss_mat, mask, dim=-1)
    if mode == "seq-mean-token-mean":
        seq_loss = seq_loss / tokens_per_seq.clamp(min=1)
    loss = seq_loss.sum() / count((tokens_per_seq > 0).to(mask.dtype).sum(), global_seq_count)
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def compute_policy_loss(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_dual: float,
    loss_agg_mode: str = "token-mean",
    token_mask: Optional[torch.Tensor] = None,
    *,
    global_token_count: Optional[Number] = None,
    global_seq_count: Optional[Number] = None,
    loss_scale_factor: Optional[float] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Clipped PPO surrogate with dual clip (Schulman et al. 2017; Ye et al. 2020).

    ``r = exp(log_probs - old_log_probs)`` (log-ratio clamped to [-20, 20]);
    per token ``L = max(-A r, -A clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))`` and, where A < 0,
    ``L = min(L, -A clip_ratio_dual)`` so a very large ratio cannot make a negative-advantage token's
    loss unbounded. ``token_mask`` (1 = keep, the TPRL filter) zeroes the loss of filtered tokens,
    which still count in the denominator (``response_mask``). Aggregated with ``aggregate_loss``;
    the keyword-only counts are its invariance normalisers.

    Metrics, over all valid tokens: ``pg_clipfrac`` (fraction where the clipped term is active),
    ``pg_clipfrac_lower`` (fraction where the dual clip is active), ``ppo_kl`` (mean of
    ``old_log_probs - log_probs``, the k1 estimate of KL(pi_old || pi)).
    """
    if clip_ratio_dual <= 1.0:
        raise ValueError(f"clip_ratio_dual must be > 1 (dual-clip PPO), got {clip_ratio_dual}")
    log_ratio = torch.clamp(log_probs - old_log_probs, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    ppo_losses = torch.maximum(unclipped, clipped)
    dual_bound = -advantages * clip_ratio_dual
    negative = advantages < 0
    losses = torch.where(negative, torch.minimum(ppo_losses, dual_bound), ppo_losses)
    if token_mask is not None:
        losses = losses * token_mask.to(losses.dtype)
    loss = aggregate_loss(losses, response_mask, loss_agg_mode, global_token_count, global_seq_count,
                          loss_scale_factor=loss_scale_factor)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
            "pg_clipfrac_lower": masked_mean((negative & (ppo_losses > dual_bound)).float(), response_mask),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    *,
    global_token_count: Optional[Number] = None,
    global_seq_count: Optional[Number] = None,
    loss_scale_factor: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ``0.5 * agg(max((v - R)^2, (clip(v, V_old +- c) - R)^2))``.

    ``values`` are the critic's predictions at rollout time; the new prediction may move at most
    ``cliprange_value`` from them before the clipped term takes over. Returns the loss and the
    fraction of valid tokens where the clipped term is the larger (a detached 0-d tensor).
    """
    vpreds_clipped = torch.clamp(vpreds, min=values - cliprange_value, max=values + cliprange_value)
    unclipped = (vpreds - returns) ** 2
    clipped = (vpreds_clipped - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped, clipped), response_mask, loss_agg_mode,
                                global_token_count, global_seq_count, loss_scale_factor=loss_scale_factor)
    clipfrac = masked_mean((clipped > unclipped).float(), response_mask).detach()
    return loss, clipfrac


def compute_entropy_penalty(
    log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    *,
    coef: float = 1.0,
    global_token_count: Optional[Number] = None,
    global_seq_count: Optional[Number] = None,
    loss_scale_factor: Optional[float] = None,
) -> torch.Tensor:
    """Entropy penalty term ``coef * agg(-log_probs)``: the sampled-token estimate of the policy entropy.

    Added to the loss when ``optimization.use_entropy_penalty`` is on, with
    ``coef = entropy_penalty_coef`` — pass it here or multiply the default ``coef=1`` result
    yourself (useful to log the unscaled term), not both. Same aggregation and normalisers as the
    policy loss.
    """
    return coef * aggregate_loss(-log_probs, response_mask, loss_agg_mode, global_token_count, global_seq_count,
                                 loss_scale_factor=loss_scale_factor)


def compute_entropy_bonus(entropy: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", *,
                          coef: float = 1.0, **normalisers: Optional[Number]) -> torch.Tensor:
    """Entropy bonus term ``-coef * agg(entropy)`` (verl's ``entropy_coeff``), a loss to add.

    ``entropy`` is the full next-token entropy per response token (``entropy_from_logits``, with its
    graph), so unlike the sampled-token penalty above its gradient raises the entropy: it keeps a
    policy exploring instead of collapsing onto one answer before the reward can tell answers apart.
    Added when ``optimization.entropy_bonus_coef`` > 0, with the policy loss's aggregation and normalisers.
    """
    return -coef * aggregate_loss(entropy, response_mask, loss_agg_mode, **normalisers)


# ---------------------------------------------------------------------------------------------
# Log-probs and entropy from logits
# ---------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are promoted to fp32; fp64 stays fp64 (gradcheck, reference computations).
    return torch.promote_types(dtype, torch.float32)


class _LabelLogProb(torch.autograd.Function):
    """log softmax(logits)[label], in chunks, saving only the logits for backward.

    Autograd through ``log_softmax(logits.float())`` would keep a full fp32 copy of the logits
    (batch x len x vocab) alive until backward; here backward recomputes the softmax chunk by chunk.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1, 1)
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
        for start in range(0, flat.shape[0], _VOCAB_CHUNK_TOKENS):
            chunk = flat[start:start + _VOCAB_CHUNK_TOKENS].to(dtype)
            picked = chunk.gather(-1, flat_labels[start:start + _VOCAB_CHUNK_TOKENS]).squeeze(-1)
            out[start:start + _VOCAB_CHUNK_TOKENS] = picked - torch.logsumexp(chunk, dim=-1)
        ctx.save_for_backward(logits, labels)
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1, 1)
        dtype = _compute_dtype(logits.dtype)
        flat_grad_out = grad_out.reshape(-1, 1).to(dtype)
        grad = torch.empty_like(flat)
        for start in range(0, flat.shape[0], _VOCAB_CHUNK_TOKENS):
            rows = slice(start, start + _VOCAB_CHUNK_TOKENS)
            g = flat_grad_out[rows]
            # d log p_y / d z = onehot(y) - softmax(z)
            chunk_grad = -torch.softmax(flat[rows].to(dtype), dim=-1) * g
            chunk_grad.scatter_add_(-1, flat_labels[rows], g)
            grad[rows] = chunk_grad.to(grad.dtype)
        return grad.view_as(logits), None


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., label]`` in fp32 (or fp64 for fp64 logits), differentiable.

    ``logits`` (..., vocab), ``labels`` (...) integer ids. Memory-friendly: the fp32 working copy
    is one chunk of rows at a time in forward and backward, never the whole logits tensor.
    """
    return _LabelLogProb.apply(logits, labels.long())


def _map_token_chunks(fn: Callable[..., torch.Tensor], *logits: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to fp32 chunks of rows of (..., vocab) tensors of one shape; result has shape (...)."""
    shape = logits[0].shape[:-1]
    dtype = _compute_dtype(logits[0].dtype)
    flats = [x.reshape(-1, x.shape[-1]) for x in logits]
    parts = [fn(*(flat[start:start + _VOCAB_CHUNK_TOKENS].to(dtype) for flat in flats))
             for start in range(0, flats[0].shape[0], _VOCAB_CHUNK_TOKENS)]
    if not parts:
        return torch.zeros(shape, dtype=dtype, device=logits[0].device)
    return torch.cat(parts).view(shape)


def _entropy(chunk: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(chunk, dim=-1) - (torch.softmax(chunk, dim=-1) * chunk).sum(dim=-1)


def _kl(chunk: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(chunk, dim=-1)
    return (log_p.exp() * (log_p - torch.log_softmax(other, dim=-1))).sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``logsumexp(z) - sum(softmax(z) * z)`` of each distribution in ``logits`` (..., vocab).

    Computed in fp32 chunk by chunk; differentiable, but callers that only need it for filtering or
    metrics should call it under no_grad, so that no fp32 chunk is kept for backward.
    """
    return _map_token_chunks(_entropy, logits)


# ---------------------------------------------------------------------------------------------
# TPRL: token visual dependency, token gradient filtering (TGF), trajectory advantage shaping (TAS)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_visual_dependency(
    log_probs: torch.Tensor,
    aug_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "sampled_k3",
    logits: Optional[torch.Tensor] = None,
    aug_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token visual dependency S_t: how much the policy at t changes when the images are perturbed.

    * ``sampled_k3`` (default): ``d = aug_log_probs - log_probs`` (sampled token, perturbed minus
      clean image), ``S = clamp(exp(d) - d - 1, 0, 10)``, the k3 estimate of KL(pi(.|I) || pi(.|I')).
    * ``full_kl``: the exact ``KL(pi(.|I) || pi(.|I'))`` over the vocabulary, from ``logits`` (clean)
      and ``aug_logits`` (perturbed), each (batch, len, vocab); computed in fp32 chunks, floored at 0
      against rounding; the log-prob arguments are not used.

    Returns (batch, len) scores, 0 on padding, without gradient.
    """
    if estimator == "sampled_k3":
        # S(d) >= 10 already for |d| >= 12, so clamping d to +-20 changes nothing but avoids inf - inf.
        d = aug_log_probs.to(_compute_dtype(aug_log_probs.dtype)) - log_probs.to(_compute_dtype(log_probs.dtype))
        d = torch.clamp(d, min=-20.0, max=20.0)
        scores = torch.clamp(torch.exp(d) - d - 1, min=0.0, max=10.0)
    elif estimator == "full_kl":
        if logits is None or aug_logits is None:
            raise ValueError("the full_kl dependency estimator needs logits and aug_logits")
        scores = _map_token_chunks(_kl, logits, aug_logits).clamp(min=0.0)
    else:
        raise ValueError(f"unknown dependency estimator {estimator!r}; known: {list(DEPENDENCY_ESTIMATORS)}")
    return torch.where(response_mask.bool(), scores, torch.zeros_like(scores))


def _keep_count(top_p: float, n_valid: torch.Tensor) -> torch.Tensor:
    # ceil(top_p * n) with a tolerance: 0.1 * 30 is 3.0000000000000004 in floating point, which must
    # keep 3 tokens, not 4.
    return torch.ceil(n_valid.double() * top_p - 1e-6).clamp(min=0).long()


def _top_k_per_row(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the k[i] highest-scoring valid tokens of each row; ties go to the earlier token."""
    # Two stable sorts give the order (valid first, then score descending, then position ascending).
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    by_validity = torch.sort(valid.gather(-1, by_score).to(torch.int8), dim=-1, descending=True, stable=True).indices
    order = by_score.gather(-1, by_validity)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order).contiguous())
    return (rank < k.unsqueeze(-1)) & valid


@torch.no_grad()
def select_top_tokens(
    scores: torch.Tensor, response_mask: torch.Tensor, top_p: float, scope: str = "sequence"
) -> torch.Tensor:
    """0/1 float mask of the highest-scoring valid tokens (token gradient filtering).

    * ``scope="sequence"``: in each response with n valid tokens, keep exactly ``ceil(top_p * n)``
      (an empty response keeps nothing).
    * ``scope="batch"``: keep exactly ``ceil(top_p * N)`` of the N valid tokens of the whole batch
      (one batch-wide quantile threshold). Pass the global batch for results that do not depend on
      the number of devices.

    Ties are broken deterministically by position: among equal scores the earlier token (in
    row-major order for ``batch``) is kept first, so exactly the stated count is kept. ``top_p=1``
    keeps every valid token; ``top_p=0`` keeps none. Scores must be finite.
    """
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if scope not in FILTER_SCOPES:
        raise ValueError(f"unknown filter scope {scope!r}; known: {list(FILTER_SCOPES)}")
    valid = response_mask.bool()
    if scope == "sequence":
        keep = _top_k_per_row(scores, valid, _keep_count(top_p, valid.sum(dim=-1)))
    else:
        flat_valid = valid.reshape(1, -1)
        keep = _top_k_per_row(scores.reshape(1, -1), flat_valid, _keep_count(top_p, flat_valid.sum(dim=-1)))
        keep = keep.view_as(valid)
    return keep.float()


def _selection_metrics(name: str, scores: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor) -> Metrics:
    scores = scores.detach().float()
    rejected = valid & ~keep
    kept_scores = torch.where(keep, scores, torch.full_like(scores, float("inf")))
    return {
        f"{name}_token_fraction": keep.sum() / valid.sum().clamp(min=1),
        f"{name}_threshold": kept_scores.min() if bool(keep.any()) else scores.new_zeros(()),
        f"{name}_selected_mean": masked_mean(scores, keep),
        f"{name}_rejected_mean": masked_mean(scores, rejected),
    }


@torch.no_grad()
def compute_tprl_token_mask(
    response_mask: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    dependency: Optional[torch.Tensor] = None,
    top_p_entropy: float = 0.2,
    top_p_perception: float = 0.2,
    scope: str = "sequence",
) -> Tuple[Optional[torch.Tensor], Metrics]:
    """TPRL token filter: the OR of the entropy and the perception (visual dependency) selections.

    A filter is on when its scores are given (``entropy``: the current policy's token entropy;
    ``dependency``: ``compute_visual_dependency``). Returns ``(token_mask, metrics)``; token_mask is a
    0/1 float tensor (1 = the token receives policy gradient), or None when both filters are off.

    Metrics, for each active filter ``f`` in (entropy, perception): ``f_token_fraction`` (kept /
    valid tokens), ``f_threshold`` (lowest kept score; 0 if nothing kept), ``f_selected_mean`` and
    ``f_rejected_mean`` (mean score of kept / not-kept valid tokens); plus ``kept_token_fraction``
    for the combined mask.
    """
    valid = response_mask.bool()
    selections, metrics = [], {}
    for name, scores, top_p in (("entropy", entropy, top_p_entropy), ("perception", dependency, top_p_perception)):
        if scores is None:
            continue
        keep = select_top_tokens(scores, response_mask, top_p, scope)
        selections.append(keep)
        metrics.update(_selection_metrics(name, scores, valid, keep.bool()))
    if not selections:
        return None, {}
    token_mask = selections[0] if len(selections) == 1 else torch.maximum(selections[0], selections[1])
    metrics["kept_token_fraction"] = token_mask.sum() / valid.sum().clamp(min=1)
    return token_mask, metrics


@torch.no_grad()
def compute_trajectory_scaling(
    dependency: torch.Tensor,
    response_mask: torch.Tensor,
    scaling_min: float,
    scaling_max: Optional[float] = None,
) -> torch.Tensor:
    """TAS factors alpha (batch,): responses that depend more on the image get larger advantages.

    ``S_i`` = mean of the token dependency over response i; ``n_i = (S_i - min) / (max - min)`` with
    min/max over the non-empty responses of the given batch — pass the GLOBAL batch, so the result
    does not depend on the device count. ``scaling_max=None``: ``alpha_i = m + n_i (1 - m) / mean(n)``,
    so the mean alpha over non-empty responses is exactly 1; a float M: ``alpha_i = m + (M - m) n_i``.
    alpha = 1 for every response when fewer than 2 responses are non-empty or ``max - min <= 1e-6``.
    Empty responses always get alpha = 1 and do not count in min, max or mean(n).
    The caller applies ``A_i <- alpha_i * A_i``.
    """
    if scaling_min < 0 or (scaling_max is None and scaling_min > 1):
        raise ValueError(f"trajectory_scaling_min must be in [0, 1], got {scaling_min}")
    if scaling_max is not None and scaling_max < scaling_min:
        raise ValueError(f"trajectory_scaling_max ({scaling_max}) must be >= trajectory_scaling_min ({scaling_min})")
    dependency = dependency.float()
    non_empty = response_mask.bool().any(dim=-1)
    alpha = torch.ones(dependency.shape[0], dtype=dependency.dtype, device=dependency.device)
    if int(non_empty.sum()) < 2:
        return alpha
    s = masked_mean(dependency, response_mask, dim=-1)[non_empty]
    low, high = s.min(), s.max()
    if float(high - low) <= 1e-6:
        return alpha
    n = (s - low) / (high - low)
    if scaling_max is None:
        alpha[non_empty] = scaling_min + n * (1.0 - scaling_min) / n.mean()
    else:
        alpha[non_empty] = scaling_min + (scaling_max - scaling_min) * n
    return alpha


@torch.no_grad()
def compute_trajectory_metrics(
    dependency: torch.Tensor, response_mask: torch.Tensor, scaling: torch.Tensor
) -> Metrics:
    """TAS metrics: ``sensitivity_score_mean`` (mean token dependency over valid tokens) and
    ``scaling_factor_mean`` / ``_max`` / ``_min`` over all responses of the batch."""
    scaling = scaling.float()
    return {
        "sensitivity_score_mean": masked_mean(dependency.float(), response_mask),
        "scaling_factor_mean": scaling.mean(),
        "scaling_factor_max": scaling.max(),
        "scaling_factor_min": scaling.min(),
    }


# ---------------------------------------------------------------------------------------------
# Supervised and mixed objectives: SFT, CHORD
# ---------------------------------------------------------------------------------------------


def compute_chord_mu(step: Number, mu_warmup_steps: int, mu_decay_steps: int, mu_peak: float,
                     mu_valley: float) -> float:
    """The CHORD weight of the SFT loss at ``step`` (CHORD, Zhang et al. 2025, arXiv 2508.11408).

    * warmup ``step < mu_warmup_steps``: linear from 0 to ``mu_peak``: ``mu_peak * step / mu_warmup_steps``;
    * decay ``step < mu_warmup_steps + mu_decay_steps``: cosine from ``mu_peak`` to ``mu_valley``:
      ``mu_valley + (mu_peak - mu_valley) * 0.5 * (1 + cos(pi * (step - mu_warmup_steps) / mu_decay_steps))``;
    * afterwards ``mu_valley``.

    A phase with zero steps is skipped (no warmup and no decay: ``mu_valley`` throughout; set
    ``mu_peak = mu_valley`` for a constant mu). Same schedule as Trinity-RFT's ``mix_chord`` policy loss.
    """
    step = float(step)
    if mu_warmup_steps > 0 and step < mu_warmup_steps:
        return mu_peak * step / mu_warmup_steps
    if mu_decay_steps > 0 and step < mu_warmup_steps + mu_decay_steps:
        progress = (step - mu_warmup_steps) / mu_decay_steps
        return mu_valley + (mu_peak - mu_valley) * 0.5 * (1.0 + float(np.cos(np.pi * progress)))
    return mu_valley


def compute_chord_phi(log_probs: torch.Tensor) -> torch.Tensor:
    """CHORD-phi token weights ``sg(p (1 - p))`` with ``p = exp(log_probs)`` (no gradient).

    Tokens the policy is already sure of (p near 1) or finds implausible (p near 0) weigh little;
    the weight peaks at 1/4 for p = 1/2.
    """
    p = torch.exp(log_probs.detach().float())
    return (p * (1.0 - p)).to(log_probs.dtype)


def compute_sft_loss(
    log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    enable_phi_function: bool = False,
    *,
    global_token_count: Optional[Number] = None,
    global_seq_count: Optional[Number] = None,
    loss_scale_factor: Optional[float] = None,
) -> torch.Tensor:
    """Negative log-likelihood of the response tokens: ``agg(-log_probs [* phi])``.

    ``response_mask`` selects the tokens that get the loss (response tokens of expert / SFT rows);
    with ``enable_phi_function`` each token is weighted by ``compute_chord_phi`` (CHORD-phi). The
    aggregation and its global normalisers are those of ``aggregate_loss``, so micro-batch losses sum
    to the loss of the whole mini-batch.
    """
    nll = -log_probs
    if enable_phi_function:
        nll = nll * compute_chord_phi(log_probs)
    return aggregate_loss(nll, response_mask, loss_agg_mode, global_token_count, global_seq_count,
                          loss_scale_factor=loss_scale_factor)


# ---------------------------------------------------------------------------------------------
# Preference objectives: DPO, Bradley-Terry reward models
# ---------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def sequence_log_probs(log_probs: torch.Tensor, response_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(batch,) total (or, with ``average``, mean) log-probability of each response's valid tokens."""
    total = masked_sum(log_probs, response_mask, dim=-1)
    if average:
        total = total / response_mask.to(total.dtype).sum(-1).clamp(min=1)
    return total


def compute_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards (as TRL's ``DPOTrainer.dpo_loss``).

    ``h = (pi_c - pi_r) - (ref_c - ref_r)`` from sequence log-probs (sums; for ``ipo`` pass per-token
    means, see ``sequence_log_probs(average=True)``):

    * ``sigmoid`` (DPO, Rafailov et al. 2023, arXiv 2305.18290; conservative DPO with label smoothing eps):
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``;
    * ``hinge`` (SLiC, Zhao et al. 2023, arXiv 2305.10425): ``relu(1 - beta h)``;
    * ``ipo`` (Azar et al. 2023, arXiv 2310.12036): ``(h - 1 / (2 beta))^2``.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each (pairs,); the rewards are
    ``beta * (pi - ref)`` and carry no gradient.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; known: {list(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = (-torch.nn.functional.logsigmoid(beta * logits) * (1.0 - label_smoothing)
                  - torch.nn.functional.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * logits)
    else:
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = (beta * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (policy_rejected_logps - ref_rejected_logps)).detach()
    return losses, chosen_rewards, rejected_rewards


def compute_bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                               margin: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
    """Per-pair reward-model loss ``-log sigmoid(r_c - r_r - margin)`` (Bradley-Terry; InstructGPT;
    the optional margin as in Llama 2, arXiv 2307.09288)."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    return -torch.nn.functional.logsigmoid(diff)
