"""Single controller: dispatch modes, Ray worker groups, torch.distributed/FSDP2 inside them, colocation.

The Ray tests use real actors (CPU, gloo) in one module-scoped local Ray session. The worker classes
below live in this test module, which Ray workers cannot import (pytest puts tests/ on the driver's
sys.path only), so the module is pickled by value.
"""

import os
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from mtrl.protocol import DataBatch
from mtrl.single_controller import Dispatch, DispatchMode, GroupFuture, Worker, WorkerGroup, register
from mtrl.single_controller.base import make_colocated_class
from mtrl.single_controller.base.decorator import dispatch_all_to_all, dispatch_dp_compute

ray = pytest.importorskip("ray")

from mtrl.single_controller.ray import (  # noqa: E402
    RayClassWithInitArgs,
    RayResourcePool,
    RayWorkerGroup,
    create_colocated_worker_cls,
    init_ray,
)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def make_batch(n: int) -> DataBatch:
    return DataBatch(tensors={"x": torch.arange(n * 2, dtype=torch.float32).view(n, 2),
                              "ids": torch.arange(n) * 10},
                     non_tensors={"uid": [f"u{i}" for i in range(n)],
                                  "images": [[f"img{i}"] * (i % 3) for i in range(n)]},
                     meta={"step": 3})


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


# ---------------------------------------------------------------------- workers


