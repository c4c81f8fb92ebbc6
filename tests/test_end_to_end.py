"""End-to-end runs of the CLI on the quickstart config: Ray, 2 FSDP2 CPU workers, generation, rewards,
the update and validation, for every estimator and the main option combinations (slow)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

# The metrics the seed README promises (mtrl_readme.md), plus timing, length and memory statistics.
CORE_METRICS = {"actor/pg_loss", "actor/approx_kl", "actor/clipfrac", "actor/entropy", "actor/grad_norm",
                "perf/tokens_per_second", "perf/samples_per_second", "perf/throughput", "reward/overall",
                "val/reward_score", "timing/generate", "timing/update_actor", "response_length/mean",
                "memory/host_rss_gb"}
TPRL_METRICS = {"actor/entropy_token_fraction", "actor/perception_token_fraction",
                "actor/sensitivity_score_mean", "actor/scaling_factor_mean"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for all runs, so the generated task and tiny model are made once."""
    return tmp_path_factory.mktemp("e2e")


def processes_under(path: str) -> list:
    """Command lines of running processes that name `path` (a Ray temp dir: its raylet, gcs_server, workers)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if path in line]


def run_cli(workdir: Path, name: str, *overrides: str, steps: int = 3, env_vars: dict = None):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           **(env_vars or {})}
    args = [sys.executable, "-m", "mtrl.training.training_main", f"config={QUICKSTART}",
            f"training.max_steps={steps}", f"training.val_freq={steps}", f"training.experiment_name={name}",
            f"training.save_checkpoint_path=runs/{name}", "stages=[]",  # the RL stage only
            *overrides]
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rows = [json.loads(line) for line in (workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return proc, rows


def keys_of(rows):
    return set().union(*(r.keys() for r in rows))


@pytest.mark.slow
def test_quickstart_runs_end_to_end_with_tprl(workdir):
    # A Ray temp dir of this run only (short: Ray's socket paths must fit 107 bytes), so that other Ray
    # sessions on the machine do not count.
    ray_tmp = tempfile.mkdtemp(prefix="mtrl-ray-", dir="/tmp")
    proc, rows = run_cli(workdir, "quickstart", env_vars={"RAY_TMPDIR": ray_tmp})
    train_rows = [r for r in rows if "actor/pg_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert CORE_METRICS | TPRL_METRICS <= keys_of(rows)
    assert all(0 < r["actor/perception_token_fraction"] <= 0.6 for r in train_rows)
    assert all(abs(r["actor/scaling_factor_mean"] - 1) < 1e-4 for r in train_rows)
    assert (workdir / "runs" / "quickstart" / "config.yaml").is_file()
    assert "run directory" in proc.stdout
    assert not processes_under(ray_tmp), f"Ray processes were left behind: {processes_under(ray_tmp)}"
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("estimator,extra", [
    ("gae", ["optimization.disable_divergence=false"]),          # critic + divergence as reward penalty
    ("rloo", ["optimization.disable_divergence=false", "optimization.use_divergence_loss=true",
              "optimization.divergence_penalty=low_var_kl"]),  # divergence as a loss term
    ("remax", ["optimization.entropy_bonus_type=adaptive", "optimization.entropy_target=100",
               "optimization.entropy_bonus_step=0.01"]),  # + the adaptive entropy bonus, always below target
    ("grpo", ["optimization.online_filtering=true", "optimization.filter_low=0.0"]),
    ("reinforce_plus_plus", ["optimization.divergence_type=adaptive", "optimization.disable_divergence=false"]),
])
def test_each_estimator(workdir, estimator, extra):
    _, rows = run_cli(workdir, f"est_{estimator}", f"optimization.advantage_estimator={estimator}", *extra, steps=2)
    keys = keys_of(rows)
    assert CORE_METRICS <= keys
    if estimator == "gae":
        assert {"critic/vf_loss", "timing/update_critic", "timing/values", "actor/reward_divergence"} <= keys
    if estimator == "rloo":
        assert "actor/divergence_loss" in keys and "actor/reward_divergence" not in keys
    if estimator == "remax":
        assert "timing/remax_baseline" in keys
        train_rows = [r for r in rows if "actor/pg_loss" in r]
        assert [r["actor/entropy_bonus_coef"] for r in train_rows] == pytest.approx([0.01, 0.02])
        assert all(r["actor/entropy_bonus_loss"] < 0 for r in train_rows)
    if estimator == "grpo":
        assert {"filter/tries", "filter/kept_fraction"} <= keys


@pytest.mark.slow
def test_tprl_fully_off(workdir):
    _, rows = run_cli(workdir, "plain", "optimization.enable_entropy_filtering=false",
                      "optimization.enable_perception_filtering=false",
                      "optimization.enable_trajectory_reweighting=false", steps=2)
    keys = keys_of(rows)
    assert CORE_METRICS <= keys
    assert not keys & TPRL_METRICS and "timing/perception" not in keys


@pytest.mark.slow
def test_val_only_builds_no_optimizer_reference_or_critic(workdir):
    run_cli(workdir, "quickstart_assets", steps=1)  # make sure data and model exist
    proc, rows = run_cli(workdir, "val_only", "training.val_only=true", "dataset.train_files=",
                         "optimization.advantage_estimator=gae", "optimization.disable_divergence=false")
    assert len(rows) == 1 and rows[0]["step"] == 0 and "val/reward_score" in rows[0]
    assert "actor/pg_loss" not in rows[0]
    assert "critic" not in proc.stdout + proc.stderr.lower().replace("colocated_actor", "")


@pytest.mark.slow
def test_joins_an_existing_cluster_through_ray_address(workdir, tmp_path):
    """`RAY_ADDRESS` makes the driver join a running cluster (the multi-node path) instead of starting one."""
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    with socket.socket() as probe:  # a free port for the head's GCS
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    log = open(tmp_path / "head.log", "w")
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # --block keeps the head in this process group, so stopping it touches no other Ray on the machine.
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=6",
                             "--include-dashboard=false", f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:  # wait until the head's GCS accepts connections
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()
                time.sleep(1)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        proc, rows = run_cli(workdir, "cluster", steps=1)
        assert "val/reward_score" in keys_of(rows)
        assert "Connecting to existing Ray cluster" in proc.stdout + proc.stderr
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=120)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
