"""The prompt dataset, its collate function and a resumable, deterministic dataloader.

Driven by `DatasetConfig` (SPEC sections 3 and 7); batches follow docs/DATA_LAYOUT.md.

Data files (`dataset.train_files` / `val_files`: a comma-separated list of entries)
----------------------------------------------------------------------------------
* ``rows.jsonl``: one JSON object per line (blank lines skipped); errors name the line.
* ``rows.json``: a JSON list of objects; errors name the row (1-based).
* ``rows.parquet``: one row per record (Hugging Face datasets layout works: images stored as
  ``{"bytes": ..., "path": ...}``); errors name the row (1-based).
* ``folder``: every .jsonl / .json / .parquet file directly in the folder, in name order.
* a folder written by the `datasets` library's ``save_to_disk`` (a ``Dataset``: ``state.json`` and Arrow
  files; a ``DatasetDict``: ``dataset_dict.json`` and a folder per split, chosen with ``folder@split``);
  read with pyarrow, so it does not need `datasets`.
* ``org/name@split``, ``org/name:config@split`` (or no split when the dataset has one): a Hugging Face
  Hub dataset, loaded with the `datasets` library (HF_HOME / HF_HUB_OFFLINE honoured) on the driver,
  once; no local path of that name may exist (`mtrl.utils.hub.parse_dataset_id`). Without `datasets`,
  download its Parquet files (``hf download org/name --repo-type dataset --local-dir DIR``) and give
  ``DIR@split``.
* ``path@split`` selects one split:

  - ``folder@train``: the files of the folder ``folder/train/``, or else the data files in ``folder/``
    or ``folder/data/`` whose name is ``train.<ext>`` or starts with ``train-`` / ``train_`` / ``train.``
    (so ``train.jsonl``, ``train-00000-of-00002.parquet``);
  - ``rows.json@train``: a JSON file whose top level maps split names to row lists (``{"train": [...]}``);
  - ``rows.jsonl@train`` / ``rows.parquet@train`` / a JSON list: the rows whose ``split`` field is ``train``.

  An existing path containing ``@`` is taken literally.

Rows (keys renamable with prompt_key / answer_key / image_key / video_key)
---------------------------------------------------------------------------
``{"prompt": "<image>What colour is the circle?", "answer": "red", "images": ["a.png"], "videos": []}``

* `prompt` (required) is rendered with the chat template of the processor (vision models) or the
  tokenizer, after an optional system message (`system_prompt`) and the optional `format_prompt`
  (a Jinja template, inline or a file path, that must use ``{{ content }}`` for the prompt).
* ``<image>`` / ``<video>`` placeholders mark where each image / video goes (their count must match);
  without placeholders the images, then the videos, come before the text.
* `answer` becomes `ground_truth` (numbers as strings). It is required in every row, unless no row
  of the dataset has it (unlabelled data: ground_truth "").
* images / videos: a list (or a single value); see `mtrl.utils.vision` for the accepted forms. Parquet
  and Arrow data as the Hub stores it (geometry3k, MMK12, ViRL39K) gives images as
  ``{"bytes": ..., "path": ...}`` dicts, or lists of them; both work.
  Relative paths resolve against `image_dir` first, then the data file's folder.
* Images are given to the processor as loaded (RGB) and the processor resizes them into
  [min_pixels, max_pixels] itself (one preprocessing path with HF / vLLM inference); video frames are
  sampled at `video_fps` and resized by the video processor with the same bounds.

Checks (at construction, before any training): every row is read, its keys, image files and image
headers checked, and its prompt length computed (text tokens + vision tokens from the image sizes by
the image processor's own formula; videos are decoded). A bad row is a `DatasetError` naming file,
line/row and reason. A prompt longer than `max_prompt_length` is dropped and counted (logged once,
`num_filtered`) when `filter_overlong_prompts`, else an error. Pixel data is decoded only in `__getitem__`, so a corrupt
image whose header is fine is reported (with its row) when the row is first loaded.

Public API
----------
`DatasetError`, `RLDataset` (`__getitem__` -> item dict, `collate`), `build_dataset`, `collate_fn`,
`EpochSampler`, `StatefulDataLoader` (`state_dict()` / `load_state_dict()`), `build_dataloader`,
`expand_data_files`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mtrl.protocol import DataBatch
from mtrl.utils.errors import UserError
from mtrl.utils.hub import parse_dataset_id
from mtrl.utils.logger import get_logger
from mtrl.utils.rope import compute_position_ids, uses_mrope
from mtrl.utils.vision import (VisionInputError, image_size, image_token_count, load_image, load_video,
                               processor_size_kwargs, serving_kwargs, video_processor_kwargs)

__all__ = ["DatasetError", "RowSource", "RLDataset", "build_dataset", "collate_fn", "EpochSampler",
           "StatefulDataLoader", "build_dataloader", "expand_data_files", "DATA_EXTENSIONS", "MM_INPUT_KEYS",
           "PROMPT_NON_TENSORS"]

logger = get_logger(__name__)

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")

#: Processor outputs kept per sample in `multi_modal_inputs` (what the model's forward takes).
MM_INPUT_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

#: The per-row non-tensor fields of a collated prompt batch (docs/DATA_LAYOUT.md).
PROMPT_NON_TENSORS = ("multi_modal_inputs", "raw_prompt", "ground_truth", "images", "videos", "mm_processor_kwargs",
                      "index", "uid")

_PLACEHOLDER = re.compile(r"(<image>|<video>)")


class DatasetError(UserError, ValueError):
    """A problem with the data (file, row, image, length); the message names the file and line/row."""


# ============================================================================= data files


@dataclass(frozen=True)
class RowSource:
    """Where a row came from, for error messages: ``data/train.jsonl, line 12``."""

    file: str
    number: int  # 1-based
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.file}, {self.unit} {self.number}"


class _Table:
    """The rows of one data file (after split selection), readable by position."""

    def __init__(self, path: str, split: Optional[str] = None, rows: Optional[List[Any]] = None):
        self.path = path
        self.dir = os.path.dirname(os.path.abspath(path)) if rows is None else None
        self._rows: Optional[List[Any]] = None  # json / jsonl / in-memory rows
        self._numbers: List[int] = []  # 1-based line or row number of each row, for RowSource
        self._arrow = None  # parquet
        self.unit = "row"
        split_done = False  # a JSON mapping of splits selects the split itself
        if rows is not None:
            self._rows, self._numbers = list(rows), list(range(1, len(rows) + 1))
        elif _is_saved_dataset(path):
            self.dir = os.path.abspath(path)
            split_done = self._read_saved(path, split)
        elif parse_dataset_id(path) is not None:
            self.dir = None  # relative image paths of a Hub dataset resolve against image_dir only
            self._read_hub(path)
            split_done = True
        elif path.endswith(".jsonl"):
            self.unit = "line"
            self._read_jsonl(path)
        elif path.endswith(".json"):
            split_done = self._read_json(path, split)
        elif path.endswith(".parquet"):
            self._read_parquet(path)
        else:
            raise DatasetError(f"{path}: unsupported data file type (use {', '.join(DATA_EXTENSIONS)})")
        if split is not None and not split_done:
            self._select_split(split)

    # -- readers
    def _read_jsonl(self, path: str) -> None:
        self._rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    self._rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    # e's own position counts within this line only ("line 1"): give the column alone.
                    raise DatasetError(f"{RowSource(path, number)}: invalid JSON at column {e.colno}: "
                                       f"{e.msg}") from None
                self._numbers.append(number)

    def _read_json(self, path: str, split: Optional[str]) -> bool:
        """Read a list of rows, or the `split` entry of a mapping of splits (then return True)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: invalid JSON: {e}") from None
        if isinstance(data, dict):
            if split is None:
                raise DatasetError(f"{path}: the top level is a mapping (keys {sorted(data)[:10]}); select a split "
                                   f"with `{path}@<split>` or store a list of rows")
            if split not in data:
                raise DatasetError(f"{path}@{split}: no split {split!r}; the file has {sorted(data)[:20]}")
            rows, split_done = data[split], True
        else:
            rows, split_done = data, False
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: expected a list of rows, got {type(rows).__name__}")
        self._rows, self._numbers = rows, list(range(1, len(rows) + 1))
        return split_done

    def _read_parquet(self, path: str) -> None:
        import pyarrow.parquet as pq

        try:
            self._arrow = pq.read_table(path, memory_map=True)
        except Exception as e:
            raise DatasetError(f"{path}: cannot read parquet: {e}") from None
        self._numbers = list(range(1, self._arrow.num_rows + 1))

    def _set_arrow(self, table: Any) -> None:
        self._arrow = table
        self._numbers = list(range(1, table.num_rows + 1))

    def _read_saved(self, folder: str, split: Optional[str]) -> bool:
        """A `save_to_disk` folder; for a DatasetDict select the split (then return True)."""
        dict_file = os.path.join(folder, "dataset_dict.json")
        if not os.path.isfile(dict_file):
            self._set_arrow(_read_arrow_dataset(folder))
            return False
        with open(dict_file, encoding="utf-8") as f:
            splits = list(json.load(f).get("splits", []))
        split = _pick_split(folder, split, splits, "saved DatasetDict")
        self._set_arrow(_read_arrow_dataset(os.path.join(folder, split)))
        return True

    def _read_hub(self, entry: str) -> None:
        repo, config, split = parse_dataset_id(entry)
        try:
            import datasets
        except ImportError:
            raise DatasetError(f"{entry!r} names a Hugging Face Hub dataset, which needs the `datasets` library "
                               f"(pip install datasets); or download its Parquet files (`hf download {repo} "
                               f"--repo-type dataset --local-dir DIR`) and give `DIR@<split>`") from None
        try:
            loaded = datasets.load_dataset(repo, config, split=split)
        except Exception as e:  # noqa: BLE001 - unknown repo / config / split, offline and not cached, ...
            raise DatasetError(f"{entry}: cannot load the Hub dataset {repo}"
                               f"{f' (config {config})' if config else ''}: {type(e).__name__}: {e}") from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[_pick_split(entry, None, list(loaded), "Hub dataset")]
        # Arrow, not Python rows: images stay {"bytes", "path"} until a row is loaded.
        self._set_arrow(loaded.with_format("arrow")[:])

    def _select_split(self, split: str) -> None:
        keep = [i for i, row in enumerate(self.iter_rows()) if isinstance(row, dict) and row.get("split") == split]
        if not keep:
            raise DatasetError(f"{self.path}@{split}: no row has \"split\": {split!r}")
        if self._arrow is not None:
            self._arrow = self._arrow.take(keep)
        else:
            self._rows = [self._rows[i] for i in keep]
        self._numbers = [self._numbers[i] for i in keep]

    # -- access
    def __len__(self) -> int:
        return len(self._numbers)

    def row(self, i: int) -> Any:
        if self._arrow is not None:
            return self._arrow.slice(i, 1).to_pylist()[0]
        return self._rows[i]

    def iter_rows(self) -> Iterator[Any]:
        if self._arrow is not None:
            for batch in self._arrow.to_batches(max_chunksize=1024):
                yield from batch.to_pylist()
        else:
            yield from self._rows

    def source(self, i: int) -> RowSource:
        return RowSource(self.path, self._numbers[i], self.unit)


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json"))


