"""Training stages: config resolution (overrides, run directories, weights handed from stage to stage,
validation naming the stage), and end-to-end runs from one command each (slow): SFT warmup then RL with
CHORD (finished stages skipped when the command runs again), SFT -> reward model -> RL with
`reward_type: model`, and a finished RL stage extended by raising its max_steps."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtrl.training.stages import resolve_stages, trainer_class, write_done_marker
from mtrl.training.training_config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SFT_CHORD = REPO / "configs" / "sft_then_chord.yaml"
RM_RL = REPO / "configs" / "reward_model_then_rl.yaml"


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return f"config={path}"


BASE = """
dataset: {train_files: t.jsonl, sft_files: s.jsonl, preference_files: p.jsonl, rollout_batch_size: 8}
training: {save_checkpoint_path: RUN, experiment_name: exp, n_gpus_per_node: 2}
optimization: {advantage_estimator: grpo}
worker:
  actor: {global_batch_size: 4, model: {model_path: base_model, build_tiny_if_missing: qwen2_vl}}
  rollout: {n: 2}
  reward: {reward_fn_path: r.py}
"""


def test_stages_resolve_run_dirs_modes_and_weights(tmp_path):
    cfg = load_config([write(tmp_path, BASE + """
stages:
  - {name: sft, mode: sft, training: {max_steps: 3}, worker: {actor: {optim: {lr: 1.0e-3}}}}
  - {name: rm, mode: reward_model}
  - {name: rl, mode: rl, worker: {reward: {reward_type: model}}, optimization: {chord: {enable: true}}}
