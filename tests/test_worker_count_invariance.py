"""The worker count and the micro-batch size must not change training (issue 19).

Each trainer (RL with GRPO + TPRL, RL with GAE and a critic, CHORD, SFT, DPO, reward model) runs two
steps from the same tiny model and data, once on 1 worker process with fixed micro-batches of 2 rows
and once on 2 worker processes with token-budget (dynamic) micro-batches; RL also on 2 workers with
fixed micro-batches of 4 (one per rank). Every step has two optimizer steps (two mini-batches), so both the split of
a mini-batch over ranks and the split of the batch into mini-batches are exercised. The losses,
gradient norms and other logged statistics must agree to 1e-5 relative in step 1 (two optimizer steps;
looser from step 2 on, and the final weights to a tenth of an lr step: see TOLERANCE) in fp32. RL generates with sampling: the responses agree because the HF engine seeds every
response by (seed, step, prompt uid, sample index), whichever worker generates it.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtrl.training.training_main import main
from mtrl.utils.shapes_task import write_preference_pairs
from shapes_assets import TEXT_VARYING_REWARD, shapes_task, tiny_vl_model

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


# Metrics that must agree; timing, throughput and rank-balance statistics legitimately differ.
COMPARED = ("actor/pg_loss", "actor/grad_norm", "actor/clipfrac", "actor/approx_kl", "actor/entropy",
            "actor/divergence_loss", "actor/entropy_bonus_loss", "actor/perception_token_fraction",
            "actor/scaling_factor_mean", "reward/overall", "critic/vf_loss", "critic/vf_clipfrac",
            "critic/grad_norm", "expert/sft_loss", "usual/pg_loss", "dpo/loss", "dpo/accuracy", "dpo/margin",
            "dpo/grad_norm", "reward_model/loss", "reward_model/margin", "reward_model/grad_norm",
            "response_length/mean")

TRAINERS = {
    "grpo_tprl": ["training.mode=rl", "optimization.disable_divergence=false",
                  "optimization.use_divergence_loss=true", "optimization.divergence_coef=0.1",
                  "optimization.entropy_bonus_coef=0.01"],
    "gae_critic": ["training.mode=rl", "optimization.advantage_estimator=gae", "worker.critic.optim.lr=1e-3",
                   "worker.critic.fsdp.mixed_precision_dtype=fp32"],
    "chord": ["training.mode=rl", "optimization.chord.enable=true", "optimization.chord.expert_data_ratio=0.2",
              "optimization.chord.mu_warmup_steps=0", "optimization.chord.mu_peak=0.5"],
    "sft": ["training.mode=sft"],
    "dpo": ["training.mode=dpo"],
    "reward_model": ["training.mode=reward_model"],
}

LAYOUTS = {
    "1 worker, micro-batches of 2": ["training.n_gpus_per_node=1", "worker.actor.dynamic_batching=false",
                                     "worker.critic.dynamic_batching=false",
                                     "worker.actor.micro_batch_size_per_device_for_update=2",
                                     "worker.critic.micro_batch_size_per_device_for_update=2"],
    "2 workers, dynamic micro-batches": ["training.n_gpus_per_node=2", "worker.actor.dynamic_batching=true",
                                         "worker.actor.max_token_len_per_device=300",
                                         "worker.critic.max_token_len_per_device=300"],
    "2 workers, micro-batches of 4": ["training.n_gpus_per_node=2", "worker.actor.dynamic_batching=false",
                                      "worker.critic.dynamic_batching=false",
                                      "worker.actor.micro_batch_size_per_device_for_update=4",
                                      "worker.critic.micro_batch_size_per_device_for_update=4"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mtrl.single_controller.ray import init_ray

    root = tmp_path_factory.mktemp("invariance")
    task = shapes_task()
    (root / "reward.py").write_text(TEXT_VARYING_REWARD)
    write_preference_pairs(task, "train", out_path=str(root / "pairs.jsonl"))
    init_ray(num_cpus=6)
    yield root, task, tiny_vl_model()
    ray.shutdown()


def run(setup, trainer: str, layout: str):
    root, task, model = setup
    name = f"{trainer}-{list(LAYOUTS).index(layout)}"
    run_dir = root / "runs" / name
    argv = [
        "stages=[]", f"dataset.train_files={task}/train.jsonl", f"dataset.sft_files={task}/train.jsonl",
        f"dataset.preference_files={root}/pairs.jsonl", f"dataset.image_dir={task}", "dataset.min_pixels=3136",
        "dataset.max_pixels=3136", "dataset.max_prompt_length=96", "dataset.max_response_length=8",
        "dataset.rollout_batch_size=8", "dataset.shuffle=false", "dataset.seed=3",
        "training.device=cpu", "training.max_steps=2", "training.val_freq=-1", "training.val_before_train=false",
        "training.save_freq=-1", "training.logger=[file]", f"training.save_checkpoint_path={run_dir}",
        f"training.experiment_name={name}", "training.seed=5",
        f"worker.actor.model.model_path={model}", "worker.actor.model.enable_gradient_checkpointing=false",
        "worker.actor.fsdp.mixed_precision_dtype=fp32", "worker.actor.optim.lr=1e-3",
        "worker.actor.optim.weight_decay=0.0", "worker.actor.global_batch_size=4",
        "worker.rollout.n=2", "worker.rollout.temperature=1.0", f"worker.reward.reward_fn_path={root}/reward.py",
        "optimization.advantage_estimator=grpo", "optimization.disable_divergence=true",
        "optimization.enable_entropy_filtering=true", "optimization.enable_perception_filtering=true",
        "optimization.enable_trajectory_reweighting=true",
        *TRAINERS[trainer], *LAYOUTS[layout]]
    assert main(argv) == 0, f"{trainer} on {layout} failed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "perf/step_seconds" in r}
    assert sorted(steps) == [1, 2]
    return steps, run_dir


def final_weights(run_dir: Path):
    """The trained policy (or reward model): the run's HF export, else its last sharded checkpoint."""
    if (run_dir / "huggingface").is_dir():
        weights = {}
        for f in sorted((run_dir / "huggingface").glob("*.safetensors")):
            weights.update(load_file(str(f)))
        return weights
    from mtrl.utils.checkpoint import load_model_state_dict

    return load_model_state_dict(str(run_dir / "global_step_2" / "actor"))


