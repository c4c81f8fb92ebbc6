"""Nothing is fetched from the network at run time unless a Hub id was asked for.

A real training run (the quickstart's RL stage, one step, with the built-in model and task generated locally)
under tests/no_network/sitecustomize.py: in the driver and in every Ray worker process, resolving another
host's name or connecting anywhere but this machine is refused and recorded. The run passes and records
nothing, without HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / RAY_USAGE_STATS_ENABLED set. A Hub id as the model
does try to reach the Hub (and fails with a message, not a traceback). The one exception is Ray's own cloud
probe (RAY_CLOUD_PROBES below)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_checkpoint import LENGTH_REWARD, QUICKSTART

HOOK_DIR = Path(__file__).resolve().parent / "no_network"
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "RAY_USAGE_STATS_ENABLED",
                    "WANDB_MODE")


def blocked_run(workdir: Path, name: str, *overrides: str):
    """`training_main` with the network blocked in every process; returns (process, refused attempts,
    command lines of the processes the hook was active in)."""
    (workdir / "length_reward.py").write_text(LENGTH_REWARD)
    log = workdir / f"{name}.network.log"
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_SWITCHES}
    env.update(MTRL_BLOCK_NETWORK=str(log), RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(HOOK_DIR)] + [p for p in [env.get("PYTHONPATH")] if p]))
    args = [sys.executable, "-m", "mtrl.training.training_main", f"config={QUICKSTART}", "stages=[]",
            "training.max_steps=1", f"training.experiment_name={name}", f"training.save_checkpoint_path=runs/{name}",
            "training.logger=[console,file]", "training.val_before_train=false", "dataset.val_files=",
            f"worker.reward.reward_fn_path={workdir / 'length_reward.py'}", *overrides]
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    lines = [line.split(" ", 2) for line in (log.read_text().splitlines() if log.exists() else [])]
    command_of = {pid: rest for pid, kind, rest in lines if kind == "start"}
    refused = [(command_of.get(pid, "?"), f"{kind} {rest}") for pid, kind, rest in lines if kind != "start"]
    return proc, refused, list(command_of.values())


# Ray's own dashboard process (started even with include_dashboard=False, for its usage-stats module) asks the
# cloud metadata services which cloud it runs on -- with usage stats off too (ray/_common/usage/usage_lib.py,
# get_cluster_config_to_report: one 1 s request each to link-local 169.254.169.254 and metadata.google.internal,
# answered inside a cloud VM, refused elsewhere). Nothing of MTRL's; allowed from that process only.
RAY_CLOUD_PROBES = {"resolve 169.254.169.254", "resolve metadata.google.internal", "connect 169.254.169.254:80"}


def not_ray_cloud_probe(command: str, attempt: str) -> bool:
    return not ("ray/dashboard/dashboard.py" in command and attempt in RAY_CLOUD_PROBES)


@pytest.mark.slow
def test_a_local_run_opens_no_connection_beyond_this_machine(tmp_path):
    proc, refused, starts = blocked_run(tmp_path, "offline")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert [r for r in refused if not_ray_cloud_probe(*r)] == [], refused
    # The hook was active in the driver and in the Ray worker processes (the FSDP ranks, the reward actor).
    assert any("training.experiment_name=offline" in s for s in starts)  # the driver (its argv: `-m config=...`)
    assert sum("default_worker.py" in s for s in starts) >= 2, starts
    assert (tmp_path / "runs" / "offline" / "global_step_1").is_dir()


@pytest.mark.slow
def test_a_hub_model_id_does_try_the_hub(tmp_path):
    proc, refused, _ = blocked_run(tmp_path, "hub", "worker.actor.model.model_path=mtrl-test/no-such-model",
                                   "worker.actor.model.build_tiny_if_missing=null")
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-5000:]}"
    assert "Traceback" not in proc.stderr and "mtrl: error:" in proc.stderr
    assert any("huggingface.co" in attempt for command, attempt in refused
               if "training.experiment_name=hub" in command), refused  # from the driver
