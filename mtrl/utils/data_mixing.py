"""Several training files mixed into one dataset: `dataset.mix_strategy` and `dataset.file_weights`.

The comma-separated entries of the mode's training files (train_files for RL, sft_files for SFT,
preference_files for DPO / reward models) become one dataset per entry, combined as:

* ``concat`` (default): every row of every entry once. With weights, entry i contributes
  ``round(w_i * n_i)`` rows: a weight of 0.5 keeps a (seeded) half of the entry, 2.0 repeats it twice.
* ``weighted_sampling``: the mixture has as many rows as all entries together (N = sum n_i); entry i
  contributes ``w_i / sum(w) * N`` of them (largest-remainder rounding), drawn without replacement
  from a seeded shuffle of the entry and cycling through it again when it is too small. No weights =
  proportional to size (the same as concat).
* ``balanced``: every entry contributes the same number of rows, the size of the largest entry
  (smaller entries are cycled through in a seeded shuffle); weights are not used.

Which rows are drawn depends only on `dataset.seed`, so a resumed run sees the same mixture; the
dataloader then shuffles the mixture each epoch as usual. `build_mixed_dataset` returns the plain
dataset when there is one entry and nothing to weigh, so a single file behaves exactly as before.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mtrl.utils.errors import UserError

STRATEGIES = ("concat", "weighted_sampling", "balanced")


def _entries(files: Any) -> List[str]:
    items = files.split(",") if isinstance(files, str) else list(files or [])
    return [e.strip() for e in items if e and e.strip()]


def mixture_counts(sizes: Sequence[int], strategy: str, weights: Optional[Sequence[float]] = None) -> List[int]:
    """Rows each entry contributes to the mixture (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise UserError(f"dataset.mix_strategy = {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if weights is not None and len(weights) != len(sizes):
        raise UserError(f"dataset.file_weights has {len(weights)} weights for {len(sizes)} data entries")
    if strategy == "balanced":
        return [max(sizes)] * len(sizes)
    if strategy == "concat":
        return list(sizes) if weights is None else [int(round(w * n)) for w, n in zip(weights, sizes)]
    total = sum(sizes)
    w = np.asarray(sizes if weights is None else weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _draw(n: int, count: int, rng: np.random.Generator) -> List[int]:
    """`count` row numbers of an entry of `n` rows: all in order when count == n, else a shuffled cycle."""
    if count == n:
        return list(range(n))
    rows: List[int] = []
    while len(rows) < count:
        rows.extend(rng.permutation(n).tolist())
    return rows[:count]


class MixtureDataset(torch.utils.data.Dataset):
    """Rows of several datasets (each with `__getitem__` returning an item dict and a `collate`)."""

    def __init__(self, datasets: Sequence[Any], strategy: str = "concat", weights: Optional[Sequence[float]] = None,
                 seed: int = 0, names: Optional[Sequence[str]] = None):
        self.datasets = list(datasets)
        self.names = list(names or [str(i) for i in range(len(self.datasets))])
        sizes = [len(d) for d in self.datasets]
        self.counts = mixture_counts(sizes, strategy, weights)
        self._index: List[Tuple[int, int]] = []
        for d, (n, count) in enumerate(zip(sizes, self.counts)):
            rng = np.random.default_rng([int(seed), 7919, d])
            self._index.extend((d, j) for j in _draw(n, count, rng))
        if not self._index:
            raise UserError(f"the data mixture {self.names} has no rows (dataset.file_weights all zero?)")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        d, j = self._index[index]
        item = self.datasets[d][j]
        item["index"], item["uid"] = index, str(index)
        return item

    def source(self, index: int) -> Any:
        d, j = self._index[index]
        return self.datasets[d].source(j) if hasattr(self.datasets[d], "source") else f"{self.names[d]}[{j}]"

    def collate(self, items):
        return self.datasets[0].collate(items)

    def media_per_row(self) -> Dict[str, int]:
        counts = [d.media_per_row() for d in self.datasets]
        return {k: max(c[k] for c in counts) for k in counts[0]}

    def summary(self) -> Dict[str, int]:
        return dict(zip(self.names, self.counts))


def build_mixed_dataset(files: Any, build: Callable[[str], Any], strategy: str = "concat",
                        weights: Optional[Sequence[float]] = None, seed: int = 0) -> Any:
    """`build(files)` when there is nothing to mix, else a `MixtureDataset` of `build(entry)` per entry."""
    entries = _entries(files)
    if weights is not None:
        weights = [float(w) for w in weights]
    if strategy == "concat" and weights is None or len(entries) <= 1 and strategy != "concat" and weights is None:
        return build(files)
    if weights is not None and len(weights) != len(entries):
        raise UserError(f"dataset.file_weights has {len(weights)} weights but the training files have "
                        f"{len(entries)} entries ({entries})")
    return MixtureDataset([build(e) for e in entries], strategy, weights, seed, names=entries)
