"""Loading a user reward function from a file and calling it with checked inputs and outputs.

A reward file is plain Python (it does not need to import MTRL). `worker.reward.reward_fn_path` names it
as `file.py` (function `reward_function`) or `file.py:function`. A relative path is looked up in the
config file's folder first, then in the working directory. `worker.reward.reward_fn_kwargs` are passed
to every call as keyword arguments.

Two forms are accepted:

* Per-sample (the default)::

      def reward_function(data_dict, **kwargs) -> tuple[float, dict[str, float]]

  `data_dict` has `prompt`, `response`, `response_length` (its tokens), `ground_truth` ("" when the
  dataset has no answer) and `images` (a list of PIL images, possibly empty). A bare number is
  accepted as `(number, {})`, and a dict with an ``overall`` key as `(overall, the other keys)`:
  EasyR1's `compute_score(reward_input) -> {"overall": ..., "format": ..., "accuracy": ...}`.

* Batch form, declared by setting the attribute ``batched = True`` on the function, by naming it
  ``batch_reward_function``, or by `worker.reward.reward_type: batch`::

      def reward_function(data_dicts, **kwargs): ...
      reward_function.batched = True

  It receives a list of data_dicts and returns either a list of per-sample results (any form above,
  in order; EasyR1's `compute_score(reward_inputs) -> list[dict]` is the dict one) or the columnar
  `(list_of_floats, dict_of_lists)`. A plain list of numbers also works.
  Under Ray each reward actor calls it on its own contiguous chunk of the batch, not on the whole
  batch (use `worker.reward.num_cpus: 1` when the function must see everything at once).
  Signature inspection is deliberately not used: both forms take one positional argument.

`worker.reward.reward_type` picks the form: `function` (as declared above), `sequential` (per-sample)
or `batch` (EasyR1's names, so an EasyR1 file needs no `batched` attribute).

When only a file is given, `reward_function` is looked up first and `batch_reward_function` second.

Every sample must give the same metric names; metric values and rewards must be finite real numbers.
`overall` is reserved (it is the name under which the reward itself is logged: `reward/overall`): in a
dict result it is the reward, never a metric.
Any violation, and any exception raised by the function, is a `RewardError` that names the file, the
function and the sample (its row index in the batch, its uid when known and short prompt / response
excerpts). With `worker.reward.on_error: zero` such a sample scores 0 instead and the run goes on
(`RewardFunction.score` returns the messages; the manager logs them and counts them as `reward/errors`).

While the file is imported, its folder is first on `sys.path`, so it can import helper modules
sitting next to it (`reward_fns/format_accuracy.py` imports `math_answer` this way).
"""

import hashlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mtrl.utils.errors import UserError

DEFAULT_FUNCTION_NAMES = ("reward_function", "batch_reward_function")
#: `worker.reward.reward_type` values that mean a reward function, and how each calls it (None: as declared).
FUNCTION_FORMS = {"function": None, "sequential": False, "batch": True}
# `overall` is the reward itself (reward/overall); `errors` counts the samples scored 0 by on_error=zero.
RESERVED_METRIC_NAMES = ("overall", "errors")
ON_ERROR_CHOICES = ("raise", "zero")

Scores = List[float]
Metrics = Dict[str, List[float]]
Errors = List[Tuple[int, str]]  # (row in the batch, message) of each sample scored 0 by on_error=zero


class RewardError(UserError, RuntimeError):
    """A reward function could not be loaded or gave an unusable result; the message is for the user."""


# ----------------------------------------------------------------------------- locating the file


def parse_reward_fn_path(spec: str) -> Tuple[str, Optional[str]]:
    """`"file.py:function"` -> `("file.py", "function")`; `"file.py"` -> `("file.py", None)`.

    Splits on the last colon only when what follows is a Python identifier, so a Windows drive
    letter (`C:\\rewards\\r.py`) is not mistaken for a function name.
    """
    path, sep, name = spec.rpartition(":")
    if sep and path and name.isidentifier():
        return path, name
    return spec, None


