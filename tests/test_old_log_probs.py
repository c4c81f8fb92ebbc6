"""Old log-probs without the actor's pass (`worker.actor.old_log_probs`, issue 15).

* auto, on-policy (one optimizer step per rollout): the update takes its own forward's log-probs, detached, as
  pi_old and computes the entropy and rollout-correction metrics and weights itself; the step equals the one
  with the recomputed pass (agent level with SGD, and through the CLI on 1 and 2 workers) and the pass is gone.
* rollout: the hf engine's recorded log_softmax(logits / T) of each sampled token and the entropy equal the
  actor's forward (fp32, 1e-5), and a TPRL step with them equals the recomputed one.
"""

import json

import pytest
import torch
from test_agent import ROWS, make_batch, tiny_model
from test_rollout import prompts, tiny  # noqa: F401  (the engine tests' tiny Qwen2-VL and its two prompts)

from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
from mtrl.config.worker import ActorConfig
from mtrl.models.attention import enable_padding_free_attention
from mtrl.models.tiny import make_tiny_model
from mtrl.optimization import policy_optimization as po
from mtrl.optimization.config import OptimizationConfig
from mtrl.workers.actor.actor_worker import sequence_position_ids
from mtrl.workers.rollout import SamplingParams
from mtrl.workers.rollout.hf_engine import HFRolloutEngine

# ------------------------------------------------------------------ the rollout engine's pi_old