def _pick_split(where: str, split: Optional[str], splits: List[str], what: str) -> str:
    if split is None:
        if len(splits) != 1:
            raise DatasetError(f"{where}: a {what} with splits {splits}; select one with `{where}@<split>`")
        return splits[0]
    if split not in splits:
        raise DatasetError(f"{where}@{split}: no split {split!r}; the {what} has {splits}")
    return split


def _read_arrow_dataset(folder: str) -> Any:
    """The table of one `save_to_disk` Dataset folder: the Arrow stream files its state.json lists, in order."""
    import pyarrow as pa

    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            files = [os.path.join(folder, d["filename"]) for d in json.load(f)["_data_files"]]
        tables = [pa.ipc.open_stream(pa.memory_map(file)).read_all() for file in files]
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        raise DatasetError(f"{folder}: cannot read the saved dataset ({type(e).__name__}: {e})") from None
    if not tables:
        raise DatasetError(f"{folder}: the saved dataset lists no data files in state.json")
    return pa.concat_tables(tables)


def _data_files_in(folder: str) -> List[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.endswith(DATA_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))


def _split_files(folder: str, split: str) -> List[str]:
    sub = os.path.join(folder, split)
    if os.path.isdir(sub):
        return _data_files_in(sub)
    pattern = re.compile(rf"^{re.escape(split)}([-_.].*)?({'|'.join(map(re.escape, DATA_EXTENSIONS))})$")
    for where in (folder, os.path.join(folder, "data")):
        if os.path.isdir(where):
            found = [f for f in _data_files_in(where) if pattern.match(os.path.basename(f))]
            if found:
                return found
    return []


