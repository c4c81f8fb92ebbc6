"""Agreement with verl's `core_algos` (and `torch_functional`) on random inputs, to 1e-6.

Skipped when verl is not installed. verl's full dependency set is heavy (vLLM, ...); what the import
chain of `verl.trainer.ppo.core_algos` needs on top of MTRL's own dependencies is:

    pip install --no-deps verl==0.9.1 && pip install tensordict codetiming orjson

Where MTRL deliberately differs, inputs avoid the difference (documented in docs/algorithms.md):
  * GRPO / RLOO: a group of one gets advantage 0 here, its raw score in verl -> groups of >= 2.
  * Padding positions are 0 in every MTRL output; verl leaves values there -> compare masked.
  * The in-reward divergence mean skips empty responses here, verl counts them as 0 -> none empty.
"""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")
from omegaconf import OmegaConf  # noqa: E402  (after the skip: only needed with verl)

from mtrl.optimization import policy_optimization as po  # noqa: E402

ATOL = 1e-6
B, L = 8, 12


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(float64(actual), float64(expected), atol=atol, rtol=0)


def float64(x):
    # straight to fp64: torch.as_tensor(python_float) alone would round it to fp32 first
    return torch.as_tensor(x, dtype=torch.float64)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def random_mask(rng, interior_gaps=True, empty_row=False):
    """Right-padded responses of random length >= 2, optionally with masked tokens inside."""
    lengths = torch.randint(2, L + 1, (B, 1), generator=rng)
    mask = (torch.arange(L) < lengths).double()
    if interior_gaps:
        mask[:, 1] *= (torch.rand(B, generator=rng) > 0.5).double()
    if empty_row:
        mask[0] = 0
    return mask


def randn(rng, *shape, scale=1.0):
    return torch.randn(*shape, generator=rng, dtype=torch.float64) * scale


def group_index(rng):
    """Group ids with every group of size >= 2 (sizes 2, 3, 3), shuffled."""
    ids = np.array(["p0"] * 2 + ["p1"] * 3 + ["p2"] * 3, dtype=object)
    return ids[torch.randperm(B, generator=rng).numpy()]


# ------------------------------------------------------------------------ advantage estimators


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5)])
def test_gae(rng, gamma, lam):
    rewards, values, mask = randn(rng, B, L), randn(rng, B, L), random_mask(rng)
    ours = po.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    theirs = core_algos.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    for a, b in zip(ours, theirs):
        close(a, b * mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm_adv_by_std", [True, False])
def test_grpo(rng, norm_adv_by_std, dtype):
    rewards, mask, index = randn(rng, B, L).to(dtype), random_mask(rng, empty_row=True).to(dtype), group_index(rng)
    ours = po.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std=norm_adv_by_std)
    theirs = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, index,
                                                       norm_adv_by_std_in_grpo=norm_adv_by_std)
    for a, b in zip(ours, theirs):
        close(a, b)


def test_rloo(rng):
    rewards, mask, index = randn(rng, B, L), random_mask(rng), group_index(rng)
    ours = po.compute_rloo_outcome_advantage(rewards, mask, index)
    theirs = core_algos.compute_rloo_outcome_advantage(rewards.clone(), mask, index)
    for a, b in zip(ours, theirs):
        close(a, b)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus(rng, gamma):
    rewards, mask = randn(rng, B, L), random_mask(rng)
    ours = po.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, gamma)
    theirs = core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask,
                                                                      config=SimpleNamespace(gamma=gamma))
    for a, b in zip(ours, theirs):
        close(a, b * mask)


def test_remax(rng):
    rewards, baselines, mask = randn(rng, B, L), randn(rng, B), random_mask(rng, interior_gaps=False)
    ours = po.compute_remax_outcome_advantage(rewards, baselines, mask)
    theirs = core_algos.compute_remax_outcome_advantage(rewards, baselines, mask)
    for a, b in zip(ours, theirs):
        close(a, b * mask)


# ------------------------------------------------------------------------ divergence


@pytest.mark.parametrize("penalty", ["kl", "abs", "mse", "low_var_kl"])
def test_divergence(rng, penalty):
    # scale 8 makes some log-ratios large enough to hit the k3 clamps
    log_probs, ref = randn(rng, B, L, scale=8.0), randn(rng, B, L, scale=8.0)
    close(po.compute_divergence(log_probs, ref, penalty), core_algos.kl_penalty(log_probs, ref, penalty))


@pytest.mark.parametrize("penalty", ["kl", "low_var_kl"])
def test_divergence_in_reward(rng, penalty):
    """verl's ray_trainer.apply_kl_penalty, spelled with verl's own functions (the trainer module
    itself needs torchdata and more)."""
    scores, old, ref, mask = randn(rng, B, L), randn(rng, B, L), randn(rng, B, L), random_mask(rng)
    coef = 0.05
    rewards, mean = po.apply_divergence_penalty(scores, old, ref, mask, coef, penalty)
    kld = core_algos.kl_penalty(old, ref, kl_penalty=penalty) * mask
    close(rewards, scores - coef * kld)
    close(mean, torch.mean(verl_F.masked_mean(kld, mask=mask, axis=-1), dim=0))


