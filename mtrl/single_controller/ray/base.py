"""Ray-backed worker groups: one Ray actor per device, all in one torch.distributed group.

    init_ray()                                  join $RAY_ADDRESS, or start a small local Ray
    pool = RayResourcePool([n_per_node] * nnodes, use_gpu=True)
    group = RayWorkerGroup(pool, RayClassWithInitArgs(MyWorker, config))
    group.some_registered_method(batch)        # dispatched per the method's @register mode
    group.shutdown()
    starting = RayWorkerGroup.start(pool, ...)  # processes start while this one does other work
    group = starting.result()                   # waits for them; starting.shutdown() if unused

Colocated roles (one process per device holding several workers):

    cls = create_colocated_worker_cls({"actor": RayClassWithInitArgs(ActorWorker, config),
                                       "critic": RayClassWithInitArgs(CriticWorker, config)})
    group = RayWorkerGroup(pool, cls)
    roles = group.spawn()                      # {"actor": group view, "critic": group view}
    roles["critic"].update_critic(batch)

Placement: the pool reserves one STRICT_PACK placement group per node, one bundle per worker
({"CPU": c, "GPU": 1}, or {"CPU": c} on CPU). Worker `rank` runs in bundle `rank` (ranks numbered
node by node), so LOCAL_RANK is the bundle index within its node's placement group. With several
nodes each placement group is pinned to a different node (`training.nnodes` distinct machines).

Environment: each actor gets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT and
MTRL_USE_GPU through `runtime_env={"env_vars": ...}`. Ray starts a fresh worker process per distinct
runtime_env, so per-rank variables reach each process before Python (and torch) starts. We never use
`working_dir`: it would upload the project (and its virtualenv) to the cluster's object store.
Rendezvous: rank 0 is created first and picks a free port (MASTER_ADDR is 127.0.0.1 plus
GLOO_SOCKET_IFNAME=lo when the pool is on one node, else rank 0's node IP); the others are then
created with that address.
"""

import os
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mtrl.single_controller.base.colocated import (ROLE_SEPARATOR, ColocatedWorker, make_colocated_class,
                                                   role_method_prefix)
from mtrl.single_controller.base.worker import USE_GPU_ENV, Worker
from mtrl.single_controller.base.worker_group import WorkerDiedError, WorkerGroup
from mtrl.utils.logger import get_logger

logger = get_logger(__name__)

# Environment for every Ray worker process of the job (init_ray); user env_vars override these.
DEFAULT_WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",  # HF tokenizers fork-warn / deadlock inside actors otherwise
}
# The object store of a local Ray started by init_ray, unless given: big enough for batches with
# images, small enough for a shared machine (Ray's own default is 30% of RAM, as /dev/shm).
DEFAULT_OBJECT_STORE_MEMORY = 2 * 1024**3
# A local Ray started by init_ray: no idle worker processes started ahead for the driver (Ray's default starts
# one per CPU). Every MTRL actor has a runtime_env of its own (per-rank variables; the reward actors' PYTHONPATH),
# which such a process cannot take, so they only took CPU from the start-up of the processes that are used.
LOCAL_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}
PLACEMENT_GROUP_TIMEOUT_S = 300.0