def expand_data_files(files: Union[str, Sequence[str]]) -> List[Tuple[str, Optional[str]]]:
    """`(data file, saved-dataset folder or Hub id; split or None)` pairs for a comma-separated list (or a list) of
    entries (module docstring)."""
    entries = [e.strip() for e in (files.split(",") if isinstance(files, str) else files) if e and e.strip()]
    if not entries:
        raise DatasetError("no data files given (dataset.train_files / val_files is empty)")
    out: List[Tuple[str, Optional[str]]] = []
    for entry in entries:
        if parse_dataset_id(entry) is not None:
            out.append((entry, None))  # the split is part of the id
            continue
        path, split = entry, None
        if not os.path.exists(entry) and "@" in entry:
            path, split = entry.rsplit("@", 1)
        if not os.path.exists(path):
            raise DatasetError(f"data file {entry!r} does not exist")
        if os.path.isdir(path) and _is_saved_dataset(path):
            out.append((path, split))
        elif os.path.isdir(path):
            found = _data_files_in(path) if split is None else _split_files(path, split)
            if not found:
                what = "data files" if split is None else f"files of split {split!r}"
                raise DatasetError(f"data folder {path!r} has no {what} ({', '.join(DATA_EXTENSIONS)}); it holds "
                                   f"{sorted(os.listdir(path))[:20]}")
            out += [(f, None) for f in found]
        elif path.endswith(DATA_EXTENSIONS):
            out.append((path, split))
        else:
            raise DatasetError(f"data file {path!r}: unsupported type (use {', '.join(DATA_EXTENSIONS)}, a folder "
                               f"of them or path@split)")
    return out


