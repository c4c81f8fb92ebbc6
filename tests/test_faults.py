"""Crash injection (MTRL_CRASH_AT, mtrl/utils/faults.py): the process killed (os._exit) at each point of a
checkpoint save, of a training step and of the final export. Resuming never picks a half-written checkpoint
and gives the same metrics and weights as an uninterrupted run (bit-identical on CPU); a half-written
Hugging Face export never looks complete.

Fast: the checkpoint manager with an in-process worker group (test_checkpoint.fake_trainer), crashed in a
subprocess at each save point. Slow: one real run crashed at a different point on each of its restarts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtrl.utils import checkpoint as ckpt
from mtrl.utils.faults import CRASH_ENV, CRASH_EXIT_CODE, POINTS, _parse
from test_checkpoint import by_step, cli_env, computed_metrics, fake_trainer, resume, run_cli, save, train_steps

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TESTS = Path(__file__).resolve().parent

# In a subprocess: save step 1, train, save step 2 (twice: the second save replaces the first), each step's
# training deterministic (train_steps' seed), so the test can rebuild the state of any step itself.
SAVE_STEPS = f"""
import sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {str(TESTS)!r})
from test_checkpoint import fake_trainer, save, train_steps
trainer = fake_trainer(sys.argv[1])
for step in (1, 2, 2):
    if step != trainer.controller.global_step:
        g = trainer.actor_wg
        train_steps(g.model, g.optimizer, g.scheduler, 1, seed=step)
    trainer.controller.global_step = step
    save(trainer)
"""


def saves_crashing_at(run_dir, point):
    proc = subprocess.run([sys.executable, "-c", SAVE_STEPS, str(run_dir)], env={**os.environ, CRASH_ENV: point},
                          capture_output=True, text=True, timeout=300)
    return proc


def state_after(step):
    trainer = fake_trainer("/nonexistent")
    g = trainer.actor_wg
    for s in range(1, step + 1):
        train_steps(g.model, g.optimizer, g.scheduler, 1, seed=s)
    return {k: v.clone() for k, v in g.model.state_dict().items()}


@pytest.mark.parametrize("point,resumed_step,on_disk", [
    # Shards of step 2 written, nothing else: a `.partial` folder without metadata.
    ("checkpoint:after_shards@2", 1, {"global_step_1", "global_step_2.partial"}),
    # Complete but not renamed: still `.partial`, so not picked.
    ("checkpoint:before_rename@2", 1, {"global_step_1", "global_step_2.partial"}),
    # Renamed, tracker not yet written: the tracker's step 1 is resumed (step 2 is complete too, and is
    # replaced when the resumed run saves step 2 again).
    ("checkpoint:before_tracker@2", 1, {"global_step_1", "global_step_2"}),
    # Re-saving step 2: the complete old folder moved aside, the new one not renamed yet. Neither counts;
    # the tracker names step 2, which is missing, so the newest complete checkpoint (step 1) is resumed.
    ("checkpoint:during_rename@2", 1, {"global_step_1", "global_step_2.old", "global_step_2.partial"}),
])
def test_a_crash_inside_a_checkpoint_save_never_leaves_a_checkpoint_that_is_picked_half_written(
        tmp_path, point, resumed_step, on_disk):
    run_dir = tmp_path / "run"
    proc = saves_crashing_at(run_dir, point)
    assert proc.returncode == CRASH_EXIT_CODE, proc.stderr[-3000:]
    assert f"crashing at {point.split('@')[0]} (step 2)" in proc.stderr
    assert {p for p in os.listdir(run_dir) if p.startswith("global_step")} == on_disk
    assert ckpt.read_tracker(str(run_dir)) == (2 if point.startswith("checkpoint:during_rename") else 1)

    fresh = fake_trainer(run_dir)
    assert resume(fresh) == str(run_dir / f"global_step_{resumed_step}")
    assert fresh.controller.global_step == resumed_step
    expected = state_after(resumed_step)
    assert all(torch.equal(v, expected[k]) for k, v in fresh.actor_wg.model.state_dict().items())
    # The next save cleans up what the crash left and records itself.
    g = fresh.actor_wg
    train_steps(g.model, g.optimizer, g.scheduler, 1, seed=2)
    fresh.controller.global_step = 2
    save(fresh)
    assert {p for p in os.listdir(run_dir) if p.startswith("global_step")} == {"global_step_1", "global_step_2"}
    assert ckpt.read_tracker(str(run_dir)) == 2
    expected = state_after(2)
    loaded = ckpt.load_model_state_dict(str(run_dir / "global_step_2" / "actor"))
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_crash_point_names_are_checked_and_unset_costs_nothing():
    assert _parse(None) is None and _parse("") is None
    assert _parse("checkpoint:after_shards@3") == ("checkpoint:after_shards", 3)
    assert _parse("step:after_train") == ("step:after_train", None)
    with pytest.raises(ValueError, match="unknown crash point 'checkpoint:aftr_shards'"):
        _parse("checkpoint:aftr_shards")
    assert set(POINTS) >= {"checkpoint:after_shards", "checkpoint:before_tracker", "step:after_train"}


# ============================================================================= end to end through the CLI (slow)


def crashing_cli(monkeypatch, workdir, name, point, *overrides, steps, expect_rc=CRASH_EXIT_CODE):
    """run_cli with MTRL_CRASH_AT=point (None: no crash) in the run's environment."""
    if point:
        monkeypatch.setenv(CRASH_ENV, point)
    else:
        monkeypatch.delenv(CRASH_ENV, raising=False)
    try:
        return run_cli(workdir, name, *overrides, steps=steps, expect_rc=expect_rc)
    finally:
        monkeypatch.delenv(CRASH_ENV, raising=False)


