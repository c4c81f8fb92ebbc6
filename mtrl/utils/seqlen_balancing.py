"""Sequence-length balancing: dynamic micro-batches and data-parallel load balancing.

Everything here is a pure function over a list of sequence lengths (real-token counts, e.g.
``attention_mask.sum(-1).tolist()``) and returns lists of sample indices, so callers can apply the
result to any batch container and undo it with :func:`restore_order`.

* :func:`micro_batches_by_token_budget` -- dynamic batching: split a batch into micro-batches whose
  real-token totals stay within ``max_token_len`` (padding-free forwards cost ~ the real tokens, so
  this keeps activation memory flat while using as few forward passes as possible).
* :func:`balance_across_ranks` -- give every data-parallel rank a near-equal token total (optionally
  the same number of samples per rank).
* :func:`karmarkar_karp` -- the k-way largest-differencing partitioner both of them use.

Pitfall for callers: under FSDP every rank must run the *same number* of forward passes (each one
all-gathers parameters). Compute the count on every rank, all-reduce the maximum, and pass it back as
``min_num_micro_batches``.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Dict, List, Sequence, Union

import torch

__all__ = [
    "karmarkar_karp",
    "greedy_partition",
    "micro_batches_by_token_budget",
    "num_micro_batches_by_token_budget",
    "balance_across_ranks",
    "flatten_partitions",
    "restore_order",
    "partition_stats",
]


# ----------------------------------------------------------------------------------------------
# Partitioning algorithms
# ----------------------------------------------------------------------------------------------
class _State:
    """A partial solution of the differencing method: ``k`` groups of (index, length) items.

    Groups are kept sorted by total, ascending. The heap pops the state whose spread (largest total
    minus smallest total) is biggest, because that is the one most in need of being evened out.
    """

    __slots__ = ("groups", "sums")

    def __init__(self, groups: List[List[int]], sums: List[int]):
        order = sorted(range(len(groups)), key=lambda g: (sums[g], len(groups[g])))
        self.groups = [groups[g] for g in order]
        self.sums = [sums[g] for g in order]

    @property
    def spread(self) -> int:
        return self.sums[-1] - self.sums[0]

    def merge(self, other: "_State") -> "_State":
        # Pair our smallest group with the other's largest (and so on): totals cancel out.
        k = len(self.groups)
        groups = [self.groups[i] + other.groups[k - 1 - i] for i in range(k)]
        sums = [self.sums[i] + other.sums[k - 1 - i] for i in range(k)]
        return _State(groups, sums)

    def __lt__(self, other: "_State") -> bool:  # heapq is a min-heap: invert for "largest spread first"
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.sums[-1] > other.sums[-1]


def karmarkar_karp(seq_lens: Sequence[int], k: int, equal_size: bool = False) -> List[List[int]]:
    """Split indices ``0..n-1`` into ``k`` groups with near-equal sums of ``seq_lens`` (KK / LDM).

    Args:
        seq_lens: length (cost) of each sample.
        k: number of groups (1 <= k; with k > n some groups are empty, unless ``equal_size``).
        equal_size: every group gets exactly ``n / k`` samples (requires ``n % k == 0``).

    Returns:
        ``k`` lists of indices, each sorted ascending, groups ordered by their smallest index
        (empty groups last). Deterministic for a given input.
    """
    n = len(seq_lens)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if equal_size and n % k != 0:
        raise ValueError(f"equal_size needs the number of samples ({n}) to be a multiple of k ({k})")

    order = sorted(range(n), key=lambda i: (seq_lens[i], i))  # ascending, ties by index
    heap: List[_State] = []
    if equal_size:
        # Seed states with k samples each, one per group, so every merge keeps group sizes equal.
        for start in range(0, n, k):
            chunk = order[start : start + k]
            heap.append(_State([[i] for i in chunk], [seq_lens[i] for i in chunk]))
    else:
        for i in order:
            heap.append(_State([[i]] + [[] for _ in range(k - 1)], [seq_lens[i]] + [0] * (k - 1)))
    heapq.heapify(heap)

    while len(heap) > 1:
        first, second = heapq.heappop(heap), heapq.heappop(heap)
        heapq.heappush(heap, first.merge(second))

    groups = [sorted(g) for g in heap[0].groups] if heap else [[] for _ in range(k)]
    return _canonical(groups)


def greedy_partition(seq_lens: Sequence[int], k: int, equal_size: bool = False) -> List[List[int]]:
    """Largest-first greedy: each sample goes to the lightest group (that still has room).

    Simpler and a bit worse than :func:`karmarkar_karp`; kept as a reference / fallback.
    """
    n = len(seq_lens)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if equal_size and n % k != 0:
        raise ValueError(f"equal_size needs the number of samples ({n}) to be a multiple of k ({k})")
    capacity = n // k if equal_size else n
    groups: List[List[int]] = [[] for _ in range(k)]
    sums = [0] * k
    for i in sorted(range(n), key=lambda j: (-seq_lens[j], j)):
        g = min((g for g in range(k) if len(groups[g]) < capacity), key=lambda g: (sums[g], len(groups[g]), g))
        groups[g].append(i)
        sums[g] += seq_lens[i]
    return _canonical([sorted(g) for g in groups])


def _canonical(groups: List[List[int]]) -> List[List[int]]:
    """Order groups by their first index (empty ones last) so results are stable and readable."""
    return sorted(groups, key=lambda g: (len(g) == 0, g[0] if g else 0))


# ----------------------------------------------------------------------------------------------
# Dynamic batching
# ----------------------------------------------------------------------------------------------
def micro_batches_by_token_budget(
    seq_lens: Sequence[int],
    max_token_len: int,
    min_num_micro_batches: int = 1,
) -> List[List[int]]:
    """Split a batch into micro-batches of at most ``max_token_len`` real tokens each.

    Every index appears in exactly one micro-batch. A sample longer than the budget cannot be split,
    so it gets a micro-batch of its own. The others are partitioned by :func:`karmarkar_karp` into
    the fewest groups that fit, searched from the lower bound ``ceil(total / max_token_len)`` (or
    ``min_num_micro_batches`` if larger, e.g. the maximum over data-parallel ranks), so the
    micro-batches come out both few and evenly filled.

    Returns:
        Lists of indices (each ascending), ordered by their first index. Concatenating them gives
        the order in which per-micro-batch outputs arrive; :func:`restore_order` undoes it.
    """
    if max_token_len <= 0:
        raise ValueError(f"max_token_len must be positive, got {max_token_len}")
    n = len(seq_lens)
    if n == 0:
        return []
    if min_num_micro_batches > n:
        raise ValueError(f"cannot make {min_num_micro_batches} non-empty micro-batches from {n} samples")

    # Over-long samples are alone anyway; partition the rest.
    long_ids = [i for i in range(n) if seq_lens[i] > max_token_len]
    rest = [i for i in range(n) if seq_lens[i] <= max_token_len]
    groups: List[List[int]] = [[i] for i in long_ids]
    if rest:
        rest_lens = [seq_lens[i] for i in rest]
        lower = max(math.ceil(sum(rest_lens) / max_token_len), min_num_micro_batches - len(long_ids), 1)
        parts = _fewest_fitting_partitions(rest_lens, max_token_len, lower)
        groups.extend([rest[j] for j in p] for p in parts)
    return _canonical([sorted(g) for g in groups])


def _fewest_fitting_partitions(lens: Sequence[int], budget: int, lower: int) -> List[List[int]]:
    """Balanced partition of ``lens`` (all <= budget) into the fewest groups that each fit ``budget``.

    Tries ``k = lower`` first (usually enough), then gallops (k + 1, k + 2, k + 4, ...) to a k that
    fits and binary-searches back down, so only O(log n) partitions are computed. ``k = len(lens)``
    always fits (one sample per group), which bounds the search.
    """
    n = len(lens)

    def attempt(k: int):
        parts = [p for p in karmarkar_karp(lens, k) if p]
        return parts if all(sum(lens[j] for j in p) <= budget for p in parts) else None

    k = min(lower, n)
    best = attempt(k)
    if best is not None:
        return best
    failed, step = k, 1
    while best is None:
        k = min(failed + step, n)
        best = attempt(k)
        if best is None:
            failed, step = k, step * 2
    fits = k
    while fits - failed > 1:  # KK's feasibility is (nearly) monotone in k: bisect for the fewest groups
        mid = (failed + fits) // 2
        parts = attempt(mid)
        if parts is None:
            failed = mid
        else:
            fits, best = mid, parts
    return best


def num_micro_batches_by_token_budget(seq_lens: Sequence[int], max_token_len: int) -> int:
    """How many micro-batches :func:`micro_batches_by_token_budget` would make (for an all-reduce max)."""
    return len(micro_batches_by_token_budget(seq_lens, max_token_len))


# ----------------------------------------------------------------------------------------------
# Data-parallel balancing
# ----------------------------------------------------------------------------------------------
def balance_across_ranks(seq_lens: Sequence[int], world_size: int, equal_size: bool = True) -> List[List[int]]:
    """Assign samples to ``world_size`` ranks with near-equal token totals.

    ``equal_size=True`` also gives every rank the same number of samples (needs
    ``len(seq_lens) % world_size == 0``; collective ops per sample then line up across ranks).
    Returns one ascending index list per rank (rank r gets ``result[r]``), ordered by first index.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return karmarkar_karp(seq_lens, world_size, equal_size=equal_size)