def resolve_reward_file(path: str, config_dir: Optional[str] = None) -> str:
    """Absolute path of the reward file: as given when absolute, else config_dir first, then the cwd."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        candidates = [path]
    else:
        candidates = ([os.path.join(config_dir, path)] if config_dir else []) + [os.path.join(os.getcwd(), path)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    looked = ", ".join(os.path.abspath(c) for c in candidates)
    raise RewardError(f"worker.reward.reward_fn_path: reward file {path!r} not found (looked at: {looked}).")


# ----------------------------------------------------------------------------- importing it


def _module_name(file: str) -> str:
    # Unique per absolute path: two `reward.py` in different folders must not replace each other
    # in sys.modules (pickle and dataclasses look classes up there by module name).
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(file))[0])
    digest = hashlib.sha1(file.encode()).hexdigest()[:10]
    return f"_mtrl_reward_{stem}_{digest}"


def _where_in_file(tb: Any, file: str) -> str:
    """' (line N: `code`)' for the innermost traceback frame inside `file`, or ''."""
    frames = [f for f in traceback.extract_tb(tb) if os.path.abspath(f.filename) == file]
    if not frames:
        return ""
    frame = frames[-1]
    code = f": `{frame.line.strip()}`" if frame.line else ""
    return f" (line {frame.lineno}{code})"


def load_module(file: str) -> Any:
    """Import `file` as a fresh module; syntax and import errors become `RewardError`s naming the line."""
    name = _module_name(file)
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise RewardError(f"Reward file {file}: cannot be imported as Python source.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = os.path.dirname(file)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        sys.modules.pop(name, None)
        line = (e.text or "").rstrip("\n")
        caret = f"\n    {' ' * max((e.offset or 1) - 1, 0)}^" if line and e.offset else ""
        shown = f"\n    {line}{caret}" if line else ""
        raise RewardError(f"Reward file {e.filename or file}, line {e.lineno}: syntax error: {e.msg}{shown}") from None
    except Exception as e:
        sys.modules.pop(name, None)
        raise RewardError(f"Reward file {file} failed while being imported: "
                          f"{type(e).__name__}: {e}{_where_in_file(e.__traceback__, file)}") from e
    finally:
        # Only while importing: a lasting entry would let this folder shadow other modules.
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def _functions_defined_in(module: Any) -> List[str]:
    return sorted(n for n, v in vars(module).items()
                  if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_"))


def _check_kwargs(fn: Callable, kwargs: Dict[str, Any], label: str) -> None:
    """Fail at load time, not at the first batch, when reward_fn_kwargs do not fit the signature."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return
    try:
        signature.bind({}, **kwargs)
    except TypeError as e:
        raise RewardError(f"Reward function {label}{signature} cannot be called with one data argument and "
                          f"worker.reward.reward_fn_kwargs={kwargs}: {e}.") from None


def load_reward_function(reward_fn_path: str, config_dir: Optional[str] = None,
                         kwargs: Optional[Dict[str, Any]] = None, form: str = "function") -> "RewardFunction":
    """Load `file.py` or `file.py:function`; `form` is a `FUNCTION_FORMS` key (see the module docstring)."""
    if form not in FUNCTION_FORMS:
        raise RewardError(f"worker.reward.reward_type = {form!r} is not a reward-function form "
                          f"({', '.join(FUNCTION_FORMS)}).")
    path, name = parse_reward_fn_path(reward_fn_path)
    file = resolve_reward_file(path, config_dir)
    module = load_module(file)
    names = (name,) if name else DEFAULT_FUNCTION_NAMES
    found = next((n for n in names if hasattr(module, n)), None)
    if found is None:
        defined = _functions_defined_in(module)
        wanted = " or ".join(f"`{n}`" for n in names)
        raise RewardError(f"Reward file {file} has no function {wanted}; functions it defines: "
                          f"{', '.join(defined) if defined else '(none)'}. "
                          f"Use worker.reward.reward_fn_path=file.py:function_name to pick one.")
    fn = getattr(module, found)
    label = f"{file}:{found}"
    if not callable(fn):
        raise RewardError(f"Reward function {label} is a {type(fn).__name__}, not a function.")
    kwargs = dict(kwargs or {})
    _check_kwargs(fn, kwargs, label)
    batched = FUNCTION_FORMS[form]
    if batched is None:
        batched = bool(getattr(fn, "batched", False)) or found == "batch_reward_function"
    return RewardFunction(fn=fn, file=file, name=found, batched=batched, kwargs=kwargs)


# ----------------------------------------------------------------------------- calling it


def _excerpt(text: Any, width: int = 60) -> str:
    """Short one-line repr of `text`, keeping its start and its end (answers usually come last)."""
    text = " ".join(str(text).split())
    if len(text) > width:
        half = width // 2
        text = f"{text[:half]} ... {text[-half:]}"
    return repr(text)


def _real(value: Any) -> Optional[float]:
    """`value` as a float when it is a real number (bool, int, float, numpy / 0-d torch scalar), else None."""
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # numpy / torch 0-d
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None


def _is_pair(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], dict)


