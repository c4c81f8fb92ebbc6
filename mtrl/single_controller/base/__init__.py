"""Backend-agnostic single-controller pieces: `Worker`, `@register`/`Dispatch`, `WorkerGroup`."""

from mtrl.single_controller.base.colocated import ColocatedWorker, make_colocated_class
from mtrl.single_controller.base.decorator import (
    DISPATCH_MODES,
    Dispatch,
    DispatchMode,
    Registration,
    get_registration,
    register,
    registered_methods,
)
from mtrl.single_controller.base.worker import Worker, find_free_port
from mtrl.single_controller.base.worker_group import GroupFuture, WorkerDiedError, WorkerGroup

__all__ = [
    "DISPATCH_MODES",
    "ColocatedWorker",
    "Dispatch",
    "DispatchMode",
    "GroupFuture",
    "Registration",
    "Worker",
    "WorkerDiedError",
    "WorkerGroup",
    "find_free_port",
    "get_registration",
    "make_colocated_class",
    "register",
    "registered_methods",
]