@pytest.mark.parametrize("params", [
    SamplingParams(n=3, temperature=0.7, top_k=5, max_new_tokens=6, seed=3),    # shaped sampling: pi_old differs
    SamplingParams(n=2, temperature=1.3, top_p=0.8, max_new_tokens=6, seed=4),  # from the behaviour policy
    SamplingParams(n=1, temperature=0.0, max_new_tokens=6),                      # greedy: T = 1
])
def test_engine_policy_log_probs_and_entropy_equal_the_actor_forward(tiny, prompts, params):
    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    engine = HFRolloutEngine(lambda: make_tiny_model("qwen2_vl", seed=123).model, tiny.model.config, [eos],
                             tiny.tokenizer.pad_token_id, torch.device("cpu"), micro_batch_size=4, policy_stats=True)
    engine.load_weights(tiny.model.state_dict().items())
    out = engine.generate(prompts.select(), params)
    mask = out["response_mask"]
    input_ids = torch.cat([out["prompts"], out["responses"]], 1)
    attention_mask = torch.cat([out["attention_mask"], mask], 1)
    out.tensors.update(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=sequence_position_ids(tiny.model.config, input_ids, attention_mask,
                                                          out.non_tensors["multi_modal_inputs"]))
    enable_padding_free_attention(tiny.model)
    agent = ParallelPolicyAgent(ActorConfig(micro_batch_size_per_device_for_experience=2, dynamic_batching=False),
                                tiny.model, torch.device("cpu"))
    actor = agent.compute_log_probs(out, temperature=params.temperature or 1.0, return_entropy=True)
    assert out["old_log_probs"].shape == mask.shape and torch.all(out["old_log_probs"][mask == 0] == 0)
    torch.testing.assert_close(out["old_log_probs"], actor["log_probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["entropys"], actor["entropy"] * mask, atol=1e-5, rtol=0)
    # real numbers, and pi_old is not the behaviour policy where sampling reshapes the distribution
    assert float(out["entropys"][mask.bool()].mean()) > 0.5
    if not params.greedy:
        assert (out["old_log_probs"] - out["rollout_log_probs"]).abs().max() > 1e-2


def test_engine_without_policy_stats_returns_only_the_behaviour_log_probs(tiny, prompts):
    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    engine = HFRolloutEngine(lambda: make_tiny_model("qwen2_vl", seed=123).model, tiny.model.config, [eos],
                             tiny.tokenizer.pad_token_id, torch.device("cpu"))
    engine.load_weights(tiny.model.state_dict().items())
    out = engine.generate(prompts.select(), SamplingParams(n=1, temperature=1.0, max_new_tokens=3, seed=1))
    assert "rollout_log_probs" in out.tensors and "old_log_probs" not in out.tensors and "entropys" not in out.tensors


@pytest.mark.parametrize("overrides, message", [
    (["worker.actor.old_log_probs=engine"], "`worker.actor.old_log_probs` = 'engine' is not allowed"),
    (["worker.actor.old_log_probs=rollout", "worker.rollout.name=vllm"], "needs `worker.rollout.name` = hf and no LoRA"),
    (["worker.actor.old_log_probs=rollout", "worker.actor.model.peft_type=lora"], "needs `worker.rollout.name` = hf"),
])
def test_old_log_probs_from_an_engine_that_is_not_the_actor_exit_2(capsys, overrides, message):
    from test_config import BASE

    from mtrl.training.training_main import main

    assert main([*BASE, *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ------------------------------------------------------------------ the on-policy update


def on_policy_update(recompute: bool, opt: OptimizationConfig, micro_batch_size: int = 3, dynamic: bool = False):
    """One SGD step (lr 1, no clipping: the parameter change is the gradient) on one mini-batch, with the old
    log-probs recomputed by the actor's pass (and the controller's metrics from them) or left to the update."""
    model = tiny_model()
    agent = ParallelPolicyAgent(ActorConfig(micro_batch_size_per_device_for_update=micro_batch_size,
                                            micro_batch_size_per_device_for_experience=5, max_grad_norm=1e9,
                                            dynamic_batching=dynamic, max_token_len_per_device=25),
                                model, torch.device("cpu"), torch.optim.SGD(model.parameters(), lr=1.0))
    batch = make_batch()
    # An engine's log-probs near the actor's, so that the correction weights and metrics are not trivial.
    noise = 0.2 * torch.randn(batch["responses"].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = agent.compute_log_probs(batch, temperature=1.0, return_entropy=True)
    batch.tensors["rollout_log_probs"] = (exact["log_probs"] + noise) * batch["response_mask"]
    controller = {}
    if recompute:
        batch.tensors.update(old_log_probs=exact["log_probs"], entropys=exact["entropy"])
        controller = po.apply_rollout_correction(batch.tensors, opt)
        controller["actor/entropy"] = float(po.masked_mean(batch["entropys"], batch["response_mask"]))
    metrics = agent.update_policy(batch, temperature=1.0, opt=opt, mini_batch_size=ROWS)
    return model, {**metrics, **controller}


@pytest.mark.parametrize("correction", ["none", "tis", "mis"])
@pytest.mark.parametrize("micro_batch_size, dynamic", [(3, False), (ROWS, False), (0, True)])
def test_on_policy_update_equals_the_recomputed_one(correction, micro_batch_size, dynamic):
    opt = OptimizationConfig(rollout_correction=correction, rollout_correction_level="sequence",
                             rollout_is_cap=1.5, entropy_bonus_coef=0.1)
    initial = tiny_model()
    expected, expected_metrics = on_policy_update(True, opt, micro_batch_size or 1, dynamic)
    model, metrics = on_policy_update(False, opt, micro_batch_size or 1, dynamic)
    moved = max((p - p0).abs().max().item() for p, p0 in zip(expected.parameters(), initial.parameters()))
    assert moved > 1e-3  # a real step
    for (name, p), q in zip(expected.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)
    assert metrics.keys() == expected_metrics.keys()
    assert "actor/entropy" in metrics and ("rollout_corr/is_weight_mean" in metrics) == (correction != "none")
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert metrics["rollout/logprob_abs_diff_max"] > metrics["rollout/logprob_abs_diff_mean"] > 0.05


def test_an_update_without_old_log_probs_must_be_one_optimizer_step():
    model = tiny_model()
    agent = ParallelPolicyAgent(ActorConfig(ppo_epochs=1), model, torch.device("cpu"),
                                torch.optim.SGD(model.parameters(), lr=1.0))
    with pytest.raises(ValueError, match="one optimizer step"):
        agent.update_policy(make_batch(), temperature=1.0, opt=OptimizationConfig(), mini_batch_size=ROWS // 2)


# ------------------------------------------------------------------ through the CLI (slow)

# One mini-batch of 4 prompts x 2 responses per step: one optimizer step per rollout.
RUN = ["stages=[]", "dataset.min_pixels=3136", "dataset.max_pixels=3136", "dataset.max_prompt_length=96",
       "dataset.max_response_length=8", "dataset.rollout_batch_size=4", "dataset.shuffle=false", "dataset.seed=3",
       "training.device=cpu", "training.max_steps=1", "training.val_freq=-1", "training.val_before_train=false",
       "training.save_freq=-1", "training.logger=[file]", "training.seed=5",
       "worker.actor.model.enable_gradient_checkpointing=false", "worker.actor.fsdp.mixed_precision_dtype=fp32",
       "worker.actor.optim.lr=1e-3", "worker.actor.optim.weight_decay=0.0", "worker.actor.global_batch_size=4",
       "worker.rollout.n=2", "worker.rollout.temperature=1.0", "optimization.advantage_estimator=grpo",
       "optimization.disable_divergence=true", "optimization.rollout_correction=tis"]
TPRL_OFF = ["optimization.enable_entropy_filtering=false", "optimization.enable_perception_filtering=false",
            "optimization.enable_trajectory_reweighting=false"]
TPRL_ON = ["optimization.enable_entropy_filtering=true", "optimization.enable_perception_filtering=true",
           "optimization.enable_trajectory_reweighting=true"]
WORKERS = {1: ["training.n_gpus_per_node=1", "worker.actor.dynamic_batching=false",
               "worker.actor.micro_batch_size_per_device_for_update=2"],
           2: ["training.n_gpus_per_node=2", "worker.actor.dynamic_batching=true",
               "worker.actor.max_token_len_per_device=300"]}
COMPARED = ("actor/pg_loss", "actor/grad_norm", "actor/clipfrac", "actor/approx_kl", "actor/entropy",
            "actor/entropy_bonus_loss", "actor/entropy_threshold", "actor/perception_selected_mean",
            "actor/scaling_factor_mean", "reward/overall", "response_length/mean", "rollout/logprob_abs_diff_mean",
            "rollout/logprob_abs_diff_max", "rollout/kl_actor_vs_rollout", "rollout_corr/is_weight_mean")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from shapes_assets import TEXT_VARYING_REWARD, shapes_task, tiny_vl_model

    from mtrl.single_controller.ray import init_ray

    root = tmp_path_factory.mktemp("old_log_probs")
    (root / "reward.py").write_text(TEXT_VARYING_REWARD)
    init_ray(num_cpus=6)
    yield root, shapes_task(), tiny_vl_model()
    ray.shutdown()


def run(cli, name, *overrides):
    """(step-1 metrics, trained weights) of one CLI run."""
    from mtrl.training.training_main import main
    from mtrl.utils.checkpoint import load_model_state_dict

    root, task, model = cli
    run_dir = root / name
    assert main([*RUN, f"dataset.train_files={task}/train.jsonl", f"dataset.image_dir={task}",
                 f"training.save_checkpoint_path={run_dir}", f"training.experiment_name={name}",
                 f"worker.actor.model.model_path={model}", f"worker.reward.reward_fn_path={root}/reward.py",
                 *overrides]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "perf/step_seconds" in r)
    weights = load_model_state_dict(str(run_dir / "global_step_1" / "actor"))
    assert weights
    return step, weights


def assert_same_step(expected, got, weight_atol, rel=1e-5, abs=1e-6):
    (expected_metrics, expected_weights), (metrics, weights) = expected, got
    compared = [k for k in COMPARED if k in expected_metrics]
    assert "actor/entropy" in compared and "rollout_corr/is_weight_mean" in compared
    for key in compared:
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=rel, abs=abs), key
    assert expected_weights.keys() == weights.keys()
    for name, value in expected_weights.items():
        torch.testing.assert_close(weights[name], value, atol=weight_atol, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_auto_skips_the_pass_on_policy_with_the_same_step(cli, workers):
    recomputed = run(cli, f"recompute-{workers}", *TPRL_OFF, *WORKERS[workers], "worker.actor.old_log_probs=recompute")
    auto = run(cli, f"auto-{workers}", *TPRL_OFF, *WORKERS[workers])
    assert "timing/old_log_probs" in recomputed[0] and "timing/old_log_probs" not in auto[0]
    assert recomputed[0]["actor/grad_norm"] > 1e-3
    # The recomputed pass and the update cut the rows into different micro-batches, and a shared-prompt forward
    # pads each to its longest response: pi_old and the update's log-probs then differ by float rounding (~1e-7),
    # which one Adam step turns into weight differences up to ~1e-6 (measured 1.2e-6 at most).
    assert_same_step(recomputed, auto, weight_atol=3e-6)


@pytest.mark.slow
def test_tprl_with_the_engine_old_log_probs_equals_the_recomputed_step(cli):
    recomputed = run(cli, "tprl-recompute", *TPRL_ON, *WORKERS[1])
    engine = run(cli, "tprl-rollout", *TPRL_ON, *WORKERS[1], "worker.actor.old_log_probs=rollout")
    assert "timing/old_log_probs" in recomputed[0] and "timing/old_log_probs" not in engine[0]
    assert "timing/perception" in engine[0]
    # The engine's log-probs are the actor's to ~1e-6 (not bit for bit): the group-centred policy loss and
    # TPRL's scaling (dependencies of ~1e-4 normalised by their spread) keep that relative error, ~1e-5, and
    # Adam's first step (about lr * sign(gradient)) turns it into up to a fraction of lr for parameters whose
    # gradient is ~0 (measured: 3.6e-4 with lr 1e-3).
    assert_same_step(recomputed, engine, weight_atol=5e-4, rel=1e-4, abs=1e-5)