@dataclass
class SampleNames:
    """Names sample i of a chunk in messages: its row in the batch, its uid when known, prompt and response heads."""

    samples: Sequence[Dict[str, Any]]
    offset: int
    uids: Optional[Sequence[str]] = None

    def __call__(self, i: int) -> str:
        s = self.samples[i]
        uid = f"uid {self.uids[i]}, " if self.uids is not None else ""
        prompt, response = _excerpt(s.get("prompt", "")), _excerpt(s.get("response", ""))
        return f"sample {self.offset + i} ({uid}prompt: {prompt}, response: {response})"


@dataclass
class RewardFunction:
    """A loaded reward function plus where it came from; call it on a list of data_dicts."""

    fn: Callable
    file: str
    name: str
    batched: bool = False
    kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.file}:{self.name}"

    def __call__(self, samples: Sequence[Dict[str, Any]], offset: int = 0) -> Tuple[Scores, Metrics]:
        """Score `samples`; `offset` is the row index of samples[0] in the whole batch (for messages).

        Returns (scores, metrics) with one float per sample and one list of floats per metric name;
        any failure raises a `RewardError`.
        """
        scores, metrics, _ = self.score(samples, offset)
        return scores, metrics

    def score(self, samples: Sequence[Dict[str, Any]], offset: int = 0, on_error: str = "raise",
              uids: Optional[Sequence[str]] = None) -> Tuple[Scores, Metrics, Errors]:
        """(scores, metrics, errors). `uids` (one per sample) name samples in messages.

        `on_error="raise"`: the first failure raises a `RewardError`. `on_error="zero"`: a sample whose
        reward fails (the function raised, or returned something unusable for it) scores 0, its metrics
        0, and `errors` holds (its row in the batch, the message); a batch-form call that fails as a whole
        zeroes all its samples.
        """
        if on_error not in ON_ERROR_CHOICES:
            raise RewardError(f"worker.reward.on_error = {on_error!r} must be one of {ON_ERROR_CHOICES}.")
        if not samples:
            return [], {}, []
        where = SampleNames(samples, offset, uids)
        if on_error == "raise":
            rows = self._call_batched(samples, where) if self.batched else self._call_per_sample(samples, where)
            scores, metrics = self._collect(rows, where)
            return scores, metrics, []
        return self._score_tolerantly(samples, where)

    def _score_tolerantly(self, samples: Sequence[Dict[str, Any]],
                          where: SampleNames) -> Tuple[Scores, Metrics, Errors]:
        rows: List[Optional[Tuple[float, Dict]]] = []
        errors: Errors = []
        if self.batched:
            try:
                results = self._batched_results(samples, where)
            except RewardError as e:
                return [0.0] * len(samples), {}, [(where.offset + i, str(e)) for i in range(len(samples))]
            checks = [lambda i=i, r=r: self._check_pair(r, where, i) for i, r in enumerate(results)]
        else:
            checks = [lambda i=i: self._check_pair(self._call_one(samples[i], where, i), where, i)
                      for i in range(len(samples))]
        names: Optional[List[str]] = None
        for i, check in enumerate(checks):
            try:
                row = check()
                if names is None:
                    names = list(row[1])
                elif set(row[1]) != set(names):
                    raise self._names_differ(names, row[1], where, i)
                rows.append(row)
            except RewardError as e:
                rows.append(None)
                errors.append((where.offset + i, str(e)))
        names = names or []
        scores = [row[0] if row else 0.0 for row in rows]
        return scores, {k: [row[1][k] if row else 0.0 for row in rows] for k in names}, errors

    # -- calling

    def _call_one(self, sample: Dict[str, Any], where: SampleNames, i: int) -> Any:
        try:
            return self.fn(sample, **self.kwargs)
        except Exception as e:
            raise RewardError(f"Reward function {self.label} raised {type(e).__name__}: {e}"
                              f"{_where_in_file(e.__traceback__, self.file)} on {where(i)}.") from e

    def _call_per_sample(self, samples: Sequence[Dict[str, Any]], where: SampleNames) -> List[Tuple[float, Dict]]:
        return [self._check_pair(self._call_one(sample, where, i), where, i) for i, sample in enumerate(samples)]

    def _call_batched(self, samples: Sequence[Dict[str, Any]], where: SampleNames) -> List[Tuple[float, Dict]]:
        return [self._check_pair(r, where, i) for i, r in enumerate(self._batched_results(samples, where))]

    def _batched_results(self, samples: Sequence[Dict[str, Any]], where: SampleNames) -> List[Any]:
        """The batch-form call's per-sample results, unchecked; a RewardError when the call fails as a whole."""
        offset = where.offset
        try:
            result = self.fn(list(samples), **self.kwargs)
        except Exception as e:
            last = offset + len(samples) - 1
            raise RewardError(f"Reward function {self.label} (batch form) raised {type(e).__name__}: {e}"
                              f"{_where_in_file(e.__traceback__, self.file)} on samples {offset}..{last} "
                              f"(first: {where(0)}).") from e
        n = len(samples)
        expected = ("a list of (reward, metrics) pairs or of {'overall': ...} dicts, (list of rewards, dict of "
                    "metric lists) or a list of "
                    f"rewards, with one entry per sample ({n})")
        if _is_pair(result) and _real(result[0]) is None and not isinstance(result[0], dict) \
                and hasattr(result[0], "__len__"):
            # Columnar: (rewards, {name: values}). A row-form result never has a dict second element.
            return self._columns_to_rows(result, n, expected)
        if not isinstance(result, (list, tuple)) and not hasattr(result, "tolist"):
            raise RewardError(f"Reward function {self.label} (batch form) returned {type(result).__name__}; "
                              f"expected {expected}.")
        result = result.tolist() if hasattr(result, "tolist") else list(result)
        if len(result) != n:
            raise RewardError(f"Reward function {self.label} (batch form) returned {len(result)} results for "
                              f"{n} samples (samples {offset}..{offset + n - 1}); expected {expected}.")
        return result

    def _columns_to_rows(self, result: Tuple, n: int, expected: str) -> List[Tuple[Any, Dict]]:
        scores, metrics = result
        scores = scores.tolist() if hasattr(scores, "tolist") else list(scores)
        bad = {k: len(v) for k, v in metrics.items() if not hasattr(v, "__len__") or len(v) != n}
        if len(scores) != n or bad:
            raise RewardError(f"Reward function {self.label} (batch form) returned {len(scores)} rewards and "
                              f"metric lists of lengths {bad or 'ok'} for {n} samples; expected {expected}.")
        return [(scores[i], {k: v[i] for k, v in metrics.items()}) for i in range(n)]

    # -- checking

    def _check_pair(self, result: Any, where: SampleNames, i: int) -> Tuple[float, Dict]:
        """One sample's result -> (finite float, {name: finite float}), or a RewardError naming the sample."""
        if _real(result) is not None:
            result = (result, {})
        elif isinstance(result, dict):
            if "overall" not in result:
                raise RewardError(f"Reward function {self.label} returned a dict without an 'overall' key (keys: "
                                  f"{sorted(map(str, result))}); a dict result gives the reward as 'overall' and "
                                  f"metrics under its other keys. On {where(i)}.")
            result = (result["overall"], {k: v for k, v in result.items() if k != "overall"})
        if not _is_pair(result):
            shown = repr(result)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise RewardError(f"Reward function {self.label} must return (reward: float, metrics: dict); got "
                              f"{type(result).__name__} {shown} for {where(i)} (a dict with an 'overall' key "
                              f"works too).")
        score = _real(result[0])
        if score is None:
            raise RewardError(f"Reward function {self.label} returned a reward of type {type(result[0]).__name__} "
                              f"({result[0]!r}); it must be a real number. On {where(i)}.")
        if not math.isfinite(score):
            raise RewardError(f"Reward function {self.label} returned a non-finite reward {score} "
                              f"for {where(i)}.")
        metrics = {}
        for key, value in result[1].items():
            number = _real(value)
            if not isinstance(key, str) or key in RESERVED_METRIC_NAMES:
                raise RewardError(f"Reward function {self.label} returned metric name {key!r}: names must be strings "
                                  f"other than {RESERVED_METRIC_NAMES} (the reward itself is logged as "
                                  f"reward/overall). On {where(i)}.")
            if number is None or not math.isfinite(number):
                raise RewardError(f"Reward function {self.label} returned metric {key!r} = {value!r}; metric values "
                                  f"must be finite real numbers. On {where(i)}.")
            metrics[key] = number
        return score, metrics

    def _names_differ(self, names: List[str], got: Dict, where: SampleNames, i: int) -> RewardError:
        return RewardError(f"Reward function {self.label} must return the same metric names for every sample: "
                           f"sample {where.offset} gave {sorted(names)}, {where(i)} gave {sorted(got)}.")

    def _collect(self, rows: List[Tuple[float, Dict]], where: SampleNames) -> Tuple[Scores, Metrics]:
        names = list(rows[0][1])
        for i, (_, m) in enumerate(rows):
            if set(m) != set(names):
                raise self._names_differ(names, m, where, i)
        return [s for s, _ in rows], {k: [m[k] for _, m in rows] for k in names}

