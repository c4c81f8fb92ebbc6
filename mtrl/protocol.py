"""`DataBatch`: the batch container passed between the controller and the workers.

A batch has three parts, all indexed by sample along dimension 0:
- `tensors`: torch tensors (input ids, masks, log-probs, advantages, ...);
- `non_tensors`: numpy object arrays for per-sample Python values (images, ground truth, uids);
- `meta`: a dict of batch-level values (temperature, step, metrics) that is not split.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch


def _as_object_array(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype == object:
        return values
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):  # element-wise so lists of lists stay lists
        out[i] = v
    return out


@dataclass
class DataBatch:
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    non_tensors: Dict[str, np.ndarray] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.non_tensors = {k: _as_object_array(v) for k, v in self.non_tensors.items()}
        self._check_lengths()

    def _check_lengths(self) -> None:
        lengths = {k: len(v) for k, v in list(self.tensors.items()) + list(self.non_tensors.items())}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"DataBatch fields disagree on the batch size: {lengths}")

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        for v in self.tensors.values():
            return v.shape[0]
        for v in self.non_tensors.values():
            return len(v)
        return 0

    def __getitem__(self, key: str) -> Union[torch.Tensor, np.ndarray]:
        if key in self.tensors:
            return self.tensors[key]
        if key in self.non_tensors:
            return self.non_tensors[key]
        raise KeyError(f"DataBatch has no field {key!r}; fields: {sorted(self.keys())}")

    def __contains__(self, key: str) -> bool:
        return key in self.tensors or key in self.non_tensors

    def keys(self) -> List[str]:
        return list(self.tensors) + list(self.non_tensors)

    def __repr__(self) -> str:
        t = {k: tuple(v.shape) for k, v in self.tensors.items()}
        return f"DataBatch(len={len(self)}, tensors={t}, non_tensors={list(self.non_tensors)}, meta={list(self.meta)})"

    # ------------------------------------------------------------------ field operations

    def select(self, keys: Optional[Iterable[str]] = None, meta_keys: Optional[Iterable[str]] = None) -> "DataBatch":
        """A new batch holding only `keys` (all fields when None); tensors are shared, not copied."""
        keys = self.keys() if keys is None else list(keys)
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"DataBatch.select: no field(s) {missing}; fields: {sorted(self.keys())}")
        meta = dict(self.meta) if meta_keys is None else {k: self.meta[k] for k in meta_keys}
        return DataBatch({k: v for k, v in self.tensors.items() if k in keys},
                         {k: v for k, v in self.non_tensors.items() if k in keys}, meta)

    def pop(self, keys: Iterable[str]) -> "DataBatch":
        """Remove `keys` from this batch and return them as a new batch (meta is copied)."""
        keys = list(keys)
        out = self.select(keys)
        for k in keys:
            self.tensors.pop(k, None)
            self.non_tensors.pop(k, None)
        return out

    def union(self, other: "DataBatch") -> "DataBatch":
        """Add `other`'s fields to this batch in place; a shared field must hold equal values."""
        if len(self) and len(other) and len(self) != len(other):
            raise ValueError(f"DataBatch.union: batch sizes differ ({len(self)} vs {len(other)})")
        for k, v in other.tensors.items():
            if k in self.tensors and not torch.equal(self.tensors[k], v):
                raise ValueError(f"DataBatch.union: field {k!r} exists in both batches with different values")
            self.tensors[k] = v
        for k, v in other.non_tensors.items():
            if k in self.non_tensors and not np.array_equal(self.non_tensors[k], v):
                raise ValueError(f"DataBatch.union: field {k!r} exists in both batches with different values")
            self.non_tensors[k] = v
        self.meta.update(other.meta)
        return self

    # ------------------------------------------------------------------ sample operations

    def index(self, idx: Union[Sequence[int], np.ndarray, torch.Tensor, slice]) -> "DataBatch":
        """Rows `idx` (a slice, integer positions or a boolean mask) as a new batch."""
        if isinstance(idx, slice):
            np_idx = np.arange(len(self))[idx]
        else:
            np_idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx)
            if np_idx.dtype == bool:
                np_idx = np.nonzero(np_idx)[0]
        t_idx = torch.as_tensor(np_idx, dtype=torch.long)
        return DataBatch({k: v[t_idx.to(v.device)] for k, v in self.tensors.items()},
                         {k: v[np_idx] for k, v in self.non_tensors.items()}, dict(self.meta))

    def reorder(self, indices: Union[Sequence[int], torch.Tensor]) -> None:
        """Permute the rows in place: row i becomes old row indices[i]."""
        reordered = self.index(indices)
        self.tensors, self.non_tensors = reordered.tensors, reordered.non_tensors

    def repeat(self, times: int, interleave: bool = True) -> "DataBatch":
        """Each row `times` times: interleaved (a a b b) for n samples per prompt, or tiled (a b a b)."""
        order = np.repeat(np.arange(len(self)), times) if interleave else np.tile(np.arange(len(self)), times)
        return self.index(order)

    def split(self, size: int) -> List["DataBatch"]:
        """Consecutive pieces of `size` rows; the last may be shorter."""
        return [self.index(slice(i, i + size)) for i in range(0, len(self), size)]

    def chunk(self, chunks: int) -> List["DataBatch"]:
        """`chunks` consecutive pieces whose sizes differ by at most one (the first ones larger)."""
        bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(len(self)), chunks)])
        return [self.index(slice(bounds[i], bounds[i + 1])) for i in range(chunks)]

    @staticmethod
    def concat(batches: Sequence["DataBatch"]) -> "DataBatch":
        """Rows of all batches in order; fields must match; meta of the first batch wins on conflicts."""
        batches = [b for b in batches if len(b) > 0] or list(batches[:1])
        first = batches[0]
        for b in batches[1:]:
            if set(b.keys()) != set(first.keys()):
                raise ValueError(f"DataBatch.concat: fields differ: {sorted(first.keys())} vs {sorted(b.keys())}")
        tensors = {k: torch.cat([b.tensors[k] for b in batches]) for k in first.tensors}
        non_tensors = {k: np.concatenate([b.non_tensors[k] for b in batches]) for k in first.non_tensors}
        meta: Dict[str, Any] = {}
        for b in reversed(batches):
            meta.update(b.meta)
        return DataBatch(tensors, non_tensors, meta)

    def to(self, device: Union[str, torch.device]) -> "DataBatch":
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    # ------------------------------------------------------------------ serialization

    def __getstate__(self) -> Dict[str, Any]:
        # Ray stores numpy arrays out-of-band (zero-copy reads); a pickled torch tensor is copied.
        # bfloat16 has no numpy dtype, so it travels as int16 bits.
        packed = {}
        for k, v in self.tensors.items():
            v = v.detach().cpu().contiguous()
            if v.dtype == torch.bfloat16:
                packed[k] = ("bf16", v.view(torch.int16).numpy())
            else:
                packed[k] = ("np", v.numpy())
        return {"tensors": packed, "non_tensors": self.non_tensors, "meta": self.meta}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        tensors = {}
        for k, (kind, arr) in state["tensors"].items():
            t = torch.from_numpy(np.array(arr, copy=not arr.flags.writeable))
            tensors[k] = t.view(torch.bfloat16) if kind == "bf16" else t
        self.tensors, self.non_tensors, self.meta = tensors, state["non_tensors"], state["meta"]
