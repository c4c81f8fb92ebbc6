"""A worker process killed mid-step (SIGKILL, as the out-of-memory killer does): the controller stops the rest
of the group, which is blocked in a gloo collective with the dead rank, and exits non-zero within a bound,
naming the worker, the phase and how to resume; the last checkpoint is intact and the run resumes from it.
Fast: a real two-actor Ray group with a rank blocked in a collective. Slow: a real training run."""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import ray

from mtrl.single_controller import Dispatch, Worker, WorkerDiedError, register
from mtrl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup, init_ray
from mtrl.utils import checkpoint as ckpt
from test_checkpoint import LENGTH_REWARD, QUICKSTART, cli_env, run_cli

# Ray workers cannot import this test module (tests/ is on the driver's path only): pickle it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Seconds from the kill to the controller's exit: Ray reports the death at once; then the group is killed,
# the trackers closed and Ray shut down.
EXIT_BOUND_S = 30


class CollectiveWorker(Worker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def setup(self):
        self.init_distributed(timeout_s=600)
        return os.getpid()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def all_reduce_after(self, seconds):
        """Rank 1 sleeps, rank 0 waits for it in the all-reduce (as FSDP ranks wait for a slow one)."""
        import torch
        import torch.distributed as dist

        if self.rank == 1:
            time.sleep(seconds)
        value = torch.ones(1)
        dist.all_reduce(value)
        return float(value)


@pytest.fixture(scope="module")
def ray_session():
    init_ray(num_cpus=4, object_store_memory=200 * 1024**2)
    yield
    ray.shutdown()


def test_a_killed_rank_stops_the_group_and_names_rank_role_and_method(ray_session):
    group = RayWorkerGroup(RayResourcePool([2], use_gpu=False), RayClassWithInitArgs(CollectiveWorker))
    pids = group.setup()
    assert group.all_reduce_after(0).get() == [2.0, 2.0]
    future = group.all_reduce_after(120)
    time.sleep(1)
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError) as died:
        future.get()
    assert time.monotonic() - start < 10  # not after rank 0's gloo timeout (600 s here)
    assert died.value.rank == 1 and died.value.method == "all_reduce_after"
    assert died.value.role == "CollectiveWorker"
    message = str(died.value)
    assert "worker rank 1 (CollectiveWorker) died during `all_reduce_after`" in message
    assert f"pid {pids[1]}" in message and "out-of-memory killer" in message
    # Rank 0 was killed with the group while blocked in the all-reduce, or had already failed in it (gloo: the
    # peer closed the connection); either way it returns nothing, and the group refuses further calls.
    with pytest.raises((ray.exceptions.RayActorError, ray.exceptions.RayTaskError)):
        ray.get(future.futures[0], timeout=30)
    with pytest.raises(RuntimeError, match="shut down"):
        group.setup()


def _pids_with_env(marker: str, **env) -> list:
    """Processes whose environment holds MTRL_TEST_RUN=marker and every KEY=value of `env` (read from /proc)."""
    wanted = {f"MTRL_TEST_RUN={marker}".encode()} | {f"{k}={v}".encode() for k, v in env.items()}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                variables = set(f.read().split(b"\0"))
        except OSError:
            continue
        if wanted <= variables:
            found.append(int(name))
    return found


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_step_exits_naming_it_and_the_run_resumes(tmp_path):
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    run_dir = tmp_path / "runs" / "killed"
    marker = uuid.uuid4().hex
    args = [sys.executable, "-m", "mtrl.training.training_main", f"config={QUICKSTART}", "stages=[]",
            "training.max_steps=50", "training.experiment_name=killed", "training.save_checkpoint_path=runs/killed",
            "training.save_freq=1", "training.logger=[file]", "training.val_before_train=false", "dataset.val_files=",
            f"worker.reward.reward_fn_path={tmp_path / 'length_reward.py'}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env={**cli_env(), "MTRL_TEST_RUN": marker}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):  # step 1 trained, saved and logged
        assert proc.poll() is None, proc.communicate()[1][-5000:]
        assert time.monotonic() < deadline, "no step logged within 10 minutes"
        time.sleep(0.2)
    time.sleep(1.0)  # into the next step (generation takes several seconds)
    victims = _pids_with_env(marker, RANK=1, WORLD_SIZE=2)
    assert len(victims) == 1, victims
    killed = time.monotonic()
    os.kill(victims[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    exit_s = time.monotonic() - killed
    assert proc.returncode == 1, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    assert exit_s < EXIT_BOUND_S, f"{exit_s:.1f} s from the kill to the exit"
    last = ckpt.read_tracker(str(run_dir))
    checkpoint = run_dir / f"global_step_{last}"
    assert last >= 1 and ckpt.is_complete_checkpoint(str(checkpoint))
    message = next(line for line in err.splitlines() if line.startswith("mtrl: error:"))
    assert "worker rank 1 (ActorRolloutRefWorker, role actor) died during `" in message, message
    assert f"pid {victims[0]}" in message and "The group's other workers were stopped" in message
    assert f"The last checkpoint, {checkpoint}, is intact" in message
    assert "training.find_last_checkpoint=true" in message
    assert "Traceback" not in err
    phase = message.split("died during `")[1].split("`")[0]
    assert not _pids_with_env(marker, RANK=0, WORLD_SIZE=2), "rank 0 outlived the run"
    print(f"SIGKILL of rank 1 during `{phase}`: exit 1 after {exit_s:.1f} s; last checkpoint step {last}")

    # The same command (one more step) continues from that checkpoint.
    proc, rows = run_cli(tmp_path, "killed", "training.save_freq=1", steps=last + 1)
    assert f"resumed from {checkpoint} at step {last}" in proc.stderr
    assert [r["step"] for r in rows] == list(range(1, last + 2))  # nothing logged twice
