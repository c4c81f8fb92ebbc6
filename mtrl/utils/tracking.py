"""Experiment tracking: one `Tracker` fans metrics out to any subset of logging backends.

    tracker = Tracker(["console", "file", "wandb"], project_name, experiment_name, run_dir, config_dict,
                      total_steps=1000)
    tracker.log({"actor/pg_loss": 0.1, "reward/overall": 0.5}, step=1)
    tracker.log_generations([{"prompt": ..., "response": ..., "ground_truth": ..., "score": ...}], step=1)
    tracker.finish()          # or use the tracker as a context manager

Backends (`training.logger`):
  console      a compact table per step, grouped by metric prefix (actor/, reward/, perf/, timing/, val/
               ...), under a progress line with step/total, elapsed time and ETA.
  file         `{run_dir}/metrics.jsonl`: one JSON object per `log` call with a "step" key, flushed each
               time; generations go to `{run_dir}/generations.jsonl` (one object per row with "step").
               Non-finite values are written as null so every JSON reader accepts the file.
  wandb        `wandb.init(project, name=experiment_name, dir=run_dir, config)`; the mode (online /
               offline / disabled) comes from the usual WANDB_MODE environment variable. Generations
               are logged as a `wandb.Table` under `val/generations`.
  mlflow       tracking URI from MLFLOW_TRACKING_URI, else `sqlite:///{run_dir}/mlflow.db` with artifacts
               in `{run_dir}/mlflow_artifacts`. The config is logged as flattened params. Metric names
               are sanitised to MLflow's allowed characters; `MlflowBackend.name_map` keeps the mapping,
               also saved as the artifact `metric_names.json` when any name changed. Generations are
               JSON artifacts `generations/step_{step:08d}.json`.
  tensorboard  `{run_dir}/tensorboard` event files (scalars; generations as a markdown text table).

Resuming (`resume_step=N`, given by the trainer when it continues from the checkpoint of step N): the
file backend drops the rows the crashed run wrote after step N (metrics.jsonl and generations.jsonl are
rewritten atomically), so no step appears twice; wandb and mlflow continue the run whose id is saved
in `{run_dir}/tracker_runs.json` (written when a run is created) instead of starting a new one. (Points
after step N that a crashed run had already sent to wandb / mlflow stay there.)

wandb, mlflow and tensorboard are imported only when selected. The trainer is expected to call `log`
once per step with all of that step's metrics (several calls for one step are allowed; the file
backend then writes several lines with the same step).
"""

import json
import math
import numbers
import os
import posixpath
import re
import sys
import time
from typing import IO, Any, Dict, List, Optional, Sequence

# Nothing heavy at import: the config module reads LOGGER_NAMES from here, and a config error should come back
# in a fraction of a second (mtrl.utils.checkpoint, which imports torch, is imported where it is used).

LOGGER_NAMES = ("console", "file", "wandb", "mlflow", "tensorboard")
RUNS_FILE = "tracker_runs.json"  # {backend: run id} of the run directory's wandb / mlflow runs

# Console groups appear in this order; other prefixes follow alphabetically, unprefixed keys last.
GROUP_ORDER = ("actor", "critic", "reward", "val", "perf", "timing")


def to_float(key: str, value: Any) -> float:
    """A metric value as a Python float (accepts bool/int/float, numpy scalars, 0-d / 1-element tensors)."""
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (ValueError, RuntimeError):  # numpy / torch with more than one element
            pass
        else:
            if isinstance(value, numbers.Real):
                return float(value)
    raise TypeError(f"Metric {key!r} has value {value!r} of type {type(value).__name__}; metrics must be numbers.")


