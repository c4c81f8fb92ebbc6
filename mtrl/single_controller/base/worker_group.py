"""`WorkerGroup`: the controller-side handle on world_size workers of one class.

For every `@register`-ed method of the worker class the group gets a method of the same name that
(1) splits the call's arguments per rank (the dispatch mode's dispatch_fn), (2) calls the method on
every worker, (3) waits and combines the results (collect_fn) -- or, for `blocking=False`, returns a
`GroupFuture` at once. A backend (Ray, see `mtrl.single_controller.ray`) only says how to call one
worker (`_call_worker`) and how to wait for results (`_wait`). A backend whose worker process dies
during a call stops the rest of the group (its survivors would wait forever in a collective) and
raises `WorkerDiedError`.
"""

import functools
from typing import Any, Callable, Dict, List, Sequence

from mtrl.single_controller.base.decorator import DispatchMode, Registration, registered_methods


class WorkerDiedError(RuntimeError):
    """A worker process of a group died during a call (killed by the OOM killer, SIGKILL, a crash in C code).

    The group's other workers have been stopped; `rank`, `role` (the worker class, and the colocated role)
    and `method` (the call it was in: the phase of the step) say where.
    """

    def __init__(self, rank: int, role: str, method: str, cause: str) -> None:
        self.rank, self.role, self.method = rank, role, method
        super().__init__(f"worker rank {rank} ({role}) died during `{method}`: {cause}. The group's other "
                         f"workers were stopped")


class GroupFuture:
    """The pending result of a non-blocking group call; `get()` waits for every rank and collects."""

    def __init__(self, futures: List[Any], collect_fn: Callable[[List[Any]], Any],
                 wait_fn: Callable[[List[Any]], List[Any]]) -> None:
        self.futures = futures  # one backend future (a Ray ObjectRef) per rank, rank order
        self._collect_fn = collect_fn
        self._wait_fn = wait_fn

    def get(self) -> Any:
        return self._collect_fn(self._wait_fn(self.futures))

    def __repr__(self) -> str:
        return f"GroupFuture({len(self.futures)} ranks)"


class WorkerGroup:
    """Base class of worker groups; binds the worker class's registered methods onto the group.

    `method_prefix` is prepended to the method name on the worker side: colocated roles expose their
    methods as `<role>__<method>` on the shared process (see `colocated.py`), while the group view of a
    role keeps the plain names.
    """

    def __init__(self, workers: Sequence[Any], worker_cls: type, method_prefix: str = "") -> None:
        if not workers:
            raise ValueError("a WorkerGroup needs at least one worker")
        self._workers = list(workers)
        self._worker_cls = worker_cls
        self._method_prefix = method_prefix
        self._bind_worker_methods()

    # ------------------------------------------------------------------ backend hooks

    def _call_worker(self, rank: int, method_name: str, args: tuple, kwargs: Dict[str, Any]) -> Any:
        """Start `method_name(*args, **kwargs)` on worker `rank`; return a future (not the result)."""
        raise NotImplementedError

    def _wait(self, futures: List[Any], method_name: str) -> List[Any]:
        """The results of `futures` (one per rank, of the call `method_name`), in order."""
        raise NotImplementedError

    def _call_all(self, method_name: str, per_rank_args: List[tuple],
                  per_rank_kwargs: List[Dict[str, Any]]) -> List[Any]:
        """Start the call on every rank. Backends may override to share identical arguments."""
        return [self._call_worker(r, method_name, per_rank_args[r], per_rank_kwargs[r])
                for r in range(self.world_size)]

    # ------------------------------------------------------------------ public

    @property
    def world_size(self) -> int:
        return len(self._workers)

    @property
    def workers(self) -> List[Any]:
        """The worker handles in rank order (for a Ray group: the actor handles)."""
        return list(self._workers)

    @property
    def worker_cls(self) -> type:
        return self._worker_cls

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._worker_cls.__name__} x {self.world_size})"

    # ------------------------------------------------------------------ binding

    def _bind_worker_methods(self) -> None:
        for name, registration in registered_methods(self._worker_cls).items():
            # A worker method must not silently replace the group's own API (shutdown, spawn, ...).
            if hasattr(type(self), name) or name in vars(self):
                raise TypeError(f"{self._worker_cls.__name__}.{name} is registered but clashes with "
                                f"{type(self).__name__}.{name}; rename the worker method")
            setattr(self, name, self._make_group_method(name, registration))

    def _make_group_method(self, name: str, registration: Registration) -> Callable:
        mode: DispatchMode = registration.mode
        remote_name = self._method_prefix + name
        blocking = registration.blocking

        def group_method(*args: Any, **kwargs: Any) -> Any:
            per_rank_args, per_rank_kwargs = mode.dispatch_fn(self.world_size, args, kwargs)
            futures = self._call_all(remote_name, per_rank_args, per_rank_kwargs)
            if blocking:
                return mode.collect_fn(self._wait(futures, name))
            return GroupFuture(futures, mode.collect_fn, functools.partial(self._wait, method_name=name))

        # Keep the worker method's name and docstring for help() and tracebacks; copy neither its
        # __dict__ (the registration tag) nor __wrapped__ (its signature includes `self`).
        functools.update_wrapper(group_method, getattr(self._worker_cls, name),
                                 assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
        del group_method.__wrapped__
        return group_method