def init_ray(num_cpus: Optional[int] = None, object_store_memory: Optional[int] = None,
             env_vars: Optional[Mapping[str, str]] = None, **ray_init_kwargs: Any) -> None:
    """Connect this driver to Ray (a no-op when already connected).

    With RAY_ADDRESS set (e.g. `auto` or `ray://head:10001`), join that cluster -- the multi-node case;
    its resources are the cluster's. Otherwise start a local Ray without dashboard, with `num_cpus`
    logical CPUs (may exceed the physical cores: workers mostly wait), a small object store and no idle
    worker processes started ahead (LOCAL_SYSTEM_CONFIG).
    `env_vars` reach every worker process of the job (merged under the per-actor variables).
    """
    if ray.is_initialized():
        return
    # Read by the Ray processes this driver starts (and by the driver itself): no usage-stats upload,
    # no token auth for a private local cluster.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    runtime_env = {"env_vars": {**DEFAULT_WORKER_ENV, **{k: str(v) for k, v in (env_vars or {}).items()}}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, **ray_init_kwargs)
    else:
        # address="local": always a new private cluster. Without it ray.init() attaches to any cluster
        # a `ray start` left running on this machine (and then rejects num_cpus).
        system_config = {**LOCAL_SYSTEM_CONFIG, **ray_init_kwargs.pop("_system_config", {})}
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus,
                 object_store_memory=object_store_memory or DEFAULT_OBJECT_STORE_MEMORY,
                 runtime_env=runtime_env, _system_config=system_config, **ray_init_kwargs)


# ---------------------------------------------------------------------- resources


class RayResourcePool:
    """Reserves `process_on_nodes[i]` worker slots on node i, one placement group per node.

    The placement groups are requested by `reserve()` (or on first use) and waited for on first use
    (`placement_groups`, `slots()`): at most PLACEMENT_GROUP_TIMEOUT_S for the cluster to have the resources.
    """

    def __init__(self, process_on_nodes: List[int], use_gpu: bool, num_cpus_per_worker: float = 1,
                 name_prefix: str = "") -> None:
        if not process_on_nodes or any(int(n) != n or n < 1 for n in process_on_nodes):
            raise ValueError(f"process_on_nodes must be positive worker counts per node, got {process_on_nodes}")
        if num_cpus_per_worker <= 0:
            raise ValueError(f"num_cpus_per_worker must be > 0, got {num_cpus_per_worker}")
        self.process_on_nodes = [int(n) for n in process_on_nodes]
        self.use_gpu = use_gpu
        self.num_cpus_per_worker = num_cpus_per_worker
        self.name_prefix = name_prefix
        self._placement_groups: Optional[List[PlacementGroup]] = None
        self._ready = False

    @property
    def world_size(self) -> int:
        return sum(self.process_on_nodes)

    @property
    def num_nodes(self) -> int:
        return len(self.process_on_nodes)

    def bundle(self) -> Dict[str, float]:
        """The resources of one worker slot."""
        return {"CPU": self.num_cpus_per_worker, "GPU": 1} if self.use_gpu else {"CPU": self.num_cpus_per_worker}

    def reserve(self) -> List[PlacementGroup]:
        """Request the placement groups (once) without waiting for them: actors placed in them start when the
        resources are there."""
        if self._placement_groups is None:
            self._placement_groups = self._create_placement_groups()
            self._ready = False
        return self._placement_groups

    @property
    def placement_groups(self) -> List[PlacementGroup]:
        groups = self.reserve()
        if not self._ready:
            self._wait_ready(groups)
            self._ready = True
        return groups

    def _nodes_with_room(self) -> List[str]:
        """One distinct alive node id per entry of `process_on_nodes`, each with room for that node's workers.

        STRICT_PACK keeps one placement group on one machine, but two groups could still share one: a
        multi-node pool pins each group to its own node (the `ray.io/node-id` label), largest nodes first.
        """
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        nodes.sort(key=lambda n: -n["Resources"].get("GPU" if self.use_gpu else "CPU", 0.0))
        chosen: List[str] = []
        for count in self.process_on_nodes:
            for node in nodes:
                if node["NodeID"] not in chosen and all(
                        node["Resources"].get(key, 0.0) >= count * amount for key, amount in self.bundle().items()):
                    chosen.append(node["NodeID"])
                    break
            else:
                raise RuntimeError(
                    f"Ray could not find {self.num_nodes} distinct nodes for {self.process_on_nodes} workers per node "
                    f"with {self.bundle()} each; the cluster's nodes: "
                    f"{[n['Resources'] for n in nodes]}")
        return chosen

    def _create_placement_groups(self) -> List[PlacementGroup]:
        groups = []
        node_ids = self._nodes_with_room() if self.num_nodes > 1 else [None]
        for node, (n, node_id) in enumerate(zip(self.process_on_nodes, node_ids)):
            name = f"{self.name_prefix}node{node}" if self.name_prefix else ""
            # STRICT_PACK: a node's workers share one machine (local ranks, NVLink, loopback rendezvous).
            selector = None if node_id is None else [{"ray.io/node-id": node_id}] * n
            groups.append(placement_group([self.bundle() for _ in range(n)], strategy="STRICT_PACK", name=name,
                                          bundle_label_selector=selector))
        return groups

    def _wait_ready(self, groups: List[PlacementGroup]) -> None:
        ready, _ = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=PLACEMENT_GROUP_TIMEOUT_S)
        if len(ready) < len(groups):
            self.remove()
            raise RuntimeError(
                f"Ray could not reserve {self.process_on_nodes} workers per node with {self.bundle()} each "
                f"within {PLACEMENT_GROUP_TIMEOUT_S:.0f}s; cluster resources: {ray.cluster_resources()}, "
                f"available: {ray.available_resources()}")

    def slots(self, wait: bool = True) -> Iterator[Tuple[int, PlacementGroup, int, int]]:
        """(rank, placement group, bundle index = local rank, workers on that node), in rank order; with
        `wait=False` the placement groups are only requested (`reserve`)."""
        rank = 0
        for pg, n in zip(self.placement_groups if wait else self.reserve(), self.process_on_nodes):
            for local_rank in range(n):
                yield rank, pg, local_rank, n
                rank += 1

    def remove(self) -> None:
        """Release the reservations (idempotent)."""
        for pg in self._placement_groups or []:
            remove_placement_group(pg)
        self._placement_groups = None