def _jsonable(value: Any) -> Any:
    """Rows for generations logs: keep JSON types, numbers as floats/ints, everything else as str."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:
        return _jsonable(value.item())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _columns(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Union of the rows' keys, in first-seen order."""
    columns: List[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def flatten_config(config: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for backends whose params are flat)."""
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config} if prefix else {}
    out: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _natural_key(text: str) -> list:
    """Sort key putting "metric_2" before "metric_10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def format_value(value: float) -> str:
    """4 significant digits, except that large magnitudes (throughputs, token counts) keep all integer digits."""
    if math.isfinite(value) and 1e4 <= abs(value) < 1e12:
        return f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    return f"{value:.4g}"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# ----------------------------------------------------------------------------- backends


class Backend:
    """Interface of one logging destination. Values reaching `log` are already floats."""

    def log(self, metrics: Dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_generations(self, rows: List[Dict[str, Any]], step: int) -> None:
        """Default: the backend has no place for generations."""

    def finish(self, failed: bool = False) -> None:
        """Default: nothing to close."""


class ConsoleBackend(Backend):
    """Human-readable per-step block: a progress line, then one line per metric group."""

    def __init__(self, total_steps: Optional[int] = None, stream: Optional[IO[str]] = None, width: int = 120):
        self.total_steps = total_steps
        self.stream = stream
        self.width = width
        self._first: Optional[tuple] = None  # (time, step) of the first log, the ETA's reference point
        self._started = time.monotonic()

    def progress_line(self, step: int, now: Optional[float] = None) -> str:
        now = time.monotonic() if now is None else now
        if self._first is None:
            self._first = (now, step)
        t0, s0 = self._first
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        if self.total_steps:
            parts.append(f"{100.0 * step / self.total_steps:.1f}%")
        parts.append(f"elapsed {format_duration(now - self._started)}")
        # Rate from steps done since the first log, so a resumed run's ETA ignores earlier steps.
        if step > s0:
            per_step = (now - t0) / (step - s0)
            parts.append(f"{per_step:.2f} s/step")
            if self.total_steps:
                parts.append(f"eta {format_duration(per_step * max(self.total_steps - step, 0))}")
        elif self.total_steps:
            parts.append("eta --")
        return "[" + " | ".join(parts) + "]"

    @staticmethod
    def group(metrics: Dict[str, float]) -> List[tuple]:
        """[(group, [(name, value), ...]), ...] split on the first '/', ordered by GROUP_ORDER."""
        groups: Dict[str, List[tuple]] = {}
        for key in sorted(metrics, key=_natural_key):
            prefix, sep, name = key.partition("/")
            group, name = (prefix, name) if sep else ("", key)
            groups.setdefault(group, []).append((name, metrics[key]))

        def order(g: str) -> tuple:
            return (GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), g == "", g)

        return [(g, groups[g]) for g in sorted(groups, key=order)]

    def format(self, metrics: Dict[str, float], step: int, now: Optional[float] = None) -> str:
        lines = [self.progress_line(step, now)]
        groups = self.group(metrics)
        label_width = max([len(g or "other") for g, _ in groups] + [0]) + 1
        for group, items in groups:
            label = (group or "other").ljust(label_width)
            cells = [f"{name}={format_value(value)}" for name, value in items]
            line = "  " + label
            for cell in cells:  # wrap long groups onto aligned continuation lines
                if len(line) + len(cell) + 2 > self.width and line.strip() != label.strip():
                    lines.append(line.rstrip())
                    line = "  " + " " * label_width
                line += cell + "  "
            lines.append(line.rstrip())
        return "\n".join(lines)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        stream = self.stream or sys.stdout
        stream.write(self.format(metrics, step) + "\n")
        stream.flush()


def _keep_rows_up_to(path: str, step: int) -> None:
    """Rewrite the JSON-lines file `path` without its rows of steps after `step` (temporary file + rename).

    A torn last line (the crash hit mid-write) is dropped too.
    """
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row_step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(row_step, int) and row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    from mtrl.utils.checkpoint import atomic_write  # noqa: PLC0415

    atomic_write(path, "".join(kept))


class FileBackend(Backend):
    """metrics.jsonl (and generations.jsonl) in run_dir, appended to, so a resumed run continues them
    (after dropping what a crashed run wrote past `resume_step`)."""

    def __init__(self, run_dir: str, resume_step: Optional[int] = None):
        os.makedirs(run_dir, exist_ok=True)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.generations_path = os.path.join(run_dir, "generations.jsonl")
        if resume_step is not None:
            for path in (self.metrics_path, self.generations_path):
                _keep_rows_up_to(path, resume_step)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")

    def log(self, metrics: Dict[str, float], step: int) -> None:
        record = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def log_generations(self, rows: List[Dict[str, Any]], step: int) -> None:
        with open(self.generations_path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **_jsonable(row)}, ensure_ascii=False) + "\n")

    def finish(self, failed: bool = False) -> None:
        if not self._metrics.closed:
            self._metrics.close()


