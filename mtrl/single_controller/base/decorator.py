"""`@register`: declare how a worker method is called on a whole group.

The controller calls `group.method(*args, **kwargs)` once; the dispatch mode decides what each rank
receives and how the per-rank results are combined:

    ONE_TO_ALL   every rank gets the same arguments; returns the list of results (rank order)
    ALL_TO_ALL   every argument is a list with one value per rank; returns the list of results
    DP_COMPUTE   each `DataBatch` argument is split into world_size consecutive chunks (sizes differ by
                 at most one, first chunks larger); other arguments go unchanged to every rank. Returns
                 the rank results concatenated back into one `DataBatch` in order, or the list of
                 results when ranks return something else (e.g. a dict of metrics)
    RANK_ZERO    every rank is called (its body may run collectives) but only rank 0's result returns

A mode is just a `DispatchMode(dispatch_fn, collect_fn)` pair in `DISPATCH_MODES`; to add one, add an
enum member and a table entry, or pass a `DispatchMode` directly to `@register`.
"""

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from mtrl.protocol import DataBatch

# Per-rank call arguments: one positional tuple and one keyword dict for each rank.
PerRankArgs = Tuple[List[tuple], List[Dict[str, Any]]]

# The attribute `@register` sets on the decorated function.
REGISTRATION_ATTR = "__mtrl_registration__"


class Dispatch(Enum):
    ONE_TO_ALL = "one_to_all"
    ALL_TO_ALL = "all_to_all"
    DP_COMPUTE = "dp_compute"
    RANK_ZERO = "rank_zero"


@dataclass(frozen=True)
class DispatchMode:
    """How a group call is spread over the ranks and how the results come back.

    dispatch_fn(world_size, args, kwargs) -> (per-rank args tuples, per-rank kwargs dicts)
    collect_fn(list of per-rank results in rank order) -> the value the controller gets
    """

    dispatch_fn: Callable[[int, tuple, Dict[str, Any]], PerRankArgs]
    collect_fn: Callable[[List[Any]], Any]


# ---------------------------------------------------------------------- dispatch functions


def dispatch_one_to_all(world_size: int, args: tuple, kwargs: Dict[str, Any]) -> PerRankArgs:
    # The very same objects for every rank: a backend can notice that and serialize them once.
    return [args] * world_size, [kwargs] * world_size


def dispatch_all_to_all(world_size: int, args: tuple, kwargs: Dict[str, Any]) -> PerRankArgs:
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument {k!r}", v) for k, v in kwargs.items()]
    for name, value in named:
        if not isinstance(value, (list, tuple)) or len(value) != world_size:
            got = f"{type(value).__name__} of length {len(value)}" if isinstance(value, (list, tuple)) \
                else type(value).__name__
            raise ValueError(f"ALL_TO_ALL: {name} must be a list with one value per rank "
                             f"({world_size}), got a {got}")
    return ([tuple(a[r] for a in args) for r in range(world_size)],
            [{k: v[r] for k, v in kwargs.items()} for r in range(world_size)])


def dispatch_dp_compute(world_size: int, args: tuple, kwargs: Dict[str, Any]) -> PerRankArgs:
    batches = [v for v in (*args, *kwargs.values()) if isinstance(v, DataBatch)]
    if not batches:
        raise TypeError("DP_COMPUTE: the call has no DataBatch argument to split over the ranks")
    sizes = {len(b) for b in batches}
    if len(sizes) > 1:
        raise ValueError(f"DP_COMPUTE: DataBatch arguments have different sizes {sorted(sizes)}; "
                         "their rows could not be split alike")

    def per_rank(value: Any) -> Sequence[Any]:
        # A batch smaller than world_size leaves some ranks an empty chunk: they still run the method,
        # which matters when it contains collectives (FSDP forward/backward).
        return value.chunk(world_size) if isinstance(value, DataBatch) else [value] * world_size

    split_args = [per_rank(a) for a in args]
    split_kwargs = {k: per_rank(v) for k, v in kwargs.items()}
    return ([tuple(a[r] for a in split_args) for r in range(world_size)],
            [{k: v[r] for k, v in split_kwargs.items()} for r in range(world_size)])


# ---------------------------------------------------------------------- collect functions


def collect_all(outputs: List[Any]) -> List[Any]:
    return list(outputs)


def collect_rank_zero(outputs: List[Any]) -> Any:
    return outputs[0]


def collect_dp_compute(outputs: List[Any]) -> Union[DataBatch, List[Any]]:
    if outputs and all(isinstance(o, DataBatch) for o in outputs):
        return DataBatch.concat(outputs)
    return list(outputs)


DISPATCH_MODES: Dict[Dispatch, DispatchMode] = {
    Dispatch.ONE_TO_ALL: DispatchMode(dispatch_one_to_all, collect_all),
    Dispatch.ALL_TO_ALL: DispatchMode(dispatch_all_to_all, collect_all),
    Dispatch.DP_COMPUTE: DispatchMode(dispatch_dp_compute, collect_dp_compute),
    Dispatch.RANK_ZERO: DispatchMode(dispatch_one_to_all, collect_rank_zero),
}


def get_dispatch_mode(mode: Union[Dispatch, DispatchMode]) -> DispatchMode:
    if isinstance(mode, DispatchMode):
        return mode
    if mode not in DISPATCH_MODES:
        raise ValueError(f"unknown dispatch mode {mode!r}; known: {[m.name for m in DISPATCH_MODES]}")
    return DISPATCH_MODES[mode]


# ---------------------------------------------------------------------- the decorator


@dataclass(frozen=True)
class Registration:
    """What `@register` recorded about a worker method."""

    dispatch_mode: Union[Dispatch, DispatchMode]
    blocking: bool

    @property
    def mode(self) -> DispatchMode:
        return get_dispatch_mode(self.dispatch_mode)


def register(dispatch_mode: Union[Dispatch, DispatchMode] = Dispatch.ONE_TO_ALL,
             blocking: bool = True) -> Callable[[Callable], Callable]:
    """Mark a `Worker` method as callable on the whole group.

    blocking=False makes the group method return a `GroupFuture` at once; `.get()` waits and collects.
    The function itself is returned unchanged (only tagged), so it still works on a single worker.
    """
    get_dispatch_mode(dispatch_mode)  # fail at class definition on an unknown mode

    def decorate(fn: Callable) -> Callable:
        setattr(fn, REGISTRATION_ATTR, Registration(dispatch_mode, blocking))
        return fn

    return decorate


def get_registration(obj: Any) -> Optional[Registration]:
    return getattr(obj, REGISTRATION_ATTR, None)


def registered_methods(cls: type) -> Dict[str, Registration]:
    """The `@register`-ed methods of `cls` (inherited ones included), by name.

    The attribute as `cls` resolves it counts: a subclass that overrides a registered method without
    `@register` makes it a plain, non-group method.
    """
    found = {}
    for name in dir(cls):
        registration = get_registration(getattr(cls, name, None))
        if registration is not None:
            found[name] = registration
    return found