# ============================================================================= the dataset


def _as_list(value: Any) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, np.ndarray):
        return list(value)
    return [value]


_PROCESSOR_MODEL_TYPES = {"Qwen2VLProcessor": "qwen2_vl", "Qwen2_5_VLProcessor": "qwen2_5_vl",
                          "Qwen3VLProcessor": "qwen3_vl"}


def _resolve_model_config(model_config: Any, tokenizer: Any, processor: Any) -> Any:
    """The model config for position ids: the given one, the folder's config.json, or one derived from the processor."""
    if model_config is not None or processor is None:
        return model_config
    path = getattr(tokenizer, "name_or_path", None)
    if path and os.path.isfile(os.path.join(path, "config.json")):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(path)
        except Exception:  # fall through to the processor-derived config
            pass
    model_type = _PROCESSOR_MODEL_TYPES.get(type(processor).__name__)
    if model_type is None:
        raise DatasetError(f"cannot tell the model type of processor {type(processor).__name__}: pass model_config "
                           f"to build_dataset")
    logger.warning("dataset: no model config given; position ids use a %s config derived from the processor "
                   "(tokens_per_second=2)", model_type)
    return {"model_type": model_type, "image_token_id": processor.image_token_id,
            "video_token_id": getattr(processor, "video_token_id", None),
            "vision_config": {"spatial_merge_size": processor.image_processor.merge_size, "tokens_per_second": 2}}


def _load_format_prompt(format_prompt: Optional[str]):
    """A compiled Jinja template from inline text or a file path (None when unset)."""
    if not format_prompt:
        return None
    import jinja2
    from jinja2 import meta

    source = format_prompt
    if os.path.isfile(format_prompt):
        with open(format_prompt, encoding="utf-8") as f:
            source = f.read()
    env = jinja2.Environment()
    try:
        variables = meta.find_undeclared_variables(env.parse(source))
        template = env.from_string(source)
    except jinja2.TemplateError as e:
        raise DatasetError(f"dataset.format_prompt is not a valid Jinja template: {e}") from None
    if "content" not in variables:
        raise DatasetError("dataset.format_prompt must use {{ content }} where the prompt goes")
    return template