class WandbBackend(Backend):
    def __init__(self, project_name: str, experiment_name: str, run_dir: str, config_dict: Dict[str, Any],
                 resume_id: Optional[str] = None):
        import wandb

        self._wandb = wandb
        os.makedirs(run_dir, exist_ok=True)
        resume = {"id": resume_id, "resume": "allow"} if resume_id else {}
        self.run = wandb.init(project=project_name, name=experiment_name, dir=run_dir, config=config_dict,
                              reinit="create_new", **resume)
        self.run_id = self.run.id

    def log(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_generations(self, rows: List[Dict[str, Any]], step: int) -> None:
        columns = _columns(rows)
        data = [[self._cell(row.get(c)) for c in columns] for row in rows]
        self.run.log({"val/generations": self._wandb.Table(columns=columns, data=data)}, step=step)

    @staticmethod
    def _cell(value: Any) -> Any:
        value = _jsonable(value)
        # A Table column must keep one type; nested values are shown as their JSON text.
        return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_MLFLOW_BAD_CHARS = re.compile(r"[^/\w.\- ]")  # MLflow also allows ':' except on Windows; keep names portable


def sanitize_mlflow_name(name: str, max_length: int = 250) -> str:
    """`name` using only MLflow's allowed characters and forming a normalised path (no '//', '.', '..')."""
    s = _MLFLOW_BAD_CHARS.sub("_", name)
    segments = [seg if seg not in (".", "..") else seg.replace(".", "_") for seg in s.split("/") if seg]
    s = "/".join(segments)[:max_length].strip("/") or "_"
    return s if posixpath.normpath(s) == s else s.replace("/", "_")


class MlflowBackend(Backend):
    def __init__(self, project_name: str, experiment_name: str, run_dir: str, config_dict: Dict[str, Any],
                 resume_id: Optional[str] = None):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._Metric = Metric
        os.makedirs(run_dir, exist_ok=True)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifact_location = None
        if not uri:
            uri = f"sqlite:///{os.path.abspath(os.path.join(run_dir, 'mlflow.db'))}"
            # Without this MLflow would put artifacts in ./mlruns of whatever the working directory is.
            artifact_location = "file://" + os.path.abspath(os.path.join(run_dir, "mlflow_artifacts"))
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(project_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(project_name, artifact_location=artifact_location))
        self.name_map: Dict[str, str] = {}
        self._taken: Dict[str, str] = {}  # sanitised -> original, to keep distinct names distinct
        if resume_id and self._run_exists(resume_id):
            self.run_id = resume_id
            # Params are immutable in MLflow (a resumed run may have changed e.g. max_steps): kept as first logged.
            self.client.update_run(resume_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(experiment_id, run_name=experiment_name).info.run_id
        params = [Param(sanitize_mlflow_name(k), str(v)[:6000]) for k, v in flatten_config(config_dict).items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def metric_name(self, name: str) -> str:
        """The MLflow name for `name` (memoised; a clash between two originals gets a numeric suffix)."""
        if name not in self.name_map:
            clean = base = sanitize_mlflow_name(name)
            n = 2
            while clean in self._taken and self._taken[clean] != name:
                clean = f"{base}_{n}"
                n += 1
            self.name_map[name] = clean
            self._taken[clean] = name
        return self.name_map[name]

    def log(self, metrics: Dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        entries = [self._Metric(self.metric_name(k), v, timestamp, step) for k, v in metrics.items()]
        for i in range(0, len(entries), 1000):  # MLflow accepts at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=entries[i:i + 1000])

    def log_generations(self, rows: List[Dict[str, Any]], step: int) -> None:
        text = json.dumps({"step": step, "columns": _columns(rows), "rows": _jsonable(rows)},
                          ensure_ascii=False, indent=1)
        self.client.log_text(self.run_id, text, f"generations/step_{step:08d}.json")

    def finish(self, failed: bool = False) -> None:
        renamed = {k: v for k, v in self.name_map.items() if k != v}
        if renamed:
            self.client.log_text(self.run_id, json.dumps(renamed, indent=1), "metric_names.json")
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TensorboardBackend(Backend):
    def __init__(self, run_dir: str, config_dict: Dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.path.join(run_dir, "tensorboard")
        self.writer = SummaryWriter(log_dir=self.log_dir)
        if config_dict:
            self.writer.add_text("config", "```\n" + json.dumps(config_dict, indent=1, default=str) + "\n```", 0)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_generations(self, rows: List[Dict[str, Any]], step: int) -> None:
        columns = _columns(rows)

        def cell(value: Any) -> str:
            text = value if isinstance(value, str) else json.dumps(_jsonable(value), ensure_ascii=False)
            return text.replace("|", "\\|").replace("\n", "<br>")

        table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        table += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
        self.writer.add_text("val/generations", "\n".join(table), step)
        self.writer.flush()

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------- the tracker


class Tracker:
    """Sends each step's metrics (and validation generations) to every selected backend."""

    def __init__(self, loggers: Sequence[str], project_name: str, experiment_name: str, run_dir: str,
                 config_dict: Optional[Dict[str, Any]] = None, total_steps: Optional[int] = None,
                 resume_step: Optional[int] = None):
        """`resume_step`: the step of the checkpoint this run continues from (None: a new run)."""
        unknown = [name for name in loggers if name not in LOGGER_NAMES]
        if unknown:
            raise ValueError(f"Unknown logger(s) {unknown}; allowed: {', '.join(LOGGER_NAMES)}.")
        self.run_dir = run_dir
        self.config_dict = config_dict or {}
        self.resume_step = resume_step
        runs = self.saved_run_ids() if resume_step is not None else {}
        self.backends: Dict[str, Backend] = {}
        for name in dict.fromkeys(loggers):  # de-duplicated, order kept
            self.backends[name] = self._make(name, project_name, experiment_name, total_steps, runs.get(name))
        self._save_run_ids()
        self._finished = False

    def _make(self, name: str, project_name: str, experiment_name: str, total_steps: Optional[int],
              resume_id: Optional[str]) -> Backend:
        if name == "console":
            return ConsoleBackend(total_steps)
        if name == "file":
            return FileBackend(self.run_dir, self.resume_step)
        if name == "wandb":
            return WandbBackend(project_name, experiment_name, self.run_dir, self.config_dict, resume_id)
        if name == "mlflow":
            return MlflowBackend(project_name, experiment_name, self.run_dir, self.config_dict, resume_id)
        return TensorboardBackend(self.run_dir, self.config_dict)

    def saved_run_ids(self) -> Dict[str, str]:
        """{backend: run id} from `{run_dir}/tracker_runs.json` ({} when there is none or it is unreadable)."""
        try:
            with open(os.path.join(self.run_dir, RUNS_FILE), encoding="utf-8") as f:
                runs = json.load(f)
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in runs.items() if isinstance(v, str)} if isinstance(runs, dict) else {}

    def _save_run_ids(self) -> None:
        runs = {name: b.run_id for name, b in self.backends.items() if getattr(b, "run_id", None)}
        if not runs:
            return
        from mtrl.utils.checkpoint import atomic_write  # noqa: PLC0415

        atomic_write(os.path.join(self.run_dir, RUNS_FILE), json.dumps({**self.saved_run_ids(), **runs}, indent=1))

    def log(self, metrics: Dict[str, float], step: int) -> None:
        """Log one step's metrics (values: numbers, numpy scalars or one-element tensors)."""
        values = {key: to_float(key, value) for key, value in metrics.items()}
        for backend in self.backends.values():
            backend.log(values, int(step))

    def log_generations(self, rows: List[Dict[str, Any]], step: int) -> None:
        """Log validation generations (e.g. prompt / response / ground_truth / score per row)."""
        if not rows:
            return
        for backend in self.backends.values():
            backend.log_generations(list(rows), int(step))

    def finish(self, failed: bool = False) -> None:
        """Close every backend (marking the run failed where the backend has that notion); idempotent."""
        if self._finished:
            return
        self._finished = True
        for backend in self.backends.values():
            backend.finish(failed)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.finish(failed=exc_type is not None)