""")])
    sft, rm, rl = resolve_stages(cfg)
    assert [s.mode for s in (sft, rm, rl)] == ["sft", "reward_model", "rl"]
    assert sft.run_dir == os.path.join("RUN", "sft") and sft.config.training.save_checkpoint_path == sft.run_dir
    assert sft.export_dir == os.path.join("RUN", "sft", "huggingface")
    assert sft.config.training.max_steps == 3 and rl.config.training.max_steps is None  # overrides stay in their stage
    assert sft.config.worker.actor.optim.lr == 1e-3 and rl.config.worker.actor.optim.lr == 1e-6
    assert sft.config.training.experiment_name == "exp-sft"
    # The first stage starts from the configured model; later ones from the last policy stage's export.
    assert sft.config.worker.actor.model.model_path == "base_model"
    assert rm.config.worker.actor.model.model_path == sft.export_dir
    assert rl.config.worker.actor.model.model_path == sft.export_dir  # a reward model is not a policy
    assert rl.config.worker.actor.model.build_tiny_if_missing is None
    assert rl.config.worker.reward.reward_model_path == rm.export_dir
    assert trainer_class(sft.config).__name__ == "SFTTrainer"
    assert trainer_class(rm.config).__name__ == "PreferenceTrainer"
    assert trainer_class(rl.config).__name__ == "ChordTrainer"


@pytest.mark.parametrize("stages,match", [
    ("[{name: a, mode: sft, training: {max_stepz: 3}}]", r"stage 'a' \(stages\[0\]\).*max_stepz.*max_steps"),
    ("[{name: a, mode: ppo}]", r"stages\[0\].mode.*not allowed"),
    ("[{name: a, mode: sft}, {name: a, mode: rl}]", "used by an earlier stage"),
    ("[{name: 'a/b', mode: sft}]", "name"),
    ("[{name: a, mode: dpo, dataset: {preference_files: ''}}]", r"stage 'a'.*preference_files"),
    ("[{name: a, mode: rl, worker: {reward: {reward_type: model}}}]", "reward_model_path"),
    ("[{name: a, mode: sft, training: {mode: rl}}]", "contradicts"),
])
def test_bad_stages_are_config_errors_naming_the_stage(tmp_path, stages, match):
    with pytest.raises(ConfigError, match=match):
        load_config([write(tmp_path, BASE + f"stages: {stages}\n")])


def test_single_mode_runs_validate_their_data(tmp_path):
    with pytest.raises(ConfigError, match="sft_files"):
        load_config([write(tmp_path, BASE), "training.mode=sft", "dataset.sft_files="])
    with pytest.raises(ConfigError, match="chord.*sft_files"):
        load_config([write(tmp_path, BASE), "optimization.chord.enable=true", "dataset.sft_files="])
    cfg = load_config([write(tmp_path, BASE), "training.mode=dpo", "optimization.dpo.loss_type=ipo"])
    assert trainer_class(cfg).__name__ == "PreferenceTrainer"
    with pytest.raises(ConfigError, match="loss_type"):
        load_config([write(tmp_path, BASE), "training.mode=dpo", "optimization.dpo.loss_type=kto"])


def test_a_stage_is_done_only_for_the_settings_it_finished_with(tmp_path):
    def stage(*overrides):
        cfg = load_config([write(tmp_path, BASE + "stages: [{name: rl, mode: rl}]\n"), *overrides])
        cfg.training.save_checkpoint_path = str(tmp_path / "run")
        return resolve_stages(cfg)[0]

    two = stage("training.max_steps=2")
    assert two.finished_with() is None and not two.done
    os.makedirs(two.export_dir)
    (tmp_path / "run" / "rl" / "huggingface" / "config.json").write_text("{}")
    write_done_marker(two, two.settings, seconds=1.0)
    assert two.done and two.finished_with() == {"max_steps": 2, "total_epochs": 10, "data_files": "t.jsonl"}
    assert stage("training.max_steps=2").done
    assert not stage("training.max_steps=4").done  # raised: the stage runs again (from its last checkpoint)
    assert not stage("training.max_steps=2", "training.total_epochs=20").done
    assert not stage("training.max_steps=2", "dataset.train_files=u.jsonl").done


def test_shipped_stage_configs_are_valid():
    for path in (SFT_CHORD, RM_RL):
        stages = resolve_stages(load_config([f"config={path}"]))
        assert len(stages) >= 2


# ----------------------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("stages_e2e")


def run_cli(workdir: Path, config: Path, *overrides: str):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "mtrl.training.training_main", f"config={config}", *overrides]
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def metrics(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sft_then_chord_from_one_command_and_resume_skips_finished_stages(workdir):
    run = workdir / "outputs" / "sft_then_chord" / "run"
    run_cli(workdir, SFT_CHORD, "stages[0].training.max_steps=12", "stages[0].training.val_freq=12",
                   "training.max_steps=3", "training.val_freq=3")
    sft_rows = metrics(run / "sft" / "metrics.jsonl")
    losses = [r["expert/sft_loss"] for r in sft_rows if "expert/sft_loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert "val/accuracy" in sft_rows[-1]
    rl_rows = [r for r in metrics(run / "rl" / "metrics.jsonl") if "actor/pg_loss" in r]
    assert [r["step"] for r in rl_rows] == [1, 2, 3]
    assert {"mu", "expert/sft_loss", "usual/pg_loss", "actor/perception_token_fraction"} <= set(rl_rows[0])
    # warmup 2 steps to 0.5, then cosine to 0.05 over 6 steps: steps 1, 2, 3.
    assert [r["mu"] for r in rl_rows] == pytest.approx([0.25, 0.5, 0.05 + 0.45 * 0.5 * (1 + math.cos(math.pi / 6))])
    assert all(r["expert/fraction"] == pytest.approx(0.2) for r in rl_rows)
    # The RL stage started from the SFT stage's export; both stages exported and are marked done.
    rl_config = (run / "rl" / "config.yaml").read_text()
    assert "sft/huggingface" in rl_config
    for stage in ("sft", "rl"):
        assert (run / stage / "huggingface" / "model.safetensors").is_file()
        assert (run / stage / "stage_done.json").is_file()
    # Running the command again skips both stages.
    again = run_cli(workdir, SFT_CHORD, "stages[0].training.max_steps=12", "training.max_steps=3")
    assert again.stdout.count("already finished") == 2


@pytest.mark.slow
def test_reward_model_stage_then_rl_with_reward_type_model(workdir):
    run = workdir / "outputs" / "reward_model_then_rl" / "run"
    run_cli(workdir, RM_RL, "stages[0].training.max_steps=6", "stages[0].training.val_freq=6",
            "stages[1].training.max_steps=8", "stages[1].training.val_freq=8", "training.max_steps=2",
            "training.val_freq=2")
    rm_rows = metrics(run / "reward_model" / "metrics.jsonl")
    assert rm_rows[0]["step"] == 0 and "val/accuracy" in rm_rows[0]  # val_before_train
    assert {"reward_model/loss", "reward_model/accuracy", "val/accuracy"} <= set(rm_rows[-1])
    assert (run / "reward_model" / "huggingface" / "mtrl_reward_model.json").is_file()
    rl_rows = [r for r in metrics(run / "rl" / "metrics.jsonl") if "actor/pg_loss" in r]
    assert len(rl_rows) == 2
    # Rewards come from the reward model; the shapes reward function still reports accuracy.
    assert {"reward/overall", "reward/accuracy", "reward/function_score"} <= set(rl_rows[0])
    assert rl_rows[0]["reward/overall"] != rl_rows[0]["reward/function_score"]
    rl_config = (run / "rl" / "config.yaml").read_text()
    assert "reward_model/huggingface" in rl_config and "sft/huggingface" in rl_config


@pytest.mark.slow
def test_raising_max_steps_of_a_finished_stage_trains_the_extra_steps(workdir):
    """RL stage: 2 steps, then the same command with max_steps=4 trains steps 3-4, equal to a straight 4-step
    run (metrics and final weights); the same command once more skips the stage."""
    from mtrl.utils import checkpoint as ckpt
    from test_checkpoint import LENGTH_REWARD, QUICKSTART, by_step, computed_metrics

    reward = workdir / "length_reward.py"
    reward.write_text(LENGTH_REWARD)
    config = workdir / "rl_stage.yaml"  # the quickstart's RL part as the only stage
    config.write_text(QUICKSTART.read_text().split("\nstages:")[0] + "\nstages:\n  - {name: rl, mode: rl}\n")

    def run(root, steps):
        proc = run_cli(workdir, config, f"training.max_steps={steps}", f"training.save_checkpoint_path={root}",
                       "training.val_before_train=false", "dataset.val_files=", "training.logger=[file]",
                       f"worker.reward.reward_fn_path={reward}")
        rows = metrics(workdir / root / "rl" / "metrics.jsonl")
        return proc, rows

    _, straight = run("runs/stage_straight", 4)
    _, first = run("runs/stage_extended", 2)
    assert [r["step"] for r in first] == [1, 2]
    proc, extended = run("runs/stage_extended", 4)
    assert "finished with other settings (max_steps 2 -> 4)" in proc.stdout
    assert "global_step_2 at step 2" in proc.stderr
    assert [r["step"] for r in extended] == [1, 2, 3, 4]
    a, b = by_step(straight), by_step(extended)
    assert all(a[s]["actor/grad_norm"] > 0 for s in (3, 4))
    for step in (3, 4):
        expected, got = computed_metrics(a[step]), computed_metrics(b[step])
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6, rel=1e-6), f"step {step}: {key}"
    wa = ckpt.load_model_state_dict(str(workdir / "runs/stage_straight/rl/global_step_4/actor"))
    wb = ckpt.load_model_state_dict(str(workdir / "runs/stage_extended/rl/global_step_4/actor"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    done = json.loads((workdir / "runs/stage_extended/rl/stage_done.json").read_text())
    assert done["settings"]["max_steps"] == 4
    again, _ = run("runs/stage_extended", 4)
    assert "already finished" in again.stdout
    assert [r["step"] for r in metrics(workdir / "runs/stage_extended/rl/metrics.jsonl")] == [1, 2, 3, 4]