class RayClassWithInitArgs:
    """A worker class (plain Python, a `Worker` subclass) plus the arguments to construct it with.

    `options` are extra Ray actor options (e.g. `max_concurrency`, `memory`) for its actors.
    """

    def __init__(self, cls: type, *args: Any, **kwargs: Any) -> None:
        if isinstance(cls, ray.actor.ActorClass):
            raise TypeError("RayClassWithInitArgs takes the plain worker class, not a @ray.remote one; "
                            "the worker group makes the actors")
        if not (isinstance(cls, type) and issubclass(cls, Worker)):
            raise TypeError(f"{cls!r} is not a Worker subclass")
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.options: Dict[str, Any] = {}

    def update_options(self, **options: Any) -> "RayClassWithInitArgs":
        self.options.update(options)
        return self

    def __repr__(self) -> str:
        return f"RayClassWithInitArgs({self.cls.__name__})"


def create_colocated_worker_cls(class_dict: Mapping[str, RayClassWithInitArgs]) -> RayClassWithInitArgs:
    """One actor class running every role of `class_dict` in the same process.

    Build a `RayWorkerGroup` from the result, then `group.spawn()` for per-role groups. The roles'
    own Ray options are merged (later roles win on conflicts).
    """
    fused = make_colocated_class({role: spec.cls for role, spec in class_dict.items()})
    role_specs = {role: (spec.cls, spec.args, spec.kwargs) for role, spec in class_dict.items()}
    out = RayClassWithInitArgs(fused, role_specs)
    for spec in class_dict.values():
        out.update_options(**spec.options)
    return out


# ---------------------------------------------------------------------- worker group


class _GroupState:
    """What a group and its per-role views share: the actors and their resource pool."""

    def __init__(self, actors: List[ray.actor.ActorHandle], resource_pool: RayResourcePool) -> None:
        self.actors = actors
        self.resource_pool = resource_pool
        self.alive = True


