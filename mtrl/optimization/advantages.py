"""Advantage estimators: per-token ``(advantages, returns)`` from rewards, registered by name.

The registry's names are the values of ``optimization.advantage_estimator``; the trainer calls
``compute_advantage_return(name, **everything_it_has)`` and each estimator takes what its signature
names. All estimators run without gradient and return 0 on padding.
"""

import inspect
from typing import Callable, Tuple

import numpy as np
import torch

from mtrl.optimization.masked import masked_whiten
from mtrl.optimization.registry import Registry

AdvantageEstimator = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
ADVANTAGE_ESTIMATORS = Registry("advantage estimator")


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator registering an estimator under ``name`` (the value of ``optimization.advantage_estimator``).

    An estimator returns ``(advantages, returns)``, both ``(batch, response_len)``.
    """
    return ADVANTAGE_ESTIMATORS.register(name)


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name``; ValueError listing the known names otherwise."""
    return ADVANTAGE_ESTIMATORS.lookup(name)


def advantage_estimator_inputs(name: str) -> Tuple[str, ...]:
    """The inputs estimator ``name`` takes (its parameter names), e.g. ``("token_level_rewards",
    "reward_baselines", "response_mask")`` for ReMax: lets a trainer compute a costly input (ReMax's
    greedy baselines) only for the estimators that take it."""
    return tuple(inspect.signature(get_advantage_estimator(name)).parameters)


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
