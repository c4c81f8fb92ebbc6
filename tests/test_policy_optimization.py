"""Hand-computed and invariance tests for the RL math of mtrl/optimization/ (through policy_optimization).

Expected numbers are written out (derivations in the comments); tensors are tiny so the file runs
in a few seconds on one CPU core.
"""

import math
import statistics

import numpy as np
import pytest
import torch

from mtrl.optimization import log_probs
from mtrl.optimization import policy_optimization as po

T = torch.tensor


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(float64(actual), float64(expected), atol=atol, rtol=0)


def float64(x):
    # straight to fp64: torch.as_tensor(python_float) alone would round it to fp32 first
    return torch.as_tensor(x, dtype=torch.float64)


def whiten(xs):
    """Reference whitening of a python list: (x - mean) / sample std."""
    mean, std = statistics.fmean(xs), statistics.stdev(xs)
    return [(x - mean) / math.sqrt(std**2 + 1e-8) for x in xs]


# ------------------------------------------------------------------------ masked statistics


def test_masked_statistics():
    values = T([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    close(po.masked_sum(values, mask), 10.0)  # the NaN in padding is ignored
    close(po.masked_mean(values, mask), 2.5)
    close(po.masked_mean(values, mask, dim=-1), [2.0, 4.0])
    # deviations -1.5, -0.5, 0.5, 1.5 -> sum of squares 5; biased 5/4, unbiased 5/3
    close(po.masked_var(values, mask), 5 / 3)
    close(po.masked_var(values, mask, unbiased=False), 5 / 4)
    close(po.masked_whiten(values, mask)[mask.bool()], whiten([1.0, 2.0, 3.0, 4.0]))
    close(po.masked_whiten(values, mask, shift_mean=False)[0, 0], -1.5 / math.sqrt(5 / 3 + 1e-8) + 2.5)
    # empty mask: mean 0 (not NaN); a single element has variance 0
    close(po.masked_mean(values, torch.zeros_like(mask)), 0.0)
    close(po.masked_var(values, T([[0, 1, 0], [0, 0, 0]])), 0.0)


# ------------------------------------------------------------------------ advantage estimators


def test_gae_masked_recursion():
    # gamma=0.9, lam=0.8 over the valid tokens r = (1, 0, 2), V = (0.5, 1.0, 1.5); index 1 is an
    # observation token (mask 0) that the recursion must skip, index 4 is padding.
    #   t=2: delta = 2 - 1.5 = 0.5                      A = 0.5
    #   t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35         A = 0.35 + 0.72 * 0.5 = 0.71
    #   t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4          A = 1.4 + 0.72 * 0.71 = 1.9112
    rewards = T([[1.0, 9.0, 0.0, 2.0, 5.0]])
    values = T([[0.5, 7.0, 1.0, 1.5, 3.0]])
    mask = T([[1, 0, 1, 1, 0]])
    advantages, returns = po.compute_gae_advantage_return(rewards, values, mask, gamma=0.9, lam=0.8)
    close(returns, [[2.4112, 0.0, 1.71, 2.0, 0.0]])
    close(advantages[0, [0, 2, 3]], whiten([1.9112, 0.71, 0.5]))
    close(advantages[0, [1, 4]], [0.0, 0.0])


def test_gae_gamma_lam_one_is_reward_to_go():
    rewards = T([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = T([[0.2, 0.4, 0.6], [0.1, 0.3, 0.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    advantages, returns = po.compute_gae_advantage_return(rewards, values, mask, gamma=1.0, lam=1.0)
    close(returns, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    close(advantages[mask.bool()], whiten([0.8, 0.6, 0.4, 1.9, 1.7]))


def outcome_rewards(scores, lengths, width=4):
    """Token-level rewards with each score on the last valid token, and the response mask."""
    rewards, mask = torch.zeros(len(scores), width), torch.zeros(len(scores), width)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        mask[i, :n] = 1
        if n:
            rewards[i, n - 1] = s
    return rewards, mask


def test_grpo():
    # group a: 1, 2, 3 -> mean 2, unbiased std 1; group b: a single response; group c: equal rewards
    rewards, mask = outcome_rewards([1.0, 2.0, 3.0, 5.0, 4.0, 4.0], [2, 4, 3, 1, 2, 4])
    index = np.array(["a", "a", "a", "b", "c", "c"], dtype=object)
    advantages, returns = po.compute_grpo_outcome_advantage(rewards, mask, index)
    per_row = [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0, 0.0]
    close(advantages, T(per_row).unsqueeze(-1) * mask)
    close(returns, advantages)
    advantages, _ = po.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std=False)
    close(advantages, T([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]).unsqueeze(-1) * mask)
    # group a alone with epsilon 0.5: (R - 2) / 1.5
    advantages, _ = po.compute_grpo_outcome_advantage(rewards[:3], mask[:3], np.array([7, 7, 7]), epsilon=0.5)
    close(advantages[:, 0], [-2 / 3, 0.0, 2 / 3])


def test_grpo_index_must_match_batch():
    rewards, mask = outcome_rewards([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="index"):
        po.compute_grpo_outcome_advantage(rewards, mask, np.array([0, 0, 0]))


def test_rloo():
    # group of 3 (1, 2, 3): R_i - mean(others) = 1 - 2.5, 2 - 2, 3 - 1.5; singleton and equal group -> 0
    rewards, mask = outcome_rewards([1.0, 2.0, 3.0, 5.0, 4.0, 4.0], [2, 4, 3, 1, 2, 4])
    index = np.array(["a", "a", "a", "b", "c", "c"])
    advantages, returns = po.compute_rloo_outcome_advantage(rewards, mask, index)
    close(advantages, T([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]).unsqueeze(-1) * mask)
    close(returns, advantages)


def test_reinforce_plus_plus():
    # gamma 0.5: row 0 returns (0.25, 0.5, 1); row 1 (1, 2, pad); row 2 skips its masked middle token
    rewards = T([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 8.0, 2.0]])
    mask = T([[1, 1, 1], [1, 1, 0], [1, 0, 1]])
    advantages, returns = po.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, gamma=0.5)
    close(returns, [[0.25, 0.5, 1.0], [1.0, 2.0, 0.0], [2.0, 0.0, 2.0]])
    close(advantages[mask.bool()], whiten([0.25, 0.5, 1.0, 1.0, 2.0, 2.0, 2.0]))
    close(advantages[~mask.bool()], [0.0, 0.0])


def test_remax():
    rewards = T([[0.0, 1.0, 2.0], [3.0, 7.0, 7.0]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    advantages, returns = po.compute_remax_outcome_advantage(rewards, T([1.0, 2.0]), mask)
    close(returns, [[3.0, 3.0, 2.0], [3.0, 0.0, 0.0]])
    close(advantages, [[2.0, 2.0, 1.0], [1.0, 0.0, 0.0]])


def test_advantage_registry_and_dispatch():
    from mtrl.optimization.config import ADVANTAGE_ESTIMATOR_NAMES

    assert set(po.ADVANTAGE_ESTIMATORS) == set(ADVANTAGE_ESTIMATOR_NAMES)
    assert po.get_advantage_estimator("grpo") is po.compute_grpo_outcome_advantage
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*'gae'.*'rloo'"):
        po.get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="already registered"):
        po.register_advantage_estimator("gae")(lambda: None)

    rewards, mask = outcome_rewards([1.0, 3.0], [2, 3])
    everything = dict(token_level_rewards=rewards, response_mask=mask, values=torch.zeros_like(rewards),
                      index=np.array([0, 0]), reward_baselines=T([0.0, 0.0]), gamma=1.0, lam=1.0,
                      norm_adv_by_std=False)
    advantages, _ = po.compute_advantage_return("grpo", **everything)
    close(advantages[:, 0], [-1.0, 1.0])
    advantages, returns = po.compute_advantage_return("remax", **everything)
    close(returns[:, 0], [1.0, 3.0])
    with pytest.raises(ValueError, match=r"'gae' needs \['values'\]"):
        po.compute_advantage_return("gae", token_level_rewards=rewards, response_mask=mask, gamma=1.0, lam=1.0)


# ------------------------------------------------------------------------ divergence


def test_compute_divergence():
    log_probs, ref = T([[-1.0, -2.0, -31.0]]), T([[-1.5, -1.0, -1.0]])  # d = 0.5, -1, -30
    close(po.compute_divergence(log_probs, ref, "kl"), [[0.5, -1.0, -30.0]])
    close(po.compute_divergence(log_probs, ref, "abs"), [[0.5, 1.0, 30.0]])
    close(po.compute_divergence(log_probs, ref, "mse"), [[0.125, 0.5, 450.0]])
    # k3 = exp(-d) + d - 1: exp(-0.5) - 0.5 = 0.1065307, e - 2 = 0.7182818; d = -30 saturates at 10
    close(po.compute_divergence(log_probs, ref, "low_var_kl"), [[0.10653066, 0.71828183, 10.0]])
    with pytest.raises(ValueError, match="known"):
        po.compute_divergence(log_probs, ref, "k9")


def test_apply_divergence_penalty():
    scores = T([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    ref = torch.zeros(3, 3)
    log_probs = T([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [3.0, 3.0, 3.0]])  # kl = log_probs - ref
    mask = T([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    rewards, mean = po.apply_divergence_penalty(scores, log_probs, ref, mask, coef=0.5, penalty="kl")
    close(rewards, [[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0], [0.0, 0.0, 0.0]])
    close(mean, (0.2 + 0.45) / 2)  # per-response means 0.2 and 0.45; the empty response does not count


def test_divergence_controllers():
    fixed = po.build_divergence_controller("fixed", 0.1)
    fixed.update(100.0, 1000)
    assert isinstance(fixed, po.FixedDivergenceController) and fixed.value == 0.1

    ctrl = po.build_divergence_controller("adaptive", 0.1, target=6.0, horizon=10000)
    ctrl.update(12.0, 100)  # error 1 -> clipped 0.2: x (1 + 0.2 * 100 / 10000)
    close(ctrl.value, 0.1002)
    ctrl.update(T(3.0), 100)  # tensors accepted; error -0.5 -> -0.2
    close(ctrl.value, 0.1002 * 0.998)
    ctrl.update(6.6, 1000)  # error 0.1, not clipped
    close(ctrl.value, 0.1002 * 0.998 * 1.01)

    restored = po.AdaptiveDivergenceController(0.5, 6.0, 10000)
    restored.load_state_dict(ctrl.state_dict())
    assert restored.value == ctrl.value and ctrl.state_dict() == {"value": ctrl.value}
    fixed.load_state_dict({"value": 0.3})
    assert fixed.value == 0.3

    with pytest.raises(ValueError, match="horizon"):
        po.build_divergence_controller("adaptive", 0.1, target=6.0, horizon=0)
    with pytest.raises(ValueError, match="known"):
        po.build_divergence_controller("pid", 0.1)


# ------------------------------------------------------------------------ aggregation


LOSS = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
LOSS_MASK = T([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the third sequence is empty


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 7 / 3),                # (1 + 2 + 4) / 3 tokens
    ("seq-mean-token-sum", 3.5),          # (3 + 4) / 2 non-empty sequences
    ("seq-mean-token-mean", 2.75),        # (1.5 + 4) / 2
    ("seq-mean-token-sum-norm", 7 / 6),   # 7 / 2 sequences / width 3
])
def test_aggregate_loss_modes(mode, expected):
    close(po.aggregate_loss(LOSS, LOSS_MASK, mode), expected)


def test_aggregate_loss_normalisers():
    close(po.aggregate_loss(LOSS, LOSS_MASK, "token-mean", global_token_count=14), 0.5)
    close(po.aggregate_loss(LOSS, LOSS_MASK, "seq-mean-token-sum", global_seq_count=7), 1.0)
    close(po.aggregate_loss(LOSS, LOSS_MASK, "seq-mean-token-mean", 100, T(11.0)), 0.5)
    close(po.aggregate_loss(LOSS, LOSS_MASK, "seq-mean-token-sum-norm", loss_scale_factor=7), 0.5)
    # an all-empty micro-batch contributes 0, not NaN
    for mode in po.LOSS_AGG_MODES:
        close(po.aggregate_loss(LOSS, torch.zeros_like(LOSS_MASK), mode), 0.0)
    with pytest.raises(ValueError, match="known"):
        po.aggregate_loss(LOSS, LOSS_MASK, "token-sum")


@pytest.mark.parametrize("mode", po.LOSS_AGG_MODES)
def test_micro_batch_and_rank_invariance(mode):
    """Full mini-batch gradient == sum of micro-batch gradients (global normalisers), and the
    mean-all-reduce of per-rank gradients of world-size-scaled losses gives the same."""
    torch.manual_seed(0)
    theta = torch.randn(6, 5, requires_grad=True)
    weights, advantages = torch.randn(6, 5), torch.randn(6, 5)
    lengths = [5, 2, 0, 3, 1, 4]
    mask = (torch.arange(5) < T(lengths).unsqueeze(-1)).float()
    token_mask = (torch.rand(6, 5) > 0.3).float()

    def losses(rows):
        loss_mat = (theta[rows] * weights[rows]) ** 2
        agg = po.aggregate_loss(loss_mat, mask[rows], mode, **norm)
        pg, _ = po.compute_policy_loss(torch.zeros(len(rows), 5), theta[rows], advantages[rows], mask[rows],
                                       0.2, 0.3, 3.0, mode, token_mask[rows], **norm)
        return agg + pg

    rows = list(range(6))
    norm = {}
    full = torch.autograd.grad(losses(rows), theta)[0]
    norm = {"global_token_count": mask.sum(), "global_seq_count": int((mask.sum(-1) > 0).sum())}
    micro_batches = [[0, 1], [2], [3, 4, 5]]
    summed = sum(torch.autograd.grad(losses(mb), theta)[0] for mb in micro_batches)
    close(summed, full, atol=1e-5)

    ranks = [[[0], [1, 2]], [[3, 4, 5]]]  # two ranks, each with its own micro-batches
    world = len(ranks)
    per_rank = [sum(torch.autograd.grad(losses(mb) * world, theta)[0] for mb in rank) for rank in ranks]
    close(sum(per_rank) / world, full, atol=1e-5)


# ------------------------------------------------------------------------ policy, value, entropy losses


def ppo_example():
    # ratios 1.5, 0.5, 5.0, 1.1 and a padding token with a huge ratio; clip 0.2 / 0.3, dual 3
    ratios = T([[1.5, 0.5, 5.0, 1.1, 100.0]])
    advantages = T([[1.0, 1.0, -1.0, -2.0, -5.0]])
    mask = T([[1, 1, 1, 1, 0]])
    return torch.zeros(1, 5), ratios.log(), advantages, mask


def test_policy_loss_dual_clip():
    old, log_probs, advantages, mask = ppo_example()
    # per token: max(-1.5, -1.3) = -1.3 (clipped) | max(-0.5, -0.8) = -0.5 |
    #            max(5, 1.3) = 5 -> dual clip min(5, 3) = 3 | max(2.2, 2.2) = 2.2
    loss, metrics = po.compute_policy_loss(old, log_probs, advantages, mask, 0.2, 0.3, 3.0)
    close(loss, (-1.3 - 0.5 + 3.0 + 2.2) / 4)
    close(metrics["pg_clipfrac"], 0.25)
    close(metrics["pg_clipfrac_lower"], 0.25)
    close(metrics["ppo_kl"], -math.log(1.5 * 0.5 * 5.0 * 1.1) / 4)
    assert set(metrics) == {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"}
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    with pytest.raises(ValueError, match="clip_ratio_dual"):
        po.compute_policy_loss(old, log_probs, advantages, mask, 0.2, 0.3, 1.0)


def test_policy_loss_token_mask_keeps_denominator():
    old, log_probs, advantages, mask = ppo_example()
    log_probs.requires_grad_(True)
    token_mask = T([[1, 0, 1, 1, 1]])
    loss, _ = po.compute_policy_loss(old, log_probs, advantages, mask, 0.2, 0.3, 3.0, token_mask=token_mask)
    close(loss, (-1.3 + 3.0 + 2.2) / 4)  # token 1 dropped from the numerator only
    grad = torch.autograd.grad(loss, log_probs)[0]
    # token 0 is clipped and token 2 dual-clipped (no gradient), token 1 filtered, token 3: -A r / 4
    close(grad, [[0.0, 0.0, 0.0, 2.0 * 1.1 / 4, 0.0]])


def test_filtering_with_top_p_one_equals_plain_ppo():
    torch.manual_seed(1)
    old, new, advantages = torch.randn(3, 6), torch.randn(3, 6), torch.randn(3, 6)
    mask = (torch.arange(6) < T([[6], [2], [0]])).float()
    token_mask, metrics = po.compute_tprl_token_mask(mask, entropy=torch.rand(3, 6), dependency=torch.rand(3, 6),
                                                     top_p_entropy=1.0, top_p_perception=1.0)
    close(token_mask, mask)
    close(metrics["kept_token_fraction"], 1.0)
    for mode in po.LOSS_AGG_MODES:
        plain, _ = po.compute_policy_loss(old, new, advantages, mask, 0.2, 0.3, 3.0, mode)
        filtered, _ = po.compute_policy_loss(old, new, advantages, mask, 0.2, 0.3, 3.0, mode, token_mask)
        close(filtered, plain)


def test_value_loss():
    # token 0: clip(1.0, 0.3, 0.7) = 0.7 -> max((1-2)^2, (0.7-2)^2) = 1.69, clipped term larger
    # token 1: 2.4 lies inside [2.3, 2.7] -> both terms (2.4-1)^2 = 1.96; token 2 is padding
    vpreds, values, returns = T([[1.0, 2.4, 9.0]]), T([[0.5, 2.5, 0.0]]), T([[2.0, 1.0, 0.0]])
    mask = T([[1, 1, 0]])
    loss, clipfrac = po.compute_value_loss(vpreds, returns, values, mask, 0.2, "token-mean")
    close(loss, 0.5 * (1.69 + 1.96) / 2)
    close(clipfrac, 0.5)
    loss, _ = po.compute_value_loss(vpreds, returns, values, mask, 0.2, "token-mean", global_token_count=4)
    close(loss, 0.5 * (1.69 + 1.96) / 4)


def test_entropy_penalty():
    log_probs, mask = T([[-1.0, -2.0, -9.0]]), T([[1, 1, 0]])
    close(po.compute_entropy_penalty(log_probs, mask), 1.5)
    close(po.compute_entropy_penalty(log_probs, mask, coef=0.06), 0.09)
    close(po.compute_entropy_penalty(log_probs, mask, "seq-mean-token-sum", coef=0.06, global_seq_count=2), 0.09)


def test_entropy_bonus_value_and_that_its_gradient_raises_entropy():
    entropy, mask = T([[0.5, 1.5, 9.0], [1.0, 0.0, 0.0]]), T([[1, 1, 0], [1, 0, 0]])
    close(po.compute_entropy_bonus(entropy, mask), -(0.5 + 1.5 + 1.0) / 3)
    close(po.compute_entropy_bonus(entropy, mask, coef=0.1, global_token_count=6), -0.1 * 3.0 / 6)
    close(po.compute_entropy_bonus(entropy, mask, "seq-mean-token-mean"), -(1.0 + 1.0) / 2)
    # One gradient step on the bonus makes every distribution flatter.
    logits = torch.tensor([[[3.0, 0.0, -1.0], [0.0, 2.0, 0.5]]], requires_grad=True)
    before = po.entropy_from_logits(logits).detach()
    po.compute_entropy_bonus(po.entropy_from_logits(logits), T([[1, 1]])).backward()
    with torch.no_grad():
        after = po.entropy_from_logits(logits - 0.5 * logits.grad)
    assert bool((after > before + 1e-3).all())


def test_entropy_bonus_controllers():
    fixed = po.EntropyBonusController("fixed", 0.05)
    assert [fixed.coefficient(h) for h in (0.0, 9.0)] == [0.05, 0.05]
    ctl = po.EntropyBonusController("adaptive", 0.0, target=0.5, step=0.01)
    # Below target the coefficient grows and applies; above it shrinks (never below 0) and does not apply.
    applied = [ctl.coefficient(h) for h in (0.2, 0.3, 0.4, 0.9, 0.1, 0.9, 0.9, 0.9)]
    assert applied == pytest.approx([0.01, 0.02, 0.03, 0.0, 0.03, 0.0, 0.0, 0.0])
    assert ctl.value == 0.0
    ctl.load_state_dict({"value": 0.2})
    assert ctl.coefficient(0.0) == pytest.approx(0.21) and ctl.state_dict() == {"value": pytest.approx(0.21)}
    with pytest.raises(ValueError, match="target > 0"):
        po.EntropyBonusController("adaptive", 0.0, target=0.0)
    with pytest.raises(ValueError, match="unknown entropy bonus controller"):
        po.EntropyBonusController("pid", 0.0)


# ------------------------------------------------------------------------ log-probs and entropy


def test_log_probs_and_entropy_hand_computed():
    logits = T([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p = (1/4, 3/4) and (1/2, 1/2)
    close(po.log_probs_from_logits(logits, T([[1, 0]])), [[math.log(0.75), math.log(0.5)]])
    close(po.log_probs_from_logits(logits, T([[0, 1]])), [[math.log(0.25), math.log(0.5)]])
    close(po.entropy_from_logits(logits), [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)]])
    close(po.entropy_from_logits(torch.zeros(4)), math.log(4.0))


def test_log_probs_chunked_match_autograd(monkeypatch):
    monkeypatch.setattr(log_probs, "_VOCAB_CHUNK_TOKENS", 2)  # 3 x 5 = 15 rows -> 8 chunks, last one partial
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (3, 5))
    weights = torch.randn(3, 5, dtype=torch.float64)
    ours = po.log_probs_from_logits(logits, labels)
    reference = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(ours, reference, atol=1e-12)
    grad, = torch.autograd.grad((ours * weights).sum(), logits)
    expected, = torch.autograd.grad((reference * weights).sum(), logits)
    close(grad, expected, atol=1e-12)
    close(po.entropy_from_logits(logits), -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1),
          atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: po.log_probs_from_logits(x, labels[:1, :2]), (logits[:1, :2].detach()
                                                                                           .requires_grad_(),))


def test_log_probs_low_precision_computed_in_fp32():
    logits = (torch.randn(2, 3, 11) * 4).bfloat16()
    labels = torch.randint(0, 11, (2, 3))
    ours = po.log_probs_from_logits(logits, labels)
    assert ours.dtype == torch.float32 and po.entropy_from_logits(logits).dtype == torch.float32
    close(ours, torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    logits.requires_grad_(True)
    grad, = torch.autograd.grad(po.log_probs_from_logits(logits, labels).sum(), logits)
    assert grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------ TPRL


def test_visual_dependency_sampled_k3():
    old = T([[-1.0, -2.0, -0.5, -3.0, -20.0, -1.0]])
    aug = T([[-1.0, -1.0, -3.0, -18.0, -17.0, -50.0]])
    mask = T([[1, 1, 1, 1, 1, 0]])
    # d = 0, 1, -2.5, -15, 3: S = 0, e - 2, exp(-2.5) + 1.5, 14 -> 10, e^3 - 4 -> 10; padding 0
    expected = [[0.0, math.e - 2, math.exp(-2.5) + 1.5, 10.0, 10.0, 0.0]]
    close(po.compute_visual_dependency(old, aug, mask), expected)
    # -inf log-probs do not produce NaN
    inf = po.compute_visual_dependency(T([[float("-inf")]]), T([[-1.0]]), T([[1]]))
    close(inf, [[10.0]])


def test_visual_dependency_full_kl_brute_force():
    torch.manual_seed(0)
    logits, aug_logits = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = T([[1, 1, 0], [1, 1, 1]])
    scores = po.compute_visual_dependency(None, None, mask, "full_kl", logits=logits, aug_logits=aug_logits)
    for b in range(2):
        for t in range(3):
            p = [math.exp(x) for x in logits[b, t].tolist()]
            q = [math.exp(x) for x in aug_logits[b, t].tolist()]
            p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
            kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) if mask[b, t] else 0.0
            close(scores[b, t], kl, atol=1e-6)
    same = po.compute_visual_dependency(None, None, mask, "full_kl", logits=logits, aug_logits=logits)
    close(same, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="logits"):
        po.compute_visual_dependency(None, None, mask, "full_kl")
    with pytest.raises(ValueError, match="known"):
        po.compute_visual_dependency(logits[..., 0], logits[..., 0], mask, "k1")


def test_select_top_tokens_sequence_scope():
    scores = T([[1.0, 3.0, 3.0, 2.0, 100.0], [5.0, 5.0, 1.0, 100.0, 100.0], [9.0, 9.0, 9.0, 9.0, 9.0]])
    mask = T([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    # ceil(0.5 * 4) = 2, ceil(0.5 * 3) = 2, empty keeps nothing; padding (score 100) never kept
    close(po.select_top_tokens(scores, mask, 0.5), [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    # ceil(0.2 * 4) = 1: tie 3 / 3 goes to the earlier token; ceil(0.2 * 3) = 1: tie 5 / 5 likewise
    close(po.select_top_tokens(scores, mask, 0.2), [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    close(po.select_top_tokens(scores, mask, 1.0), mask)
    close(po.select_top_tokens(scores, mask, 0.0), torch.zeros(3, 5))
    # all-equal scores: the first ceil(0.4 * 5) = 2 tokens
    close(po.select_top_tokens(torch.ones(1, 5), torch.ones(1, 5), 0.4), [[1, 1, 0, 0, 0]])
    # 0.1 * 30 = 3.0000000000000004 in floating point must keep 3 tokens, not 4
    assert po.select_top_tokens(torch.rand(1, 30), torch.ones(1, 30), 0.1).sum() == 3
    with pytest.raises(ValueError, match="top_p"):
        po.select_top_tokens(scores, mask, 1.5)
    with pytest.raises(ValueError, match="scope"):
        po.select_top_tokens(scores, mask, 0.5, scope="group")


def test_select_top_tokens_batch_scope():
    scores = T([[9.0, 8.0, 7.0, 0.0, 50.0], [1.0, 2.0, 3.0, 4.0, 4.0]])
    mask = T([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    # sequence scope: top ceil(0.5 * n) of each row
    close(po.select_top_tokens(scores, mask, 0.5), [[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])
    # batch scope: ceil(0.5 * 9) = 5 of all 9 valid tokens: 9, 8, 7, then the tied 4s in row-major order
    close(po.select_top_tokens(scores, mask, 0.5, "batch"), [[1, 1, 1, 0, 0], [0, 0, 0, 1, 1]])
    close(po.select_top_tokens(scores, mask, 0.4, "batch"), [[1, 1, 1, 0, 0], [0, 0, 0, 1, 0]])
    close(po.select_top_tokens(scores, mask, 1.0, "batch"), mask)


def test_tprl_token_mask_and_metrics():
    entropy = T([[1.0, 3.0, 3.0, 2.0, 0.0], [5.0, 5.0, 1.0, 0.0, 0.0]])
    dependency = T([[0.0, 2.0, 3.0, 3.0, 1.0], [0.0, 0.0, 1.0, 5.0, 5.0]])
    mask = T([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    assert po.compute_tprl_token_mask(mask) == (None, {})

    # top 20%: one token per response. entropy keeps (0,1) [3 beats the later tie] and (1,0);
    # perception keeps (0,2) [tie with (0,3)] and (1,2)
    token_mask, m = po.compute_tprl_token_mask(mask, entropy=entropy, dependency=dependency)
    close(token_mask, [[0, 1, 1, 0, 0], [1, 0, 1, 0, 0]])
    expected = {
        "entropy_token_fraction": 2 / 7, "entropy_threshold": 3.0,
        "entropy_selected_mean": 4.0, "entropy_rejected_mean": (1 + 3 + 2 + 5 + 1) / 5,
        "perception_token_fraction": 2 / 7, "perception_threshold": 1.0,
        "perception_selected_mean": 2.0, "perception_rejected_mean": (0 + 2 + 3 + 0 + 0) / 5,
        "kept_token_fraction": 4 / 7,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        close(m[key], value)

    token_mask, m = po.compute_tprl_token_mask(mask, entropy=entropy, top_p_entropy=0.0)
    close(token_mask, torch.zeros(2, 5))
    close(m["entropy_threshold"], 0.0)
    close(m["entropy_selected_mean"], 0.0)
    assert "perception_token_fraction" not in m

    token_mask, m = po.compute_tprl_token_mask(mask, dependency=dependency, top_p_perception=0.5, scope="batch")
    close(token_mask, [[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])  # ceil(0.5 * 7) = 4 of the batch: 3, 3, 2, 1


def test_trajectory_scaling():
    dependency = T([[1.0, 3.0, 50.0], [0.0, 50.0, 50.0], [4.0, 4.0, 4.0], [50.0, 50.0, 50.0]])
    mask = T([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    # S = 2, 0, 4 (row 3 empty); n = 0.5, 0, 1; mean(n) = 0.5
    # dynamic: 0.8 + n * 0.2 / 0.5 = 1.0, 0.8, 1.2; empty response 1
    alpha = po.compute_trajectory_scaling(dependency, mask, 0.8)
    close(alpha, [1.0, 0.8, 1.2, 1.0])
    # linear map with M = 1.5: 0.8 + 0.7 n
    close(po.compute_trajectory_scaling(dependency, mask, 0.8, 1.5), [1.15, 0.8, 1.5, 1.0])


def test_trajectory_scaling_degenerate_cases():
    equal = torch.full((3, 4), 0.7)
    mask = torch.ones(3, 4)
    close(po.compute_trajectory_scaling(equal, mask, 0.5), torch.ones(3))
    close(po.compute_trajectory_scaling(equal + T([[0.0], [5e-7], [0.0]]), mask, 0.5), torch.ones(3))
    one_valid = T([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    close(po.compute_trajectory_scaling(torch.rand(3, 4), one_valid, 0.5, 2.0), torch.ones(3))
    close(po.compute_trajectory_scaling(torch.rand(1, 4), torch.ones(1, 4), 0.5), torch.ones(1))
    with pytest.raises(ValueError, match="scaling_min"):
        po.compute_trajectory_scaling(equal, mask, 1.2)
    with pytest.raises(ValueError, match="scaling_max"):
        po.compute_trajectory_scaling(equal, mask, 0.8, 0.5)


def test_trajectory_scaling_global_batch_mean_is_one():
    torch.manual_seed(0)
    dependency = torch.rand(16, 8) * torch.rand(16, 1) * 3
    mask = (torch.arange(8) < torch.randint(0, 9, (16, 1))).float()
    mask[3] = 0  # make sure an empty response is present
    alpha = po.compute_trajectory_scaling(dependency, mask, 0.6)
    non_empty = mask.sum(-1) > 0
    close(alpha[non_empty].mean(), 1.0)
    close(alpha.mean(), 1.0)
    assert alpha.min() >= 0.6 - 1e-6
    # the factors follow the rows: how the global batch is ordered/sharded afterwards does not matter
    perm = torch.randperm(16)
    close(po.compute_trajectory_scaling(dependency[perm], mask[perm], 0.6), alpha[perm])


def test_trajectory_metrics():
    dependency, mask = T([[1.0, 3.0], [0.0, 9.0]]), T([[1, 1], [1, 0]])
    m = po.compute_trajectory_metrics(dependency, mask, T([1.2, 0.8]))
    close(m["sensitivity_score_mean"], 4 / 3)
    close(m["scaling_factor_mean"], 1.0)
    close(m["scaling_factor_max"], 1.2)
    close(m["scaling_factor_min"], 0.8)


def test_names_match_config():
    from mtrl.optimization import config as opt_config
    from mtrl.config.worker import LOSS_AGG_MODES

    assert set(po.DIVERGENCE_PENALTIES) == set(opt_config.DIVERGENCE_PENALTY_NAMES)
    assert set(po.DEPENDENCY_ESTIMATORS) == set(opt_config.DEPENDENCY_ESTIMATOR_NAMES)
    assert set(po.FILTER_SCOPES) == set(opt_config.FILTER_SCOPE_NAMES)
    assert set(po.LOSS_AGG_MODES) == set(LOSS_AGG_MODES)
