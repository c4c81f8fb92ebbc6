"""Split a data file into train / val files with a seed.

    python -m mtrl.tools.split_data data/all.jsonl --val-ratio 0.1 --seed 42
        -> data/all_train.jsonl, data/all_val.jsonl   (beside the input: relative image paths stay valid)
    python -m mtrl.tools.split_data data/all.parquet --val-size 500 --train-out t.parquet --val-out v.parquet

Reads .jsonl / .json (a list of rows) / .parquet and writes the same format. The rows are shuffled with
`numpy.random.default_rng(seed)`, the first `val_size` (or round(val_ratio * n), at least 1) become the
validation split and both splits keep the input's row order (`--keep-order`, the default) or the
shuffled one (`--no-keep-order`). The same input and seed always give the same split. With
`--stratify-key KEY`, each value of the row's KEY is split separately with the same ratio.
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


def read_rows(path: str) -> List[Dict[str, Any]]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise SystemExit(f"{path}: expected a JSON list of rows")
        return data
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise SystemExit(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")


def write_rows(rows: Sequence[Dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if path.endswith(".jsonl"):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif path.endswith(".json"):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(list(rows), f, ensure_ascii=False, indent=1)
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
    else:
        raise SystemExit(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
    os.replace(tmp, path)


def split_indices(n: int, val_ratio: Optional[float] = None, val_size: Optional[int] = None, seed: int = 42,
                  keep_order: bool = True, groups: Optional[Sequence[Any]] = None) -> Tuple[List[int], List[int]]:
    """(train indices, val indices) of `n` rows; `groups` (one label per row) splits each group alike."""
    if (val_ratio is None) == (val_size is None):
        raise ValueError("give exactly one of val_ratio and val_size")
    if val_ratio is not None and not 0 < val_ratio < 1:
        raise ValueError(f"val_ratio must be in (0, 1), got {val_ratio}")
    if val_size is not None and not 0 < val_size < n:
        raise ValueError(f"val_size must be in [1, {n - 1}] for {n} rows, got {val_size}")
    rng = np.random.default_rng(seed)
    labels = list(groups) if groups is not None else [0] * n
    val: List[int] = []
    train: List[int] = []
    order = [int(i) for i in rng.permutation(n)]
    by_group: Dict[Any, List[int]] = {}
    for i in order:
        by_group.setdefault(json.dumps(labels[i], sort_keys=True, default=str), []).append(i)
    ratio = val_ratio if val_ratio is not None else val_size / n
    members_total = 0
    for members in by_group.values():
        members_total += len(members)
        if val_size is not None and groups is None:
            k = val_size
        else:
            k = int(round(ratio * len(members)))
            k = min(max(k, 1 if len(members) > 1 else 0), len(members) - 1) if len(members) > 1 else 0
        val.extend(members[:k])
        train.extend(members[k:])
    if keep_order:
        train.sort()
        val.sort()
    return train, val


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtrl.tools.split_data", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help=".jsonl / .json / .parquet file")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--val-ratio", type=float, help="fraction of rows for validation (default 0.1)")
    size.add_argument("--val-size", type=int, help="number of validation rows")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-out", help="default: INPUT_train.EXT beside the input")
    p.add_argument("--val-out", help="default: INPUT_val.EXT beside the input")
    p.add_argument("--stratify-key", help="split each value of this row key with the same ratio")
    p.add_argument("--keep-order", dest="keep_order", action="store_true", default=True)
    p.add_argument("--no-keep-order", dest="keep_order", action="store_false")
    args = p.parse_args(argv)
    rows = read_rows(args.input)
    if len(rows) < 2:
        raise SystemExit(f"{args.input}: {len(rows)} rows; need at least 2 to split")
    ratio = args.val_ratio if args.val_ratio is not None or args.val_size is not None else 0.1
    groups = [r.get(args.stratify_key) if isinstance(r, dict) else None for r in rows] if args.stratify_key else None
    try:
        train, val = split_indices(len(rows), ratio if args.val_size is None else None, args.val_size, args.seed,
                                   args.keep_order, groups)
    except ValueError as e:
        raise SystemExit(f"split_data: {e}") from None
    stem, ext = os.path.splitext(args.input)
    train_out = args.train_out or f"{stem}_train{ext}"
    val_out = args.val_out or f"{stem}_val{ext}"
    write_rows([rows[i] for i in train], train_out)
    write_rows([rows[i] for i in val], val_out)
    print(f"{args.input}: {len(train)} train rows -> {train_out}, {len(val)} val rows -> {val_out} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