def test_divergence_controllers():
    ours = po.AdaptiveDivergenceController(0.05, 6.0, 1000)
    theirs = core_algos.AdaptiveKLController(0.05, 6.0, 1000)
    fixed, verl_fixed = po.FixedDivergenceController(0.05), core_algos.FixedKLController(0.05)
    for current, n_steps in [(12.0, 64), (1.0, 64), (6.5, 128), (5.9, 32), (0.0, 256), (100.0, 8)]:
        for ctrl in (ours, theirs, fixed, verl_fixed):
            ctrl.update(current, n_steps)
        close(ours.value, theirs.value, atol=1e-12)
        close(fixed.value, verl_fixed.value, atol=1e-12)


# ------------------------------------------------------------------------ aggregation and losses


@pytest.mark.parametrize("mode", po.LOSS_AGG_MODES)
def test_aggregate_loss(rng, mode):
    loss_mat, mask = randn(rng, B, L), random_mask(rng, empty_row=True)
    close(po.aggregate_loss(loss_mat, mask, mode), core_algos.agg_loss(loss_mat, mask, mode))
    # global normalisers: verl's batch_num_tokens / global_batch_size with dp_size = 1 ...
    tokens, seqs = 57, 11
    theirs = core_algos.agg_loss(loss_mat, mask, mode, batch_num_tokens=tokens, global_batch_size=seqs)
    close(po.aggregate_loss(loss_mat, mask, mode, tokens, seqs), theirs)
    # ... and with dp_size = 4 verl folds the world-size factor in; MTRL's caller multiplies (docstring)
    theirs = core_algos.agg_loss(loss_mat, mask, mode, dp_size=4, batch_num_tokens=tokens, global_batch_size=seqs,
                                 loss_scale_factor=512)
    close(4 * po.aggregate_loss(loss_mat, mask, mode, tokens, seqs, loss_scale_factor=512), theirs)


def policy_inputs(rng):
    old = randn(rng, B, L) - 2
    new = old + randn(rng, B, L, scale=1.0)  # ratios spread across both clip bounds and the dual clip
    return old, new, randn(rng, B, L), random_mask(rng, empty_row=True)


@pytest.mark.parametrize("mode", po.LOSS_AGG_MODES)
def test_policy_loss(rng, mode):
    old, new, advantages, mask = policy_inputs(rng)
    loss, metrics = po.compute_policy_loss(old, new, advantages, mask, 0.2, 0.28, 3.0, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # verl marks this form deprecated
        pg_loss, clipfrac, ppo_kl, clipfrac_lower = core_algos.compute_policy_loss(
            old, new, advantages, mask, cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=3.0, loss_agg_mode=mode)
    close(loss, pg_loss)
    close(metrics["pg_clipfrac"], clipfrac)
    close(metrics["ppo_kl"], ppo_kl)
    close(metrics["pg_clipfrac_lower"], clipfrac_lower)
    assert 0 < float(clipfrac) and 0 < float(clipfrac_lower)  # the inputs exercise both clips


def test_policy_loss_vanilla_with_global_batch_info(rng):
    old, new, advantages, mask = policy_inputs(rng)
    config = OmegaConf.create({
        "clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
        "global_batch_info": {"dp_size": 2, "batch_num_tokens": 150, "global_batch_size": 20},
    })
    for mode in po.LOSS_AGG_MODES:
        pg_loss, verl_metrics = core_algos.compute_policy_loss_vanilla(old, new, advantages, mask, mode, config)
        loss, metrics = po.compute_policy_loss(old, new, advantages, mask, 0.2, 0.28, 3.0, mode,
                                               global_token_count=150, global_seq_count=20)
        close(2 * loss, pg_loss)
        for name in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
            close(metrics[name], verl_metrics[f"actor/{name}"])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_value_loss(rng, mode):
    values, returns, mask = randn(rng, B, L), randn(rng, B, L), random_mask(rng)
    vpreds = values + randn(rng, B, L, scale=0.5)
    ours = po.compute_value_loss(vpreds, returns, values, mask, 0.2, mode)
    theirs = core_algos.compute_value_loss(vpreds, returns, values, mask, 0.2, mode)
    close(ours[0], theirs[0])
    close(ours[1], theirs[1])


# ------------------------------------------------------------------------ torch_functional helpers


def test_masked_statistics(rng):
    values, mask = randn(rng, B, L, scale=3.0), random_mask(rng)
    close(po.masked_mean(values, mask), verl_F.masked_mean(values, mask))
    close(po.masked_mean(values, mask, dim=-1), verl_F.masked_mean(values, mask, axis=-1))
    close(po.masked_var(values, mask), verl_F.masked_var(values, mask))
    close(po.masked_whiten(values, mask), verl_F.masked_whiten(values, mask))
    close(po.masked_whiten(values, mask, shift_mean=False), verl_F.masked_whiten(values, mask, shift_mean=False))


def test_log_probs_and_entropy(rng):
    logits = torch.randn(3, 7, 50, generator=rng) * 3
    labels = torch.randint(0, 50, (3, 7), generator=rng)
    close(po.log_probs_from_logits(logits, labels), verl_F.logprobs_from_logits(logits, labels))
    close(po.entropy_from_logits(logits), verl_F.entropy_from_logits(logits))
