"""Agreement of the rollout correction with verl 0.9.1's (`trainer/ppo/rollout_corr_helper.py`) on random
tensors, to 1e-6: the weights, their metrics, the mismatch KL, and every policy loss with the weights
(verl's ``rollout_is_weights`` argument) - loss and gradient.

| MTRL | verl |
|---|---|
| ``tis``, level L, cap C | ``compute_rollout_correction_weights(rollout_is=L, rollout_is_threshold=C)`` |
| ``mis``, level L, cap C | the same with ``rollout_is_threshold="1/C_C"`` (IcePop) |
| ``mis``, sequence level | Seq-MIS (``decoupled_seq_is_rs``): weights x the ``seq_sum_k1`` rejection mask |
| ``rollout_corr/is_weight_mean`` | ``rollout_corr/rollout_is_mean`` |
| ``rollout/kl_actor_vs_rollout`` | ``rollout_corr/k3_kl`` |
"""

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
rollout_corr = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")

from test_verl_agreement import close, randn  # noqa: E402  (after the skip)
from test_verl_agreement_losses import DUAL, HIGH, LOW, inputs, verl_config  # noqa: E402

from mtrl.optimization import policy_optimization as po  # noqa: E402
from mtrl.optimization.config import OptimizationConfig  # noqa: E402

CAP = 1.5


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(2468)


def with_rollout(rng, scale=0.3, **kwargs):
    old, new, advantages, mask = inputs(rng, **kwargs)
    return old, old + randn(rng, *old.shape, scale=scale), new, advantages, mask


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_weights_and_metrics(rng, level):
    old, rollout, _, _, mask = with_rollout(rng, scale=0.3 if level == "token" else 0.2)
    log_ratio = old - rollout
    tis = po.compute_rollout_is_weights(old, rollout, mask, "tis", level, CAP)
    theirs, verl_metrics = rollout_corr.compute_rollout_correction_weights(log_ratio, mask, level, CAP)
    close(tis, theirs)
    ours = po.rollout_is_weight_metrics(tis, old, rollout, mask, level, CAP)
    close(ours["is_weight_mean"], verl_metrics["rollout_is_mean"])
    if level == "token":  # verl counts sequences at sequence level, MTRL tokens
        close(ours["ratio_fraction_high"], verl_metrics["rollout_is_ratio_fraction_high"])
        close(ours["ratio_fraction_low"], verl_metrics["rollout_is_ratio_fraction_low"])
    mis = po.compute_rollout_is_weights(old, rollout, mask, "mis", level, CAP)
    icepop, _ = rollout_corr.compute_rollout_correction_weights(log_ratio, mask, level, f"{1 / CAP}_{CAP}")
    close(mis, icepop)
    assert 0 < float(po.rollout_is_weight_metrics(mis, old, rollout, mask, level, CAP)["masked_fraction"]) < 1
    assert float((tis != mis).sum()) > 0  # the inputs reach beyond the cap


def test_sequence_mis_is_verls_seq_mis_preset(rng):
    old, rollout, _, _, mask = with_rollout(rng, scale=0.1)
    preset = rollout_corr.RolloutCorrectionConfig.decoupled_seq_is_rs(is_threshold=CAP, rs_threshold=f"{1 / CAP}_{CAP}")
    proto, kept_mask, metrics = rollout_corr.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, rollout_is=preset.rollout_is, rollout_is_threshold=preset.rollout_is_threshold,
        rollout_rs=preset.rollout_rs, rollout_rs_threshold=preset.rollout_rs_threshold)
    close(po.compute_rollout_is_weights(old, rollout, mask, "mis", "sequence", CAP),
          proto.batch["rollout_is_weights"] * kept_mask)
    mismatch = po.rollout_mismatch_metrics(old, rollout, mask)
    close(mismatch["kl_actor_vs_rollout"], metrics["rollout_corr/k3_kl"])


# (MTRL loss, verl loss_mode, aggregation modes compared: those test_verl_agreement_losses compares)
LOSSES = [("ppo", "vanilla", po.LOSS_AGG_MODES), ("gspo_token", "gspo", po.LOSS_AGG_MODES),
          ("cispo", "cispo", po.LOSS_AGG_MODES), ("clip_cov", "clip_cov", po.LOSS_AGG_MODES),
          ("kl_cov", "kl_cov", po.LOSS_AGG_MODES), ("sapo", "sapo", ("seq-mean-token-mean",)),
          ("gmpo", "geo_mean", ("seq-mean-token-mean",))]


@pytest.mark.parametrize("correction, level", [("tis", "token"), ("mis", "token"), ("tis", "sequence")])
@pytest.mark.parametrize("name, verl_name, modes", LOSSES)
def test_every_policy_loss_with_the_weights(rng, name, verl_name, modes, correction, level):
    old, rollout, new, advantages, mask = with_rollout(rng, scale=0.3 if level == "token" else 0.1,
                                                       empty_row=name != "gmpo")
    advantages = 3 * advantages if name == "clip_cov" else advantages  # covariances beyond verl's clip_cov_lb
    weights = po.compute_rollout_is_weights(old, rollout, mask, correction, level, CAP)
    for mode in modes:
        ours_in, theirs_in = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
        torch.manual_seed(0)
        loss, _ = po.get_policy_loss(name)(old, ours_in, advantages, mask, LOW, HIGH, DUAL, mode,
                                           settings=OptimizationConfig(), rollout_is_weights=weights)
        torch.manual_seed(0)
        verl_loss, _ = core_algos.get_policy_loss_fn(verl_name)(old, theirs_in, advantages, mask, mode, verl_config(),
                                                                rollout_is_weights=weights)
        close(loss, verl_loss)
        ours_grad, = torch.autograd.grad(loss, ours_in)
        theirs_grad, = torch.autograd.grad(verl_loss, theirs_in)
        close(ours_grad * mask, theirs_grad * mask)
