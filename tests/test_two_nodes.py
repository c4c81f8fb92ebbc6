"""Two Ray nodes on this machine: the quickstart's RL stage with `training.nnodes=2` (slow).

A Ray head and a second Ray node (two `ray start` processes with their own CPUs and a custom resource
each) form a cluster; the CLI joins it through RAY_ADDRESS with one worker per node. The workers must
report two different Ray nodes, and the run's metrics must equal those of the one-node run with two
workers (same seed) within float tolerance.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_end_to_end import run_cli

RAY_BIN = Path(sys.executable).parent / "ray"
STEPS = 2
# Metrics that depend on the model and data only (no timings, no per-rank balance statistics).
COMPARED = ("actor/pg_loss", "actor/entropy", "actor/approx_kl", "actor/grad_norm", "reward/overall",
            "response_length/mean", "val/reward_score")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive_nodes(address: str, env: dict) -> int:
    code = "import ray; ray.init(address=%r, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code % address], env=env, capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head (4 CPUs, resource node_a) and a second node (2 CPUs, node_b) on 127.0.0.1; stopped afterwards."""
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "GLOO_SOCKET_IFNAME": "lo"}
    ray_tmp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    commands = [
        [str(RAY_BIN), "start", "--head", f"--port={port}", "--num-cpus=4", '--resources={"node_a": 1}',
         "--include-dashboard=false", f"--temp-dir={ray_tmp}", *common],
        [str(RAY_BIN), "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"node_b": 1}', *common],
    ]
    logs, procs = [], []
    try:
        for i, command in enumerate(commands):
            logs.append(open(tmp_path / f"node{i}.log", "w"))
            # --block + a session of its own: stopping the node's process group touches no other Ray here.
            procs.append(subprocess.Popen(command, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                          start_new_session=True))
            if i == 0:
                deadline = time.time() + 120
                while True:  # the head's GCS accepts connections
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "node0.log").read_text()
                        time.sleep(1)
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 180
        while alive_nodes(address, env) < 2:
            assert time.time() < deadline, (tmp_path / "node1.log").read_text()
            time.sleep(2)
        yield address
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for log in logs:
            log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_rl_stage_on_two_nodes_equals_one_node(tmp_path, two_node_cluster, monkeypatch):
    one_node_dir, two_node_dir = tmp_path / "one", tmp_path / "two"
    one_node_dir.mkdir()
    two_node_dir.mkdir()
    _, one_node = run_cli(one_node_dir, "one_node", "training.nnodes=1", "training.n_gpus_per_node=2", steps=STEPS)

    monkeypatch.setenv("RAY_ADDRESS", two_node_cluster)
    proc, two_nodes = run_cli(two_node_dir, "two_nodes", "training.nnodes=2", "training.n_gpus_per_node=1",
                              steps=STEPS)
    # The worker group reports where each rank's process runs: two different Ray nodes.
    placement = re.search(r"2 workers on 2 nodes \(rank 0 on (\w+), rank 1 on (\w+)\)", proc.stderr)
    assert placement is not None, proc.stderr[-3000:]
    assert placement.group(1) != placement.group(2)

    assert [r["step"] for r in two_nodes] == [r["step"] for r in one_node]
    compared = 0
    for a, b in zip(one_node, two_nodes):
        for key in COMPARED:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["step"], key)
                compared += 1
    assert compared >= STEPS * 5
    assert "Connecting to existing Ray cluster" in proc.stdout + proc.stderr


def test_a_multi_node_pool_needs_as_many_nodes():
    """Two nodes' worth of workers on a one-node cluster: a clear error, not two placement groups on one node."""
    ray = pytest.importorskip("ray")
    from mtrl.single_controller.ray import RayResourcePool, init_ray

    init_ray(num_cpus=4)
    try:
        with pytest.raises(RuntimeError, match=r"could not find 2 distinct nodes for \[1, 1\] workers per node"):
            RayResourcePool([1, 1], use_gpu=False).placement_groups
    finally:
        ray.shutdown()
