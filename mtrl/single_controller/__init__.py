"""The single-controller pattern: one driver process calls methods on groups of worker processes.

- `base/`: `Worker` (rank, device, torch.distributed setup), `@register(dispatch_mode=Dispatch.X)`
  (how a group call is split over the ranks and collected) and `WorkerGroup` (binds the registered
  methods onto the group). No Ray needed: workers can be unit-tested in-process.
- `ray/`: `RayResourcePool`, `RayClassWithInitArgs`, `RayWorkerGroup` (one Ray actor per device,
  colocated roles via `create_colocated_worker_cls` + `spawn`), `init_ray`.

Only `base` is imported here so that importing a worker class does not import Ray.
"""

from mtrl.single_controller.base import (Dispatch, DispatchMode, GroupFuture, Worker, WorkerDiedError, WorkerGroup,
                                         register)

__all__ = ["Dispatch", "DispatchMode", "GroupFuture", "Worker", "WorkerDiedError", "WorkerGroup", "register"]
