"""Stopping on SIGTERM / SIGINT: the handlers (in-process, fast) and a real signal to a training run (slow):
it exits within a bound with 128 + SIGTERM, leaves a checkpoint, says how to resume, and resuming
continues from that checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mtrl.training.signals import StopRequested, stop_on_signals
from mtrl.utils import checkpoint as ckpt
from test_checkpoint import LENGTH_REWARD, QUICKSTART, cli_env, run_cli


def test_first_signal_sets_the_flag_second_abandons_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as flag:
        assert flag.signum is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signum == signal.SIGTERM  # only a flag: the code goes on
        with pytest.raises(StopRequested) as abandoned:
            os.kill(os.getpid(), signal.SIGINT)
    assert abandoned.value.step is None and abandoned.value.exit_code == 128 + signal.SIGINT
    assert "abandoned" in str(abandoned.value)
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_message_says_where_the_checkpoint_is_and_how_to_resume():
    stop = StopRequested(signal.SIGTERM, step=3, checkpoint="/runs/x/global_step_3")
    assert stop.exit_code == 143
    assert "SIGTERM after step 3" in str(stop) and "/runs/x/global_step_3" in str(stop)
    assert "training.find_last_checkpoint=true" in str(stop)


# Seconds from the end of the step that was running at the signal (or from the signal, when it came between
# steps) to the exit: one checkpoint save, the worker and Ray shutdown.
EXIT_BOUND_S = 20


@pytest.mark.slow
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(tmp_path):
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    run_dir = tmp_path / "runs" / "preempted"
    args = [sys.executable, "-m", "mtrl.training.training_main", f"config={QUICKSTART}", "stages=[]",
            "training.max_steps=200", "training.experiment_name=preempted", "training.save_checkpoint_path=runs/preempted",
            "training.logger=[file]", "training.val_before_train=false", "dataset.val_files=",
            f"worker.reward.reward_fn_path={tmp_path / 'length_reward.py'}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-5000:]
        assert time.monotonic() < deadline, "no step logged within 10 minutes"
        time.sleep(0.2)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    exited = time.time()
    assert proc.returncode == 128 + signal.SIGTERM, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    stopped_at = rows[-1]["step"]
    assert 1 <= stopped_at < 200
    step_end = max(signalled, os.path.getmtime(metrics))  # the last step's line is written when it ends
    assert exited - step_end < EXIT_BOUND_S, f"{exited - step_end:.1f} s from the end of the step to the exit"
    checkpoint = run_dir / f"global_step_{stopped_at}"
    assert ckpt.is_complete_checkpoint(str(checkpoint)) and ckpt.read_tracker(str(run_dir)) == stopped_at
    assert "received SIGTERM" in err and f"stopped by SIGTERM after step {stopped_at}" in err
    assert str(checkpoint) in err and "training.find_last_checkpoint=true" in err
    print(f"SIGTERM: stopped after step {stopped_at}, exit {exited - step_end:.1f} s after the step ended, "
          f"{exited - signalled:.1f} s after the signal")

    # The same command (one more step) continues from that checkpoint.
    proc, rows = run_cli(tmp_path, "preempted", steps=stopped_at + 1)
    assert f"resumed from {checkpoint} at step {stopped_at}" in proc.stderr
    assert [r["step"] for r in rows][-2:] == [stopped_at, stopped_at + 1]
