"""The registries the trainer and the actor choose from by config name: policy losses (the actor calls
the one `optimization.policy_loss` names, at both of its call sites) and advantage estimators (each
takes what the trainer hands it)."""

import inspect
import re

import pytest
import test_agent
import test_chord
import torch
from test_config import BASE

from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent, _global_counts, expert_masks
from mtrl.optimization import policy_optimization as po
from mtrl.optimization.config import POLICY_LOSS_NAMES, OptimizationConfig
from mtrl.training.training_main import main
from mtrl.config.worker import ActorConfig


@pytest.fixture
def halved_ppo():
    """A registered loss that is exactly half the PPO loss, with PPO's metrics; unregistered afterwards."""

    @po.register_policy_loss("halved_ppo")
    def halved(*args, **kwargs):
        loss, metrics = po.compute_policy_loss(*args, **kwargs)
        return 0.5 * loss, metrics

    yield "halved_ppo"
    del po.POLICY_LOSSES["halved_ppo"]


def test_ppo_is_the_default_policy_loss():
    assert OptimizationConfig().policy_loss == "ppo"
    assert po.get_policy_loss("ppo") is po.compute_policy_loss
    assert set(po.POLICY_LOSSES) == set(POLICY_LOSS_NAMES)


def test_unknown_or_duplicate_policy_loss_is_an_error():
    known = ", ".join(repr(n) for n in sorted(POLICY_LOSS_NAMES))
    with pytest.raises(ValueError, match=re.escape(f"unknown policy loss 'dppo_tv'; known: [{known}]")):
        po.get_policy_loss("dppo_tv")
    with pytest.raises(ValueError, match="policy loss 'ppo' is already registered"):
        po.register_policy_loss("ppo")(lambda *args, **kwargs: None)
    assert po.get_policy_loss("ppo") is po.compute_policy_loss


def test_unknown_policy_loss_in_the_config_exits_2_with_the_allowed_names(capsys):
    assert main([*BASE, "optimization.policy_loss=dppo_tv"]) == 2
    err = capsys.readouterr().err
    allowed = ", ".join(POLICY_LOSS_NAMES)
    assert f"`optimization.policy_loss` = 'dppo_tv' is not allowed. Allowed values: {allowed}." in err
    assert "Traceback" not in err


def test_the_actor_update_uses_the_configured_policy_loss(halved_ppo):
    initial = test_agent.tiny_model()
    ppo_model, ppo_metrics = test_agent.run_update(test_agent.ROWS, False, "token-mean")
    half_model, half_metrics = test_agent.run_update(test_agent.ROWS, False, "token-mean",
                                                     opt=OptimizationConfig(policy_loss=halved_ppo))
    assert half_metrics["actor/pg_loss"] == pytest.approx(0.5 * ppo_metrics["actor/pg_loss"], abs=1e-7)
    assert half_metrics["actor/clipfrac"] == pytest.approx(ppo_metrics["actor/clipfrac"])
    # One SGD step (lr 1, no clipping): the parameter change is linear in the loss, so it halves too.
    for (name, p0), p_ppo, p_half in zip(initial.named_parameters(), ppo_model.parameters(), half_model.parameters()):
        torch.testing.assert_close(p_half - p0, 0.5 * (p_ppo - p0), atol=1e-6, rtol=0, msg=name)


def test_the_chord_mixed_loss_uses_the_configured_policy_loss(halved_ppo):
    batch = test_chord.make_batch()
    agent = ParallelPolicyAgent(ActorConfig(dynamic_batching=False), test_agent.tiny_model(), torch.device("cpu"))
    batch.tensors["old_log_probs"] = agent.compute_log_probs(batch, 1.0)["log_probs"]
    norm = dict(zip(("usual", "expert"), _global_counts(list(expert_masks(batch)), torch.device("cpu"))))
    ppo_loss, ppo_metrics = agent._micro_batch_loss(batch, 1.0, OptimizationConfig(), norm)
    half_loss, half_metrics = agent._micro_batch_loss(batch, 1.0, OptimizationConfig(policy_loss=halved_ppo), norm)
    mu = batch.meta["chord_mu"]
    assert half_metrics["usual/pg_loss"] == pytest.approx(0.5 * ppo_metrics["usual/pg_loss"], abs=1e-7)
    assert half_metrics["expert/sft_loss"] == pytest.approx(ppo_metrics["expert/sft_loss"], abs=1e-7)
    expected = ppo_loss - (1 - mu) * 0.5 * ppo_metrics["usual/pg_loss"]
    assert half_loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_the_actor_hands_each_loss_its_optimization_settings():
    seen = []

    @po.register_policy_loss("recording_ppo")
    def recording(*args, settings, **kwargs):
        seen.append(settings)
        return po.compute_policy_loss(*args, settings=settings, **kwargs)

    try:
        opt = OptimizationConfig(policy_loss="recording_ppo", sapo_tau_positive=2.5)
        test_agent.run_update(test_agent.ROWS, False, "token-mean", opt=opt)
        batch = test_chord.make_batch()
        agent = ParallelPolicyAgent(ActorConfig(dynamic_batching=False), test_agent.tiny_model(), torch.device("cpu"))
        batch.tensors["old_log_probs"] = agent.compute_log_probs(batch, 1.0)["log_probs"]
        norm = dict(zip(("usual", "expert"), _global_counts(list(expert_masks(batch)), torch.device("cpu"))))
        agent._micro_batch_loss(batch, 1.0, opt, norm)
    finally:
        del po.POLICY_LOSSES["recording_ppo"]
    assert len(seen) == 2 and all(s is opt for s in seen)  # the RL call site, then CHORD's


# What DistributedTrainer._compute_advantages hands to compute_advantage_return ("values" with a
# critic; "reward_baselines" only for estimators that take them).
TRAINER_INPUTS = {"token_level_rewards", "response_mask", "index", "gamma", "lam", "norm_adv_by_std", "values",
                  "reward_baselines"}


@pytest.mark.parametrize("name", sorted(po.ADVANTAGE_ESTIMATORS))
def test_every_estimator_takes_only_what_the_trainer_hands_it(name):
    params = inspect.signature(po.get_advantage_estimator(name)).parameters
    required = {p for p, spec in params.items() if spec.default is inspect.Parameter.empty}
    assert required <= TRAINER_INPUTS, f"{name} needs {required - TRAINER_INPUTS}, which the trainer never passes"
    assert set(po.advantage_estimator_inputs(name)) == set(params)
    # Only ReMax needs the greedy baselines (a second generation) and only GAE the critic's values.
    assert ("reward_baselines" in required) == (name == "remax")
    assert ("values" in required) == (name == "gae")
