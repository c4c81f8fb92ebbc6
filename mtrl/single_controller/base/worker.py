"""`Worker`: the base class of every process-level worker (actor, critic, rollout, ...).

A worker knows its place in the group -- rank, world size, local rank, device -- from environment
variables that the worker group sets when it launches the process (see `RayWorkerGroup`):

    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE   position in the group / on the node
    MASTER_ADDR, MASTER_PORT                         torch.distributed rendezvous (rank 0's TCP store)
    MTRL_USE_GPU                                     "1" when the group reserved a GPU per worker

Without them (a worker built directly in a script or a unit test) it is rank 0 of a group of one.
Nothing here depends on Ray, so workers can be unit-tested in-process.
"""

import datetime
import os
import random
import socket
import sys
from typing import Optional, Tuple

import torch
import torch.distributed as dist

USE_GPU_ENV = "MTRL_USE_GPU"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _node_ip_address() -> str:
    """This node's address as other nodes reach it (used only when MASTER_ADDR is not given)."""
    ray = sys.modules.get("ray")  # soft dependency: inside a Ray actor Ray knows the node's IP
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


# Ports for the rendezvous are drawn above Ray's default worker-port range (10002-19999) and below
# the kernel's ephemeral range: a port that bind(0) reports free is an *ephemeral* port, which any
# outgoing connection (e.g. the gRPC clients of the other ranks' processes starting up) may take in
# the time between the choice and rank 0's `init_process_group`.
_PORT_RANGE_START = 20000
_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def _ephemeral_port_start() -> int:
    try:
        with open(_EPHEMERAL_RANGE_FILE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux default


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def find_free_port(host: str = "", attempts: int = 100) -> int:
    """A TCP port free on this machine now, outside the ephemeral range when possible.

    The check closes its socket before torch.distributed binds the port, so a listener started in
    between could still take it (torchrun accepts the same race); outside the ephemeral range no
    outgoing connection can.
    """
    start, stop = _PORT_RANGE_START, _ephemeral_port_start()
    if stop - start >= 1000:
        for port in random.Random().sample(range(start, stop), min(attempts, stop - start)):
            if _port_is_free(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # fallback: any port the kernel gives
        s.bind((host, 0))
        return s.getsockname()[1]


class Worker:
    """Base class for workers run by a `WorkerGroup`; subclasses add `@register`-ed methods.

    Subclasses must call `super().__init__()`. Several `Worker` objects may live in one process
    (colocated roles); they read the same environment and share the process's torch.distributed group.
    """

    def __init__(self) -> None:
        self._rank = _env_int("RANK", 0)
        self._world_size = _env_int("WORLD_SIZE", 1)
        self._local_rank = _env_int("LOCAL_RANK", 0)
        self._local_world_size = _env_int("LOCAL_WORLD_SIZE", self._world_size)
        if not 0 <= self._rank < self._world_size:
            raise ValueError(f"RANK={self._rank} is outside WORLD_SIZE={self._world_size}")
        use_gpu_env = os.environ.get(USE_GPU_ENV)
        # Default for a worker built outside a group: use the GPU when there is one.
        self._use_gpu = torch.cuda.is_available() if use_gpu_env in (None, "") else use_gpu_env == "1"
        self._device: Optional[torch.device] = None

    # ------------------------------------------------------------------ identity

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def local_world_size(self) -> int:
        return self._local_world_size

    @property
    def device(self) -> torch.device:
        """`cuda:<i>` when the group uses GPUs (and CUDA works here), else `cpu`.

        `<i>` is the local rank when the process sees all of the node's GPUs; when the launcher shows it
        only its own GPU (Ray sets CUDA_VISIBLE_DEVICES per actor) that GPU is `cuda:0`.
        """
        if self._device is None:
            if self._use_gpu and torch.cuda.is_available():
                count = torch.cuda.device_count()
                if count == 1:
                    index = 0
                elif self._local_rank < count:
                    index = self._local_rank
                else:
                    raise RuntimeError(f"LOCAL_RANK={self._local_rank} but only {count} GPUs are visible "
                                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
                self._device = torch.device("cuda", index)
            else:
                self._device = torch.device("cpu")
        return self._device

    # ------------------------------------------------------------------ torch.distributed

    def get_master_addr_port(self) -> Tuple[str, int]:
        """The rendezvous address and port, choosing (and exporting) them on rank 0 when unset.

        The group calls this on rank 0 right after creating it, then starts the other ranks with the
        answer. Rank 0 keeps MASTER_ADDR when the group set it (127.0.0.1 on one machine), else uses
        this node's IP; MASTER_PORT is a free port. Other ranks must have been given both. An empty
        value counts as unset (the group blanks variables a process might inherit from the driver).
        """
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not (addr and port):
            if self._rank != 0:
                raise RuntimeError(f"rank {self._rank}: MASTER_ADDR/MASTER_PORT are not set; the worker group "
                                   "must pass rank 0's rendezvous address to the other ranks")
            addr = addr or _node_ip_address()
            port = port or str(find_free_port())
            # Exported so that every Worker object of this process (colocated roles) and
            # init_process_group("env://") use the same choice.
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
        return addr, int(port)

    def init_distributed(self, timeout_s: float = 1800.0) -> None:
        """Join the group's torch.distributed process group (idempotent, once per process).

        GPU: NCCL for CUDA tensors plus gloo for CPU tensors (object collectives, CPU offload);
        CPU: gloo. Colocated roles in one process may all call this; only the first call initialises.
        """
        if dist.is_initialized():
            return
        self.get_master_addr_port()  # a lone rank 0 (no group) picks its own rendezvous here
        device = self.device
        kwargs = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            backend = "cpu:gloo,cuda:nccl"
            kwargs["device_id"] = device  # binds NCCL to this GPU and initialises the communicator eagerly
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=self._rank,
                                world_size=self._world_size, timeout=datetime.timedelta(seconds=timeout_s),
                                **kwargs)

    # ------------------------------------------------------------------ misc

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self._rank}/{self._world_size}, local_rank={self._local_rank})"