def step_folders(run_dir):
    return sorted(p for p in os.listdir(run_dir) if p.startswith("global_step"))


@pytest.mark.slow
def test_a_run_crashed_at_every_point_then_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """4 RL steps, a checkpoint each. Straight; and crashed on each restart at another point: inside the save
    of step 2 (shards written), of step 3 (renamed, tracker not written), after training step 4 (not logged or
    saved). Each restart resumes from the last checkpoint the tracker names; the final run's metrics (each step
    logged once) and weights equal the straight run's exactly."""
    every = ("training.save_freq=1",)
    _, straight = run_cli(tmp_path, "straight", *every, steps=4)
    run_dir = tmp_path / "runs" / "crashed"

    proc, rows = crashing_cli(monkeypatch, tmp_path, "crashed", "checkpoint:after_shards@2", *every, steps=4)
    assert "crashing at checkpoint:after_shards (step 2)" in proc.stderr
    assert [r["step"] for r in rows] == [1] and ckpt.read_tracker(str(run_dir)) == 1
    assert step_folders(run_dir) == ["global_step_1", "global_step_2.partial"]

    proc, rows = crashing_cli(monkeypatch, tmp_path, "crashed", "checkpoint:before_tracker@3", *every, steps=4)
    assert f"resumed from {run_dir / 'global_step_1'} at step 1" in proc.stderr
    assert [r["step"] for r in rows] == [1, 2] and ckpt.read_tracker(str(run_dir)) == 2
    assert step_folders(run_dir) == ["global_step_1", "global_step_2", "global_step_3"]  # 3 complete, not recorded

    proc, rows = crashing_cli(monkeypatch, tmp_path, "crashed", "step:after_train@4", *every, steps=4)
    assert f"resumed from {run_dir / 'global_step_2'} at step 2" in proc.stderr
    assert [r["step"] for r in rows] == [1, 2, 3] and ckpt.read_tracker(str(run_dir)) == 3

    proc, rows = crashing_cli(monkeypatch, tmp_path, "crashed", None, *every, steps=4, expect_rc=0)
    assert f"resumed from {run_dir / 'global_step_3'} at step 3" in proc.stderr
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # every step once, though steps 2-4 were run twice
    expected, got = by_step(straight), by_step(rows)
    assert all(expected[s]["actor/grad_norm"] > 0 for s in (1, 2, 3, 4))
    for step in (1, 2, 3, 4):
        assert computed_metrics(got[step]) == computed_metrics(expected[step]), f"step {step}"  # bit-identical
    for step in (3, 4):
        wa = ckpt.load_model_state_dict(str(tmp_path / "runs" / "straight" / f"global_step_{step}" / "actor"))
        wb = ckpt.load_model_state_dict(str(run_dir / f"global_step_{step}" / "actor"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"step {step}"


@pytest.mark.slow
def test_a_crash_while_exporting_leaves_no_export_that_looks_complete(tmp_path, monkeypatch):
    """DPO exports the model at the end (as every stage does, for the next one to load). Rank 0 dies just
    before renaming the written folder into place: the run exits 1 naming the export, `huggingface/` does not
    exist; the rerun finds the last step done and exports again, the weights of the last checkpoint."""
    from safetensors.torch import load_file

    pairs = ("training.mode=dpo", "dataset.preference_files=outputs/quickstart/shapes/train_pairs.jsonl")
    run_dir = tmp_path / "runs" / "dpo"
    proc, _ = crashing_cli(monkeypatch, tmp_path, "dpo", "export:before_rename", *pairs, steps=2, expect_rc=1)
    assert "died during `export_hf`" in proc.stderr and f"global_step_2, is intact" in proc.stderr
    assert not (run_dir / "huggingface").exists()
    assert (run_dir / ".huggingface.tmp" / "config.json").is_file()  # written, under a name nothing loads

    proc, rows = crashing_cli(monkeypatch, tmp_path, "dpo", None, *pairs, steps=2, expect_rc=0)
    assert "already reached its last step" in proc.stderr and [r["step"] for r in rows] == [1, 2]
    assert not (run_dir / ".huggingface.tmp").exists()
    exported = load_file(str(run_dir / "huggingface" / "model.safetensors"))
    saved = ckpt.load_model_state_dict(str(run_dir / "global_step_2" / "actor"))
    assert exported and all(torch.equal(exported[k], saved[k]) for k in exported)