# ----------------------------------------------------------------------------------------------
# Order bookkeeping
# ----------------------------------------------------------------------------------------------
def flatten_partitions(partitions: Sequence[Sequence[int]]) -> List[int]:
    """Concatenate index lists: position j of the result = original index of the j-th output row."""
    return [i for part in partitions for i in part]


Items = Union[torch.Tensor, Sequence[Any]]


def restore_order(values: Items, partitions: Sequence[Sequence[int]]) -> Items:
    """Put outputs computed partition by partition back into the original sample order.

    ``values``: the per-sample outputs in partition order, i.e. ``values[j]`` belongs to sample
    ``flatten_partitions(partitions)[j]`` -- a tensor (rows along dim 0; ``torch.cat`` the
    per-micro-batch outputs first) or any sequence. ``partitions`` may also be given already
    flattened, as a list of ints.

    Returns the same type (tensor or list) with ``result[i]`` = output of sample ``i``.
    """
    order = list(partitions) if partitions and isinstance(partitions[0], int) else flatten_partitions(partitions)
    n = len(order)
    if sorted(order) != list(range(n)):
        raise ValueError("partitions must contain every index 0..n-1 exactly once")
    if len(values) != n:
        raise ValueError(f"got {len(values)} values for {n} indices")
    inverse = [0] * n
    for position, index in enumerate(order):
        inverse[index] = position
    if isinstance(values, torch.Tensor):
        return values[torch.tensor(inverse, dtype=torch.long, device=values.device)]
    return [values[p] for p in inverse]