class EchoWorker(Worker):
    def __init__(self, tag: str = "echo"):
        super().__init__()
        self.tag = tag

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def whoami(self, suffix: str = "") -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
                "device": str(self.device), "pid": os.getpid(), "tag": self.tag + suffix,
                "job_env": os.environ.get("MTRL_TEST_JOB_ENV"), "group_env": os.environ.get("MTRL_TEST_GROUP_ENV"),
                "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME")}

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def tag_rows(self, batch: DataBatch, offset=0.0) -> DataBatch:
        """Every field back, plus `y` = 2x + offset and the rank that saw each row."""
        out = DataBatch(dict(batch.tensors), dict(batch.non_tensors), dict(batch.meta))
        out.tensors["y"] = batch["x"] * 2 + offset
        out.tensors["rank"] = torch.full((len(batch),), self.rank)
        out.non_tensors["seen_by"] = np.array([f"rank{self.rank}"] * len(batch), dtype=object)
        return out

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def row_metrics(self, batch: DataBatch) -> dict:
        return {"rows": len(batch), "rank": self.rank}

    @register(dispatch_mode=Dispatch.ALL_TO_ALL)
    def scale(self, value: float, factor: float) -> float:
        return value * factor + self.rank

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def all_reduce_ranks(self) -> tuple:
        self.init_distributed()
        self.init_distributed()  # idempotent
        t = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(t)
        return t.item(), dist.get_backend(), dist.get_world_size()

    @register(dispatch_mode=Dispatch.RANK_ZERO)
    def gather_ranks(self) -> dict:
        """A collective every rank must join; only rank 0's view comes back."""
        self.init_distributed()
        ranks = [None] * self.world_size
        dist.all_gather_object(ranks, self.rank)
        return {"rank": self.rank, "all": ranks}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    def slow_echo(self, value, delay: float = 0.2):
        time.sleep(delay)
        return value, self.rank

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def fsdp_train_step(self, batch: DataBatch, lr: float) -> dict:
        """One SGD step of an FSDP2-sharded tiny MLP on this rank's rows; full parameters afterwards."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.init_distributed()
        model = tiny_model()
        mesh = init_device_mesh("cpu", (self.world_size,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local_shapes = [tuple(p.to_local().shape) for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        loss.backward()  # FSDP2 reduce-scatters the gradients, averaged over ranks
        optimizer.step()
        full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        return {"params": full, "local_shapes": local_shapes, "rows": len(batch)}


class ActorRole(Worker):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def identity(self) -> tuple:
        return "actor", self.rank, os.getpid()

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def act(self, batch: DataBatch) -> DataBatch:
        return DataBatch(tensors={"a": batch["x"] * self.scale})

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def all_reduce_ranks(self) -> float:
        self.init_distributed()
        t = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(t)
        return t.item()


class CriticRole(Worker):
    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def identity(self) -> tuple:
        return "critic", self.rank, os.getpid()

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def update(self, batch: DataBatch) -> dict:
        return {"critic/rows": len(batch), "critic/sum": float(batch["x"].sum()) + self.offset}

    @register(dispatch_mode=Dispatch.RANK_ZERO)
    def init_and_check(self) -> tuple:
        self.init_distributed()  # the actor role of this process may already have done it
        t = torch.ones(1)
        dist.all_reduce(t)
        return t.item(), dist.get_world_size()


# ---------------------------------------------------------------------- dispatch (no Ray)


def test_dp_dispatch_splits_uneven_and_passes_other_args():
    batch = make_batch(5)
    args, kwargs = dispatch_dp_compute(2, (batch, "cfg"), {"lr": 0.1, "other": batch})
    assert [len(a[0]) for a in args] == [3, 2]
    assert [a[1] for a in args] == ["cfg", "cfg"] and [k["lr"] for k in kwargs] == [0.1, 0.1]
    assert [len(k["other"]) for k in kwargs] == [3, 2]
    assert args[1][0].non_tensors["uid"].tolist() == ["u3", "u4"]
    with pytest.raises(TypeError, match="no DataBatch"):
        dispatch_dp_compute(2, (1,), {})
    with pytest.raises(ValueError, match="different sizes"):
        dispatch_dp_compute(2, (batch, make_batch(4)), {})


def test_all_to_all_needs_one_value_per_rank():
    args, kwargs = dispatch_all_to_all(2, ([1, 2],), {"f": (3, 4)})
    assert args == [(1,), (2,)] and kwargs == [{"f": 3}, {"f": 4}]
    with pytest.raises(ValueError, match="one value per rank"):
        dispatch_all_to_all(2, ([1, 2, 3],), {})


class _InProcessGroup(WorkerGroup):
    """Workers as plain objects in this process: exercises binding without Ray."""

    def _call_worker(self, rank, method_name, args, kwargs):
        return getattr(self._workers[rank], method_name)(*args, **kwargs)

    def _wait(self, futures, method_name):
        return futures


def test_binding_custom_mode_and_name_clash():
    reverse = DispatchMode(lambda n, a, k: ([a] * n, [k] * n), lambda outs: outs[::-1])

    class Custom(Worker):
        @register(dispatch_mode=reverse)
        def rank_of(self, rank_override):
            return rank_override

    port_before = os.environ.get("MASTER_PORT")
    workers = []
    for r in range(3):
        w = Custom()
        w._rank = r  # stand-in for the RANK variable a real group sets
        workers.append(w)
    assert os.environ.get("MASTER_PORT") == port_before  # building a Worker leaves the environment alone
    group = _InProcessGroup(workers, Custom)
    assert group.rank_of(7) == [7, 7, 7] and group.rank_of.__name__ == "rank_of"

    class Clashing(Worker):
        @register()
        def world_size(self):
            return 0

    with pytest.raises(TypeError, match="clashes"):
        _InProcessGroup([Clashing()], Clashing)


def test_colocated_class_exposes_prefixed_methods():
    fused = make_colocated_class({"actor": ActorRole, "critic": CriticRole})
    assert {"actor__identity", "actor__act", "critic__identity", "critic__update"} <= set(dir(fused))
    with pytest.raises(ValueError, match="role name"):
        make_colocated_class({"bad__role": ActorRole})


# ---------------------------------------------------------------------- Ray groups


@pytest.fixture(scope="module")
def ray_session():
    assert not ray.is_initialized()
    # Ray worker processes inherit the driver's environment at ray.init: a stale rendezvous there
    # must not leak into the groups (each group's rank 0 picks its own port).
    stale = {"MASTER_ADDR": "10.255.255.1", "MASTER_PORT": "1"}
    saved = {k: os.environ.get(k) for k in stale}
    os.environ.update(stale)
    try:
        init_ray(num_cpus=6, object_store_memory=200 * 1024**2, env_vars={"MTRL_TEST_JOB_ENV": "job"})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def echo_group(ray_session):
    pool = RayResourcePool([2], use_gpu=False)
    group = RayWorkerGroup(pool, RayClassWithInitArgs(EchoWorker, tag="t"), name_prefix="echo",
                           env_vars={"MTRL_TEST_GROUP_ENV": "group"})
    yield group
    group.shutdown()


def test_one_to_all_ranks_and_env(echo_group):
    infos = echo_group.whoami("!")
    assert [i["rank"] for i in infos] == [0, 1] and [i["local_rank"] for i in infos] == [0, 1]
    assert {i["world_size"] for i in infos} == {2} and {i["device"] for i in infos} == {"cpu"}
    assert {i["tag"] for i in infos} == {"t!"}
    assert len({i["pid"] for i in infos}) == 2 and os.getpid() not in {i["pid"] for i in infos}
    assert {(i["job_env"], i["group_env"], i["gloo_ifname"]) for i in infos} == {("job", "group", "lo")}


def test_dp_compute_uneven_split_and_gather(echo_group):
    batch = make_batch(5)
    out = echo_group.tag_rows(batch, offset=torch.tensor(1.0))  # a tensor kwarg: put once, shared by ranks
    assert isinstance(out, DataBatch) and len(out) == 5
    assert out["rank"].tolist() == [0, 0, 0, 1, 1]
    assert out["seen_by"].tolist() == ["rank0"] * 3 + ["rank1"] * 2
    assert torch.equal(out["x"], batch["x"]) and torch.equal(out["ids"], batch["ids"])
    assert torch.equal(out["y"], batch["x"] * 2 + 1.0)
    assert out["uid"].tolist() == batch["uid"].tolist() and out["images"].tolist() == batch["images"].tolist()
    assert out.meta["step"] == 3
    # Results that are not batches (metrics) come back as a list, rank order.
    assert echo_group.row_metrics(batch) == [{"rows": 3, "rank": 0}, {"rows": 2, "rank": 1}]
    # Fewer rows than ranks: a rank gets an empty chunk and still runs.
    assert [m["rows"] for m in echo_group.row_metrics(make_batch(1))] == [1, 0]


def test_all_to_all_and_non_blocking(echo_group):
    assert echo_group.scale([1.0, 2.0], factor=[10.0, 100.0]) == [10.0, 201.0]
    future = echo_group.slow_echo("hi")
    assert isinstance(future, GroupFuture) and len(future.futures) == 2
    assert future.get() == [("hi", 0), ("hi", 1)]


def test_gloo_all_reduce_and_rank_zero(echo_group):
    assert echo_group.all_reduce_ranks() == [(3.0, "gloo", 2)] * 2
    assert echo_group.gather_ranks() == {"rank": 0, "all": [0, 1]}


def test_fsdp2_step_matches_single_process(echo_group):
    g = torch.Generator().manual_seed(1)
    batch = DataBatch(tensors={"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, 2, generator=g)})
    results = echo_group.fsdp_train_step(batch, lr=0.5)
    assert [r["rows"] for r in results] == [4, 4]
    # Parameters really are sharded: dim 0 of the first weight (8 rows) is split 4 + 4.
    assert results[0]["local_shapes"][0] == (4, 4)
    # Reference: the same step on the whole batch in this process (equal halves: mean of means = mean).
    model = tiny_model()
    initial = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    nn.functional.mse_loss(model(batch["x"]), batch["y"]).backward()
    optimizer.step()
    for name, expected in model.named_parameters():
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), name
        torch.testing.assert_close(results[0]["params"][name], expected.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(expected, initial[name])  # the step changed it


def test_colocated_roles_share_a_process_then_shutdown(ray_session):
    cpus_before = ray.available_resources().get("CPU", 0)
    pool = RayResourcePool([2], use_gpu=False)
    cls = create_colocated_worker_cls({"actor": RayClassWithInitArgs(ActorRole, scale=3.0),
                                       "critic": RayClassWithInitArgs(CriticRole, offset=0.5)})
    group = RayWorkerGroup(pool, cls, name_prefix="colo")
    roles = group.spawn(["actor", "critic"])
    actor, critic = roles["actor"], roles["critic"]
    try:
        actor_ids, critic_ids = actor.identity(), critic.identity()
        assert [i[:2] for i in actor_ids] == [("actor", 0), ("actor", 1)]
        assert [i[:2] for i in critic_ids] == [("critic", 0), ("critic", 1)]
        assert [i[2] for i in actor_ids] == [i[2] for i in critic_ids]  # same process per rank
        assert actor_ids[0][2] != actor_ids[1][2]

        batch = make_batch(5)
        assert torch.equal(actor.act(batch)["a"], batch["x"] * 3.0)
        metrics = critic.update(batch)
        assert [m["critic/rows"] for m in metrics] == [3, 2]
        assert metrics[0]["critic/sum"] == float(batch["x"][:3].sum()) + 0.5
        # One torch.distributed group per process, shared by the roles.
        assert actor.all_reduce_ranks() == [3.0, 3.0]
        assert critic.init_and_check() == (2.0, 2)
        assert not hasattr(actor, "update") and not hasattr(critic, "act")
        assert set(group.spawn()) == {"actor", "critic"}
        assert sorted(n for n in ray.util.list_named_actors() if n.startswith("colo_")) == \
            ["colo_Colocated_actor_critic_0", "colo_Colocated_actor_critic_1"]
    finally:
        group.shutdown()

    # Shut down: calls fail, the actors are dead, the placement group is gone and its CPUs are back.
    with pytest.raises(RuntimeError, match="shut down"):
        actor.identity()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(group.workers[0].__ray_ready__.remote())
    group.shutdown()  # idempotent
    deadline = time.time() + 20
    while time.time() < deadline:
        # (ray.util.state.list_actors needs the dashboard, which init_ray leaves off; named actors are
        # listed by the GCS.)
        alive = [name for name in ray.util.list_named_actors() if name.startswith("colo_")]
        cpus = ray.available_resources().get("CPU", 0)
        if not alive and cpus == cpus_before:
            break
        time.sleep(0.2)
    assert not alive and cpus == cpus_before
    assert pool._placement_groups is None


def test_a_started_group_creates_rank_0_at_once_and_the_others_when_waited_for(ray_session):
    """`RayWorkerGroup.start` requests the placement group and creates rank 0 without waiting; `result()` creates
    the other ranks with rank 0's rendezvous and is the group (once). An unused start releases everything."""
    cpus_before = ray.available_resources().get("CPU", 0)
    starting = RayWorkerGroup.start(RayResourcePool([2], use_gpu=False), RayClassWithInitArgs(EchoWorker, tag="s"),
                                    name_prefix="early")
    assert len(starting.actors) == 1
    group = starting.result()
    try:
        assert starting.result() is group and len(group.workers) == 2
        infos = group.whoami()
        assert [i["rank"] for i in infos] == [0, 1] and {i["tag"] for i in infos} == {"s"}
        assert group.all_reduce_ranks() == [(3.0, "gloo", 2)] * 2  # the ranks found each other
    finally:
        group.shutdown()
    unused = RayWorkerGroup.start(RayResourcePool([2], use_gpu=False), RayClassWithInitArgs(EchoWorker),
                                  name_prefix="unused")
    rank0 = unused.actors[0]
    unused.shutdown()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(rank0.__ray_ready__.remote(), timeout=60)
    deadline = time.time() + 20
    while time.time() < deadline:
        alive = [n for n in ray.util.list_named_actors() if n.startswith(("early_", "unused_"))]
        if not alive and ray.available_resources().get("CPU", 0) == cpus_before:
            break
        time.sleep(0.2)
    assert not alive and ray.available_resources().get("CPU", 0) == cpus_before
    assert unused.pool._placement_groups is None