# Step 1 (two optimizer steps from the same weights) must agree to float precision. The weights then
# differ by float rounding amplified by Adam: an element whose true gradient is near zero (the key
# biases, which the softmax almost ignores) moves by a sizeable fraction of lr in the direction of its
# rounding noise. So from step 2 on, losses that are sums of cancelling terms (a group-centred policy
# loss) agree to 1e-3 relative, and the final weights to 1e-4 (a tenth of one lr step).
TOLERANCE = {1: dict(rel=1e-5, abs=1e-6), 2: dict(rel=1e-3, abs=1e-5)}
WEIGHT_ATOL = 1e-4
# The Bradley-Terry loss depends on score differences only: the score head's bias has no gradient but
# rounding noise, which Adam turns into +-lr steps. It is not compared.
NO_GRADIENT = {"score.bias"}


def assert_same_training(reference, other, what: str):
    (ref_steps, ref_dir), (steps, run_dir) = reference, other
    for step in (1, 2):
        compared = [k for k in COMPARED if k in ref_steps[step]]
        assert compared, f"no training metrics at step {step}"
        for key in compared:
            assert steps[step][key] == pytest.approx(ref_steps[step][key], **TOLERANCE[step]), \
                f"{what}: {key} at step {step}: {steps[step][key]} vs {ref_steps[step][key]}"
    return ref_dir, run_dir


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_training_does_not_depend_on_worker_count_or_micro_batches(setup, trainer):
    layouts = list(LAYOUTS) if trainer == "grpo_tprl" else list(LAYOUTS)[:2]
    reference = run(setup, trainer, layouts[0])
    first = reference[0][1]
    # The run really trained: a non-zero gradient in each step (else equality would be trivial).
    grad_key = next(k for k in ("actor/grad_norm", "dpo/grad_norm", "reward_model/grad_norm") if k in first)
    assert first[grad_key] > 1e-3
    for layout in layouts[1:]:
        other = run(setup, trainer, layout)
        ref_dir, run_dir = assert_same_training(reference, other, f"{trainer}, {layout}")
        expected, got = final_weights(ref_dir), final_weights(run_dir)
        assert expected and expected.keys() == got.keys()
        for name, value in expected.items():
            if name not in NO_GRADIENT:
                torch.testing.assert_close(got[name], value, rtol=0, atol=WEIGHT_ATOL, msg=f"{trainer}, {layout}: {name}")