class RLDataset(torch.utils.data.Dataset):
    """Prompts (with their images / videos) tokenized for a model; item layout in `__getitem__`.

    Args:
        data_files: comma-separated entries or a list of them (see the module docstring).
        tokenizer: the model's tokenizer (`processor.tokenizer` for vision models).
        processor: the Qwen-VL processor, or None for text-only models.
        model_config: the model's HF config (for position ids); when None it is read from the
            tokenizer's folder or derived from the processor.
        the rest: as `DatasetConfig`.
    """

    #: Subclasses whose rows carry their targets under other keys (mtrl/utils/sft_dataset.py) turn this off.
    _warn_missing_answers = True

    def __init__(self, data_files: Union[str, Sequence[str]], tokenizer: Any, processor: Any = None,
                 model_config: Any = None, *, prompt_key: str = "prompt", answer_key: str = "answer",
                 image_key: str = "images", video_key: str = "videos", image_dir: Optional[str] = None,
                 video_fps: float = 2.0, min_pixels: int = 262144, max_pixels: int = 4194304,
                 max_prompt_length: int = 512, filter_overlong_prompts: bool = True,
                 format_prompt: Optional[str] = None, system_prompt: Optional[str] = None,
                 _tables: Optional[List[_Table]] = None):
        self.tokenizer = tokenizer
        self.processor = processor if getattr(processor, "image_processor", None) is not None else None
        frames_per_patch = getattr(getattr(self.processor, "video_processor", None), "temporal_patch_size", None)
        self.temporal_patch_size = int(frames_per_patch or 2)  # a video's frame count is padded to a multiple
        self.model_config = _resolve_model_config(model_config, tokenizer, self.processor)
        try:  # position ids are computed per item, so an unsupported model must fail here, not mid-run
            mrope = uses_mrope(self.model_config)
        except NotImplementedError as e:
            raise DatasetError(str(e)) from None
        if self.processor is not None and not mrope:
            raise DatasetError(f"the processor is a vision processor but the model config "
                               f"({getattr(self.model_config, 'model_type', self.model_config)!r}) is not a Qwen-VL one")
        self.prompt_key, self.answer_key = prompt_key, answer_key
        self.image_key, self.video_key = image_key, video_key
        self.image_dir = image_dir
        self.video_fps, self.min_pixels, self.max_pixels = float(video_fps), int(min_pixels), int(max_pixels)
        if not 0 < self.min_pixels <= self.max_pixels:
            raise DatasetError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, "
                               f"max_pixels={max_pixels}")
        self.max_prompt_length = int(max_prompt_length)
        self.filter_overlong_prompts = filter_overlong_prompts
        self.system_prompt = system_prompt
        self._format = _load_format_prompt(format_prompt)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad) if pad is not None else 0

        self._tables = _tables if _tables is not None else [_Table(p, s) for p, s in expand_data_files(data_files)]
        self._has_answers = any(isinstance(r, dict) and answer_key in r for t in self._tables for r in t.iter_rows())
        if not self._has_answers and self._warn_missing_answers:
            logger.warning("dataset: no row has the answer key %r; ground_truth will be empty", answer_key)
        self._rows: List[Tuple[int, int]] = []  # (table, row in table) of every kept row
        self.prompt_lengths: List[int] = []
        self.filtered: List[RowSource] = []  # rows dropped for being too long
        self._scan()

    @classmethod
    def from_rows(cls, rows: Sequence[Dict[str, Any]], tokenizer: Any, processor: Any = None, model_config: Any = None,
                  name: str = "<rows>", **kwargs) -> "RLDataset":
        """A dataset from in-memory rows (images may be PIL images or bytes; paths resolve against image_dir)."""
        return cls([], tokenizer, processor, model_config, _tables=[_Table(name, rows=list(rows))], **kwargs)

    @classmethod
    def from_config(cls, data_files: str, config: Any, tokenizer: Any, processor: Any = None,
                    model_config: Any = None) -> "RLDataset":
        """A dataset driven by a `DatasetConfig` (files: its train_files or val_files)."""
        return cls(data_files, tokenizer, processor, model_config, prompt_key=config.prompt_key,
                   answer_key=config.answer_key, image_key=config.image_key, video_key=config.video_key,
                   image_dir=config.image_dir, video_fps=config.video_fps, min_pixels=config.min_pixels,
                   max_pixels=config.max_pixels, max_prompt_length=config.max_prompt_length,
                   filter_overlong_prompts=config.filter_overlong_prompts, format_prompt=config.format_prompt,
                   system_prompt=config.system_prompt)

    # ------------------------------------------------------------------ construction-time checks

    def _scan(self) -> None:
        total = 0
        for t, table in enumerate(self._tables):
            for i, row in enumerate(table.iter_rows()):
                total += 1
                source = table.source(i)
                length = self._check_row(row, source, table)
                if length > self.max_prompt_length:
                    if not self.filter_overlong_prompts:
                        raise DatasetError(f"{source}: the prompt is {length} tokens long, more than "
                                           f"max_prompt_length={self.max_prompt_length} (raise max_prompt_length "
                                           f"or set filter_overlong_prompts=true to drop such rows)")
                    self.filtered.append(source)
                    continue
                self._rows.append((t, i))
                self.prompt_lengths.append(length)
        if self.filtered:
            logger.warning("dataset: dropped %d of %d rows whose prompt is longer than max_prompt_length=%d "
                           "(first: %s)", len(self.filtered), total, self.max_prompt_length, self.filtered[0])
        if not self._rows:
            raise DatasetError(f"dataset {[t.path for t in self._tables]} has no usable rows "
                               f"({total} read, {len(self.filtered)} too long)")

    @property
    def num_filtered(self) -> int:
        return len(self.filtered)

    def _search_dirs(self, table: _Table) -> List[Optional[str]]:
        return [self.image_dir, table.dir]

    def _fields(self, row: Any, source: RowSource) -> Tuple[str, Any, List[Any], List[Any]]:
        """(prompt, answer, image specs, video specs) of a row, checking the keys."""
        if not isinstance(row, dict):
            raise DatasetError(f"{source}: a row must be an object with keys, got {type(row).__name__}")
        if self.prompt_key not in row:
            raise DatasetError(f"{source}: missing key {self.prompt_key!r} (the row has {sorted(row)}; "
                               f"set dataset.prompt_key to rename)")
        prompt = row[self.prompt_key]
        if not isinstance(prompt, str):
            raise DatasetError(f"{source}: {self.prompt_key!r} must be a string, got {type(prompt).__name__}")
        try:  # JSON can carry lone surrogates (\ud800), which no tokenizer takes
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DatasetError(f"{source}: {self.prompt_key!r} is not valid Unicode text: {prompt[e.start]!r} at "
                               f"character {e.start} is a lone surrogate") from None
        if self._has_answers and self.answer_key not in row:
            raise DatasetError(f"{source}: missing key {self.answer_key!r} (the row has {sorted(row)}; "
                               f"set dataset.answer_key to rename)")
        answer = row.get(self.answer_key, "")
        answer = "" if answer is None else (str(answer) if isinstance(answer, (str, int, float)) else answer)
        images, videos = _as_list(row.get(self.image_key)), _as_list(row.get(self.video_key))
        if (images or videos) and self.processor is None:
            raise DatasetError(f"{source}: the row has images/videos but the model has no image processor "
                               f"(a text-only model?)")
        return prompt, answer, images, videos

    def _check_row(self, row: Any, source: RowSource, table: _Table) -> int:
        """Validate a row and return its prompt length in tokens (vision tokens included)."""
        prompt, _, images, videos = self._fields(row, source)
        if videos:  # timestamps etc. make the token count processor-specific: process for real
            return int(self._encode(row, source, table)["input_ids"].shape[0])
        text = self.render_prompt(prompt, len(images), len(videos), source)
        n_text = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        n_vision = 0
        for spec in images:
            try:
                width, height = image_size(spec, self._search_dirs(table))
                tokens = image_token_count(self.processor.image_processor, height, width, self.min_pixels,
                                           self.max_pixels)
            except VisionInputError as e:
                raise DatasetError(f"{source}: {e}") from None
            n_vision += tokens - 1  # the pad token counted in n_text expands
        return n_text + n_vision

    # ------------------------------------------------------------------ prompt rendering

    def render_prompt(self, prompt: str, n_images: int = 0, n_videos: int = 0,
                      source: Optional[RowSource] = None) -> str:
        """The chat-templated prompt text (one vision pad token per image / video, not yet expanded)."""
        where = f"{source}: " if source else ""
        if self._format is not None:
            try:
                prompt = self._format.render(content=prompt)
            except Exception as e:
                raise DatasetError(f"{where}dataset.format_prompt failed: {e}") from None
        messages: List[Dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        if self.processor is None:
            messages.append({"role": "user", "content": prompt})
            owner = self.tokenizer
        else:
            messages.append({"role": "user", "content": self._content_parts(prompt, n_images, n_videos, where)})
            owner = self.processor
        if getattr(owner, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise DatasetError("the tokenizer has no chat template; MTRL renders every prompt with one")
        return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @staticmethod
    def _content_parts(prompt: str, n_images: int, n_videos: int, where: str) -> List[Dict[str, Any]]:
        pieces = _PLACEHOLDER.split(prompt)
        n_img_ph, n_vid_ph = pieces.count("<image>"), pieces.count("<video>")
        if (n_img_ph, n_vid_ph) == (0, 0):  # no placeholders: images, then videos, then the text
            parts = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
            return parts + ([{"type": "text", "text": prompt}] if prompt else [])
        if n_img_ph != n_images or n_vid_ph != n_videos:
            raise DatasetError(f"{where}the prompt has {n_img_ph} <image> and {n_vid_ph} <video> placeholders but "
                               f"the row has {n_images} images and {n_videos} videos")
        parts = []
        for piece in pieces:
            if piece == "<image>":
                parts.append({"type": "image"})
            elif piece == "<video>":
                parts.append({"type": "video"})
            elif piece:
                parts.append({"type": "text", "text": piece})
        return parts

    # ------------------------------------------------------------------ items

    def __len__(self) -> int:
        return len(self._rows)

    def source(self, index: int) -> RowSource:
        t, i = self._rows[index]
        return self._tables[t].source(i)

    def _encode(self, row: Dict[str, Any], source: RowSource, table: _Table) -> Dict[str, Any]:
        """Load the row's vision inputs and run the processor (or tokenizer); the processor resizes."""
        prompt, answer, image_specs, video_specs = self._fields(row, source)
        dirs = self._search_dirs(table)
        try:
            images = [load_image(s, dirs) for s in image_specs]
            videos = [load_video(s, dirs, self.video_fps, self.temporal_patch_size) for s in video_specs]
        except VisionInputError as e:
            raise DatasetError(f"{source}: {e}") from None
        text = self.render_prompt(prompt, len(images), len(videos), source)
        if self.processor is None:
            encoded = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            size = processor_size_kwargs(self.min_pixels, self.max_pixels)
            kwargs: Dict[str, Any] = {}
            if images:
                kwargs["images"] = images
                kwargs["images_kwargs"] = dict(size)
            if videos:  # frames already sampled at video_fps; the processor resizes them
                kwargs["videos"] = [v.frames for v in videos]
                kwargs["videos_kwargs"] = {**video_processor_kwargs(self.min_pixels, self.max_pixels),
                                           "video_metadata": [v.metadata() for v in videos]}
            encoded = self.processor(text=[text], return_tensors="pt", **kwargs)
        input_ids = encoded["input_ids"][0]
        mm = {k: torch.as_tensor(encoded[k]) for k in MM_INPUT_KEYS if k in encoded and encoded[k] is not None}
        mm_kwargs = serving_kwargs(self.min_pixels, self.max_pixels) if images or videos else {}
        return {"input_ids": input_ids, "multi_modal_inputs": mm, "prompt": prompt, "answer": answer,
                "images": images, "videos": videos, "mm_processor_kwargs": mm_kwargs}

    def __getitem__(self, index: int) -> Dict[str, Any]:
        """One prompt, unpadded:

        * ``input_ids`` (L,) long, ``attention_mask`` (L,) long (all ones);
        * ``position_ids`` (3, L) for Qwen-VL models, (L,) for text models (`mtrl.utils.rope`);
        * ``multi_modal_inputs``: dict of `MM_INPUT_KEYS` tensors present for the row ({} without vision);
        * ``raw_prompt`` (the row's prompt text), ``ground_truth``, ``images`` (the PIL images exactly as the
          processor got them, before its resize), ``videos`` (`mtrl.utils.vision.Video`s as the processor
          got them), ``mm_processor_kwargs`` (the processor's pixel bounds in vLLM's form, {} without
          vision), ``index`` (position in this dataset), ``uid`` (str(index); the dataloader makes it
          unique per epoch).
        """
        if not 0 <= index < len(self._rows):
            raise IndexError(f"dataset index {index} out of range (0..{len(self._rows) - 1})")
        t, i = self._rows[index]
        table = self._tables[t]
        source = table.source(i)
        enc = self._encode(table.row(i), source, table)
        input_ids = enc["input_ids"].long()
        if input_ids.shape[0] > self.max_prompt_length:  # the scan's count was exact; this is a safety net
            raise DatasetError(f"{source}: the prompt is {input_ids.shape[0]} tokens long, more than "
                               f"max_prompt_length={self.max_prompt_length}")
        mm = enc["multi_modal_inputs"]
        position_ids = compute_position_ids(self.model_config, input_ids, image_grid_thw=mm.get("image_grid_thw"),
                                            video_grid_thw=mm.get("video_grid_thw"),
                                            second_per_grid_ts=mm.get("second_per_grid_ts"))
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "position_ids": position_ids,
                "multi_modal_inputs": mm, "raw_prompt": enc["prompt"], "ground_truth": enc["answer"],
                "images": enc["images"], "videos": enc["videos"],
                "mm_processor_kwargs": enc["mm_processor_kwargs"], "index": index, "uid": str(index)}

    def collate(self, items: Sequence[Dict[str, Any]]) -> DataBatch:
        return collate_fn(items, pad_token_id=self.pad_token_id)

    def media_per_row(self) -> Dict[str, int]:
        """The most images and videos any row has (what a vLLM engine reserves room for per prompt)."""
        most = {"image": 0, "video": 0}
        for t, i in self._rows:
            table = self._tables[t]
            _, _, images, videos = self._fields(table.row(i), table.source(i))
            most = {"image": max(most["image"], len(images)), "video": max(most["video"], len(videos))}
        return most


def build_dataset(data_files: str, config: Any, tokenizer: Any, processor: Any = None,
                  model_config: Any = None) -> RLDataset:
    """`RLDataset.from_config`: the dataset of `data_files` (train_files or val_files) under `config` (DatasetConfig)."""
    return RLDataset.from_config(data_files, config, tokenizer, processor, model_config)


# ============================================================================= collate


def collate_fn(items: Sequence[Dict[str, Any]], pad_token_id: int = 0) -> DataBatch:
    """Items of `RLDataset.__getitem__` -> a left-padded `DataBatch` (docs/DATA_LAYOUT.md).

    tensors: ``input_ids`` (B, P) padded with `pad_token_id`, ``attention_mask`` (B, P),
    ``position_ids`` (B, P) or (B, 3, P) with 0 at padding; P = the longest prompt of the batch.
    non_tensors: `PROMPT_NON_TENSORS` (``multi_modal_inputs``, ``raw_prompt``, ``ground_truth``, ``images``,
    ``videos``, ``mm_processor_kwargs``, ``index``, ``uid``).
    """
    if not items:
        raise ValueError("collate_fn got no items")
    width = max(int(it["input_ids"].shape[0]) for it in items)
    batch = len(items)
    pos_rows = {tuple(it["position_ids"].shape[:-1]) for it in items}
    if len(pos_rows) != 1:
        raise ValueError(f"items disagree on the position_ids layout: {sorted(pos_rows)}")
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    position_ids = torch.zeros((batch, *pos_rows.pop(), width), dtype=torch.long)
    for r, it in enumerate(items):
        n = int(it["input_ids"].shape[0])
        input_ids[r, width - n:] = it["input_ids"]
        attention_mask[r, width - n:] = it["attention_mask"]
        position_ids[r, ..., width - n:] = it["position_ids"]
    non_tensors = {key: [it[key] for it in items] for key in PROMPT_NON_TENSORS}
    return DataBatch(tensors={"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids},
                     non_tensors=non_tensors)


_default_collate = collate_fn  # StatefulDataLoader's `collate_fn` argument shadows the name


# ============================================================================= sampling and loading


class EpochSampler:
    """The order of the dataset in each epoch: a permutation seeded by (seed, epoch), or 0..n-1.

    A pure function of (num_samples, shuffle, seed, epoch), so a resumed run sees the same order.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 42):
        self.num_samples, self.shuffle, self.seed = int(num_samples), bool(shuffle), int(seed)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_samples)


class StatefulDataLoader:
    """Batches of a dataset in a deterministic order, resumable mid-epoch.

    Iterating yields `DataBatch`es from the current position to the end of the current epoch, then
    moves to the next epoch (a new `for` loop starts it). The position is shared by all iterators of
    the loader, so a second iterator (extra batches for online filtering) continues where the first
    stopped instead of repeating data. `state_dict()` taken after a batch was handed out counts that
    batch as consumed; `load_state_dict()` continues with the next one.

    Each batch's ``uid`` is ``"{epoch}-{index}"``: unique per prompt within a run.

    Args:
        batch_size: rows per batch; <= 0 means the whole dataset in one batch.
        drop_last: drop the last incomplete batch of an epoch; None = drop it when shuffling
            (training), keep it otherwise (validation).
        collate_fn: items -> DataBatch; default `dataset.collate` (or `collate_fn` with pad id 0).
    """

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool = True, seed: int = 42,
                 drop_last: Optional[bool] = None, collate_fn=None):
        self.dataset = dataset
        n = len(dataset)
        self.batch_size = n if batch_size is None or batch_size <= 0 else int(batch_size)
        self.drop_last = shuffle if drop_last is None else bool(drop_last)
        self.sampler = EpochSampler(n, shuffle, seed)
        self.collate_fn = collate_fn or getattr(dataset, "collate", None) or _default_collate
        if self.drop_last and self.batch_size > n:
            raise DatasetError(f"the batch size ({self.batch_size}) is larger than the dataset ({n} rows), so an "
                               f"epoch has no full batch; lower the batch size or add data")
        self.epoch = 0
        self.offset = 0  # rows of the current epoch already handed out
        self._order_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache[0] != epoch:
            self._order_cache = (epoch, self.sampler.order(epoch))
        return self._order_cache[1]

    def _epoch_done(self) -> bool:
        remaining = self.sampler.num_samples - self.offset
        return remaining < (self.batch_size if self.drop_last else 1)

    def _next_epoch(self) -> None:
        self.epoch, self.offset = self.epoch + 1, 0

    def __iter__(self) -> Iterator[DataBatch]:
        if self._epoch_done():  # another iterator handed out the epoch's last batch without finishing
            self._next_epoch()
        while not self._epoch_done():
            epoch, start = self.epoch, self.offset
            indices = self._order(epoch)[start:start + self.batch_size]
            self.offset = start + len(indices)  # before yielding: a checkpoint taken now resumes after it
            items = [self.dataset[int(i)] for i in indices]
            for item in items:
                item["uid"] = f"{epoch}-{item['index']}"
            yield self.collate_fn(items)
        self._next_epoch()

    def state_dict(self) -> Dict[str, Any]:
        epoch, offset = (self.epoch + 1, 0) if self._epoch_done() else (self.epoch, self.offset)
        return {"epoch": epoch, "offset": offset, "num_samples": self.sampler.num_samples,
                "batch_size": self.batch_size, "shuffle": self.sampler.shuffle, "seed": self.sampler.seed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("num_samples", self.sampler.num_samples) != self.sampler.num_samples:
            logger.warning("dataloader: the checkpoint was taken with %s rows, the dataset now has %d; the data "
                           "order will differ", state.get("num_samples"), self.sampler.num_samples)
        for key in ("shuffle", "seed"):
            if key in state and state[key] != getattr(self.sampler, key):
                logger.warning("dataloader: the checkpoint's %s=%r differs from the config's %r; using the config's",
                               key, state[key], getattr(self.sampler, key))
        self.epoch = int(state["epoch"])
        self.offset = min(int(state["offset"]), self.sampler.num_samples)


def build_dataloader(dataset: Any, batch_size: int, shuffle: bool = True, seed: int = 42,
                     drop_last: Optional[bool] = None) -> StatefulDataLoader:
    """A `StatefulDataLoader` (batch_size <= 0: the whole dataset in one batch, e.g. val_batch_size=-1)."""
    return StatefulDataLoader(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