def partition_stats(seq_lens: Sequence[int], partitions: Sequence[Sequence[int]]) -> Dict[str, float]:
    """Token totals per partition: min / max / mean and max-min spread (for logging balance quality)."""
    sums = [sum(seq_lens[i] for i in p) for p in partitions]
    if not sums:
        return {"min": 0.0, "max": 0.0, "mean": 0.0, "spread": 0.0}
    return {"min": float(min(sums)), "max": float(max(sums)), "mean": sum(sums) / len(sums),
            "spread": float(max(sums) - min(sums))}


# ----------------------------------------------------------------------------------------------
# Update layout: the same mini-batches whatever the number of ranks
# ----------------------------------------------------------------------------------------------
def update_layout(seq_lens: Sequence[int], rows_per_mini_batch: int, world_size: int, group_size: int = 1,
                  balance: bool = True) -> List[int]:
    """Row order that makes a data-parallel update see the same mini-batches for any ``world_size``.

    Mini-batch k of the update is rows ``k * rows_per_mini_batch ...`` of the batch in its own order. The
    controller hands rank r a contiguous share and the rank splits it into consecutive mini-batches of
    ``rows_per_mini_batch / world_size`` rows, so the share must hold, in order, rank r's part of
    mini-batch 0, of mini-batch 1, ... That is this order (rank-major). Each mini-batch is split into
    equal parts, token-balanced across ranks with ``balance``; ``group_size`` rows that belong together
    (a chosen/rejected pair) stay together. Raises ValueError when the batch is not whole mini-batches
    that split evenly (then no order gives every rank the same mini-batches and the same number of steps).
    """
    n = len(seq_lens)
    unit = group_size * world_size
    if rows_per_mini_batch % unit or n % rows_per_mini_batch:
        raise ValueError(f"a batch of {n} rows in mini-batches of {rows_per_mini_batch} rows does not split into "
                         f"whole mini-batches of {group_size}-row groups shared evenly by {world_size} workers")
    per_rank: List[List[int]] = [[] for _ in range(world_size)]
    for start in range(0, n, rows_per_mini_batch):
        groups = list(range(start, min(start + rows_per_mini_batch, n), group_size))
        costs = [sum(seq_lens[g:g + group_size]) for g in groups]
        if balance:
            parts = [[groups[j] for j in part] for part in balance_across_ranks(costs, world_size)]
        else:
            size = len(groups) // world_size
            parts = [groups[r * size:(r + 1) * size] for r in range(world_size)]
        for rank, part in enumerate(parts):
            per_rank[rank].extend(i for g in part for i in range(g, g + group_size))
    return flatten_partitions(per_rank)