def _death_cause(error: "ray.exceptions.RayActorError") -> str:
    """Ray's account of an actor's death in one line (it adds the actor's ids and a page of advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    pid = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("pid:")), "?")
    detail = next((line for line in lines if line.startswith("The actor is dead because")),
                  lines[0] if lines else type(error).__name__)
    detail = detail.split(" Some common causes")[0].rstrip(".")
    return f"{detail} (pid {pid}; the usual causes: the out-of-memory killer, a SIGKILL, a crash in native code)"


def _first_death(pending: List[ray.ObjectRef], rank_of: Dict[ray.ObjectRef, int], timeout_s: float = 5.0):
    """(rank, error) of the first of `pending` whose actor died (Ray needs a moment to notice), else None."""
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout_s) if pending else ([], [])
    for ref in sorted(ready, key=rank_of.get):
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            return rank_of[ref], e
        except ray.exceptions.RayTaskError:
            continue
    return None


def _node_id(_worker: Any) -> str:
    return ray.get_runtime_context().get_node_id()


def _is_small_value(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, ray.ObjectRef))


class StartingWorkerGroup:
    """A `RayWorkerGroup` whose actors are being created (`RayWorkerGroup.start`): the placement groups are requested
    and rank 0's actor is created, without waiting, so its process starts (Python, torch, the worker's module:
    seconds) while the caller does other work. `result()` waits for the placement groups and rank 0's rendezvous
    address, creates the other ranks with it, waits for every constructor and returns the group; `shutdown()`
    stops what was started, for a caller that will not use it. A failure in `result()` stops it too."""

    def __init__(self, pool: RayResourcePool, spec: RayClassWithInitArgs, name_prefix: Optional[str] = None,
                 env_vars: Optional[Mapping[str, str]] = None) -> None:
        self.name_prefix = name_prefix or f"mtrl_{uuid.uuid4().hex[:6]}"
        self.pool, self.spec = pool, spec
        self._remote_cls = ray.remote(spec.cls)
        self._common_env = {"WORLD_SIZE": str(pool.world_size), USE_GPU_ENV: "1" if pool.use_gpu else "0"}
        if pool.num_nodes == 1:
            # All ranks on one machine: rendezvous over loopback, whatever the host's interfaces are.
            self._common_env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
        self._options = dict(spec.options)
        self._runtime_env = dict(self._options.pop("runtime_env", None) or {})
        self._user_env = {**self._runtime_env.pop("env_vars", {}), **(env_vars or {})}
        self.actors: List[ray.actor.ActorHandle] = []
        self._group: Optional["RayWorkerGroup"] = None
        try:
            first = next(pool.slots(wait=False))
            # Rank 0 chooses the rendezvous. Blank what its process could inherit from the raylet (i.e. from
            # the driver's environment at ray.init), or every group would reuse one stale port.
            rank0 = self._create(first, {"MASTER_PORT": ""} if pool.num_nodes == 1 else
                                 {"MASTER_ADDR": "", "MASTER_PORT": ""})
            # Rank 0 picks a free port (and its node IP when multi-node) on its own machine.
            self._master = rank0.get_master_addr_port.remote()
        except BaseException:
            self.shutdown()
            raise

    def _create(self, slot: Tuple[int, PlacementGroup, int, int],
                master: Mapping[str, str]) -> ray.actor.ActorHandle:
        rank, pg, local_rank, local_world_size = slot
        # Precedence: our defaults < the caller's env_vars < the rendezvous variables of this rank.
        env = {**self._common_env, **{k: str(v) for k, v in self._user_env.items()}, **master, "RANK": str(rank),
               "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world_size)}
        options = {
            "name": f"{self.name_prefix}_{self.spec.cls.__name__}_{rank}",
            "num_cpus": self.pool.num_cpus_per_worker,
            "num_gpus": 1 if self.pool.use_gpu else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=local_rank),
            **self._options,
            "runtime_env": {**self._runtime_env, "env_vars": env},
        }
        actor = self._remote_cls.options(**options).remote(*self.spec.args, **self.spec.kwargs)
        self.actors.append(actor)
        return actor

    def result(self) -> "RayWorkerGroup":
        """The started group (waits for it once)."""
        if self._group is None:
            group = RayWorkerGroup.__new__(RayWorkerGroup)
            group._adopt(self)
            self._group = group
        return self._group

    def _wait(self) -> List[ray.actor.ActorHandle]:
        try:
            slots = list(self.pool.slots())  # waits for the placement groups
            if len(slots) > 1:
                addr, port = ray.get(self._master)
                for slot in slots[1:]:
                    self._create(slot, {"MASTER_ADDR": addr, "MASTER_PORT": str(port)})
            # Surface constructor errors here rather than at the first method call.
            ray.get([a.__ray_ready__.remote() for a in self.actors])
        except BaseException:
            self.shutdown()
            raise
        return self.actors

    def shutdown(self) -> None:
        """Stop the actors created so far and release the placement groups (idempotent; a started group's own
        `shutdown` is the one to use once `result()` returned)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        self.pool.remove()


