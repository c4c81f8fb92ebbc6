"""Public Hugging Face datasets written as MTRL rows, for the recipes in this folder.

Each recipe's ``prepare_data.py`` names the datasets it needs (keys of `DATASETS`) and calls `prepare`;
its ``OUTPUTS`` (from `outputs`) are exactly the files its ``config.yaml`` reads. Run from the repository root:

    python examples/<recipe>/prepare_data.py [--limit N] [--force]

Rows are Parquet with the keys MTRL reads by default (mtrl/utils/dataset.py): ``prompt``, ``answer`` and,
for vision data, ``images`` as the Hub stores them (``{"bytes": ..., "path": ...}`` per image). Downloads
go through the `datasets` library (pip install datasets; HF_HOME / HF_TOKEN / HF_HUB_OFFLINE honoured).
An output that already exists is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

#: The repository root: outputs are relative to it, like the data paths of the example configs.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gsm8k_final_answer(answer: str) -> str:
    """GSM8K's reference solutions end with ``#### <number>``: the number, without thousands separators."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


@dataclass(frozen=True)
class HubDataset:
    """One split of a Hub dataset and how its columns map onto MTRL's row keys."""

    repo: str
    split: Optional[str]  # None: the dataset's only split
    output: str  # relative to REPO_ROOT
    config: Optional[str] = None
    prompt: str = "problem"
    answer: str = "answer"
    images: Optional[str] = "images"  # None: a text-only dataset
    answer_fn: Optional[Callable[[str], str]] = None  # the reference answer from the column's text


DATASETS: Dict[str, HubDataset] = {
    # The VPPO paper's data (arXiv 2510.09285): ViRL39K for training, MMK12 for validation.
    "virl39k": HubDataset("chamber111/VPPO_ViRL39K_train", None, "data/vppo/virl39k_train.parquet"),
    "mmk12_val": HubDataset("chamber111/VPPO_MMK12_validation", None, "data/vppo/mmk12_val.parquet"),
    # Geometry3K (2.1k train / 601 test geometry problems with a diagram each): small enough for one GPU.
    "geometry3k_train": HubDataset("hiyouga/geometry3k", "train", "data/geometry3k/train.parquet"),
    "geometry3k_test": HubDataset("hiyouga/geometry3k", "test", "data/geometry3k/test.parquet"),
    # GSM8K grade-school math (7.5k train / 1.3k test), text only.
    "gsm8k_train": HubDataset("openai/gsm8k", "train", "data/gsm8k/train.parquet", config="main",
                              prompt="question", images=None, answer_fn=gsm8k_final_answer),
    "gsm8k_test": HubDataset("openai/gsm8k", "test", "data/gsm8k/test.parquet", config="main",
                             prompt="question", images=None, answer_fn=gsm8k_final_answer),
}


def outputs(names: Sequence[str]) -> List[str]:
    """The files (relative to the repository root) that `prepare(names)` writes."""
    return [DATASETS[n].output for n in names]


def _load_split(spec: HubDataset):
    import datasets

    loaded = datasets.load_dataset(spec.repo, spec.config)
    split = spec.split
    if split is None:
        if len(loaded) != 1:
            raise SystemExit(f"{spec.repo} has splits {list(loaded)}; name one in examples/hub_rows.py")
        split = next(iter(loaded))
    return loaded[split]


def to_rows(spec: HubDataset, table):
    """The `datasets.Dataset` `table` with MTRL's columns only (images stay encoded as the Hub stores them)."""
    import datasets

    keep = {spec.prompt: "prompt", spec.answer: "answer"}
    if spec.images:
        keep[spec.images] = "images"
    missing = sorted(set(keep) - set(table.column_names))
    if missing:
        raise SystemExit(f"{spec.repo}: no column(s) {missing}; it has {table.column_names}")
    table = table.select_columns(list(keep)).rename_columns(keep)
    if spec.images:  # keep {"bytes", "path"}: MTRL decodes an image only when its row is loaded
        listed = hasattr(table.features["images"], "feature")  # a list of images per row, or one image
        table = table.cast_column("images", datasets.List(datasets.Image(decode=False)) if listed
                                  else datasets.Image(decode=False))
    answer_fn = spec.answer_fn or str
    return table.map(lambda row: {"answer": answer_fn(row["answer"])})


def prepare(names: Sequence[str], argv: Optional[Sequence[str]] = None) -> List[str]:
    """Download and write each dataset of `names` (see the module docstring); returns the files written."""
    parser = argparse.ArgumentParser(description=f"Write {', '.join(names)} as MTRL rows under {REPO_ROOT}.")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N rows of each (a smoke test)")
    parser.add_argument("--force", action="store_true", help="rewrite outputs that already exist")
    args = parser.parse_args(argv)
    written = []
    for name in names:
        spec = DATASETS[name]
        path = os.path.join(REPO_ROOT, spec.output)
        if os.path.exists(path) and not args.force:
            print(f"{spec.output}: exists, kept (--force rewrites it)")
            continue
        table = to_rows(spec, _load_split(spec))
        if args.limit is not None:
            table = table.select(range(min(args.limit, len(table))))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        table.to_parquet(path)
        print(f"{spec.output}: {len(table)} rows from {spec.repo}{f' ({spec.config})' if spec.config else ''}")
        written.append(path)
    return written