class RayWorkerGroup(WorkerGroup):
    """World-size Ray actors of one worker class, one per slot of `resource_pool`."""

    def __init__(self, resource_pool: RayResourcePool, ray_cls_with_init: RayClassWithInitArgs,
                 name_prefix: Optional[str] = None, env_vars: Optional[Mapping[str, str]] = None) -> None:
        self._adopt(StartingWorkerGroup(resource_pool, ray_cls_with_init, name_prefix, env_vars))

    def _adopt(self, starting: StartingWorkerGroup) -> None:
        actors = starting._wait()
        self.name_prefix = starting.name_prefix
        self._state = _GroupState(actors, starting.pool)
        super().__init__(actors, starting.spec.cls)
        if starting.pool.num_nodes > 1:
            places = ", ".join(f"rank {r} on {node[:8]}" for r, node in enumerate(self.node_ids()))
            logger.info(f"{self.name_prefix}: {len(actors)} workers on {starting.pool.num_nodes} nodes ({places})")

    @staticmethod
    def start(resource_pool: RayResourcePool, ray_cls_with_init: RayClassWithInitArgs,
              name_prefix: Optional[str] = None, env_vars: Optional[Mapping[str, str]] = None) -> StartingWorkerGroup:
        """Create the group's actors without waiting for them (StartingWorkerGroup); `.result()` is the group."""
        return StartingWorkerGroup(resource_pool, ray_cls_with_init, name_prefix, env_vars)

    def node_ids(self) -> List[str]:
        """The Ray node id each rank's process runs on, as the worker itself reports it (rank order)."""
        return ray.get([a.__ray_call__.remote(_node_id) for a in self._state.actors])

    # ------------------------------------------------------------------ creation

    @classmethod
    def _view(cls, state: _GroupState, name_prefix: str, worker_cls: type, method_prefix: str) -> "RayWorkerGroup":
        """A group over existing actors (no new actors), exposing `worker_cls`'s methods."""
        view = cls.__new__(cls)
        view.name_prefix = name_prefix
        view._state = state
        WorkerGroup.__init__(view, state.actors, worker_cls, method_prefix)
        return view

    def spawn(self, roles: Optional[Iterable[str]] = None) -> Dict[str, "RayWorkerGroup"]:
        """Per-role groups over this group's colocated actors: {role: group}; all roles when None.

        Each role group's methods are the role class's registered methods, dispatched like a plain
        group's; the actors (and `shutdown`) are shared with this group.
        """
        if not issubclass(self._worker_cls, ColocatedWorker):
            raise TypeError(f"spawn() needs a group made from create_colocated_worker_cls(), "
                            f"not from {self._worker_cls.__name__}")
        role_classes = self._worker_cls.role_classes
        roles = list(role_classes) if roles is None else list(roles)
        unknown = [r for r in roles if r not in role_classes]
        if unknown:
            raise KeyError(f"unknown role(s) {unknown}; this group has {list(role_classes)}")
        return {role: self._view(self._state, f"{self.name_prefix}_{role}", role_classes[role],
                                 role_method_prefix(role)) for role in roles}

    # ------------------------------------------------------------------ calls

    def _call_worker(self, rank: int, method_name: str, args: tuple, kwargs: Dict[str, Any]) -> ray.ObjectRef:
        if not self._state.alive:
            raise RuntimeError(f"{self!r} was shut down")
        return getattr(self._workers[rank], method_name).remote(*args, **kwargs)

    def _wait(self, futures: List[ray.ObjectRef], method_name: str) -> List[Any]:
        # One result at a time, whichever rank finishes first: a dead rank is seen at once, not after the
        # ranks before it, which (FSDP) wait in a collective for the dead one -- until the gloo / NCCL
        # timeout, half an hour. A worker's exception is re-raised as soon as it arrives, likewise.
        rank_of = {ref: rank for rank, ref in enumerate(futures)}
        results: List[Any] = [None] * len(futures)
        pending = list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self.shutdown()  # the survivors are blocked in a collective with the dead rank
                    raise WorkerDiedError(rank_of[ref], self.role, method_name, _death_cause(e)) from None
                except ray.exceptions.RayTaskError:
                    # A rank killed mid-collective often shows first as its peers' collective error
                    # ("connection closed by peer"): name the dead rank, the cause, if there is one.
                    dead = _first_death(pending, rank_of)
                    if dead is not None:
                        self.shutdown()
                        raise WorkerDiedError(dead[0], self.role, method_name, _death_cause(dead[1])) from None
                    raise
        return results

    @property
    def role(self) -> str:
        """The worker class, and the colocated role of a spawned view (for messages)."""
        role = self._method_prefix[:-len(ROLE_SEPARATOR)] if self._method_prefix else ""
        return f"{self._worker_cls.__name__}, role {role}" if role else self._worker_cls.__name__

    def _call_all(self, method_name: str, per_rank_args: List[tuple],
                  per_rank_kwargs: List[Dict[str, Any]]) -> List[ray.ObjectRef]:
        # An argument that is the same object for every rank (ONE_TO_ALL, the non-batch arguments of
        # DP_COMPUTE) is put in the object store once instead of being serialized per rank; Ray resolves
        # top-level ObjectRef arguments back to values in the worker.
        if not self._state.alive:
            raise RuntimeError(f"{self!r} was shut down")
        if self.world_size > 1:
            shared: Dict[int, ray.ObjectRef] = {}

            def share(values: List[Any]) -> List[Any]:
                first = values[0]
                if _is_small_value(first) or any(v is not first for v in values):
                    return values
                if id(first) not in shared:
                    shared[id(first)] = ray.put(first)
                return [shared[id(first)]] * len(values)

            n_args = len(per_rank_args[0])
            columns = [share([a[i] for a in per_rank_args]) for i in range(n_args)]
            per_rank_args = [tuple(c[r] for c in columns) for r in range(self.world_size)]
            kw_columns = {k: share([kw[k] for kw in per_rank_kwargs]) for k in per_rank_kwargs[0]}
            per_rank_kwargs = [{k: c[r] for k, c in kw_columns.items()} for r in range(self.world_size)]
        return super()._call_all(method_name, per_rank_args, per_rank_kwargs)

    # ------------------------------------------------------------------ teardown

    def shutdown(self, remove_placement_groups: bool = True) -> None:
        """Kill the actors (shared with spawned role groups) and release the placement groups.

        Idempotent. Running calls are interrupted; their futures raise `RayActorError`.
        """
        if not self._state.alive:
            return
        self._state.alive = False
        for actor in self._state.actors:
            ray.kill(actor, no_restart=True)
        if remove_placement_groups:
            self._state.resource_pool.remove()
