"""Tracker: backend selection, console/file output, and the same metrics read back from every backend."""

import glob
import io
import json
import math
import os
import struct

import numpy as np
import pytest
import torch

from mtrl.utils.tracking import (
    ConsoleBackend,
    MlflowBackend,
    Tracker,
    flatten_config,
    sanitize_mlflow_name,
)

STEPS = {
    1: {"actor/pg_loss": 0.5, "reward/overall": 0.25, "val/acc@1": 0.1, "timing/gen": 2.0},
    2: {"actor/pg_loss": -0.125, "reward/overall": 0.75, "val/acc@1": 0.2, "timing/gen": 1.5},
    3: {"actor/pg_loss": 0.0625, "reward/overall": 1.0, "val/acc@1": 0.3, "timing/gen": 1.0},
}
GENERATIONS = [{"prompt": "2+2?", "response": "<answer>4</answer>", "ground_truth": "4", "score": 1.0},
               {"prompt": "3|3", "response": "line\nbreak", "ground_truth": "x", "score": 0.0}]


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """wandb offline and mlflow on a local sqlite file; nothing written outside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- selection


def test_unknown_logger_names_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown logger\(s\) \['wandbb'\]; allowed: console, file, wandb, mlflow, "
                                         r"tensorboard"):
        Tracker(["file", "wandbb"], "p", "e", str(tmp_path))


# ----------------------------------------------------------------------------- file and console


def test_file_backend_writes_one_flushed_json_line_per_step(tmp_path):
    run_dir = str(tmp_path / "run")
    tracker = Tracker(["file", "file"], "p", "e", run_dir)
    tracker.log({"actor/loss": np.float32(0.5), "reward/overall": torch.tensor(0.25), "n": 3}, step=1)
    # Readable before finish(): each step is flushed.
    assert read_jsonl(os.path.join(run_dir, "metrics.jsonl")) == [
        {"step": 1, "actor/loss": 0.5, "reward/overall": 0.25, "n": 3.0}]
    tracker.log({"actor/loss": float("nan"), "x": float("inf")}, step=2)
    tracker.log_generations(GENERATIONS, step=2)
    tracker.finish()
    tracker.finish()  # idempotent
    lines = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert lines[1] == {"step": 2, "actor/loss": None, "x": None}  # strict JSON: non-finite -> null
    assert read_jsonl(os.path.join(run_dir, "generations.jsonl")) == [{"step": 2, **row} for row in GENERATIONS]
    with pytest.raises(TypeError, match=r"Metric 'bad' has value 'x'"):
        Tracker(["file"], "p", "e", run_dir).log({"bad": "x"}, step=1)


def test_console_groups_by_prefix_with_progress_and_eta():
    backend = ConsoleBackend(total_steps=10, width=60)
    backend._started = 100.0
    first = backend.format({"reward/overall": 0.5, "actor/pg_loss": 0.123456, "lr": 1e-6, "zzz/a": 1,
                            "timing/gen": 2.0, "val/acc": 0.3, "perf/tps": 1000}, step=1, now=100.0)
    lines = first.splitlines()
    assert lines[0] == "[step 1/10 | 10.0% | elapsed 0:00:00 | eta --]"
    assert [line.split()[0] for line in lines[1:]] == ["actor", "reward", "val", "perf", "timing", "zzz", "other"]
    assert "pg_loss=0.1235" in lines[1] and "lr=1e-06" in lines[-1] and "tps=1000" in lines[4]
    assert backend.format({"perf/tokens": 123456.75, "perf/n": 2e6}, step=2, now=101.0).endswith(
        "perf n=2000000  tokens=123456.8")
    # 4 more steps in 20 s -> 5 s/step, 5 steps left -> 25 s.
    assert backend.progress_line(5, now=120.0) == "[step 5/10 | 50.0% | elapsed 0:00:20 | 5.00 s/step | eta 0:00:25]"
    # Long groups wrap onto aligned continuation lines within the width.
    wrapped = backend.format({f"actor/metric_{i}": i for i in range(12)}, step=6, now=125.0).splitlines()[1:]
    assert len(wrapped) > 1 and all(len(line) <= 60 for line in wrapped)
    assert wrapped[0].startswith("  actor metric_0=0  metric_1=1  metric_2=2")  # natural order
    assert wrapped[1].startswith(" " * 8 + "metric_") and wrapped[-1].endswith("metric_11=11")


def test_console_tracker_prints_each_step(capsys, tmp_path):
    tracker = Tracker(["console"], "p", "e", str(tmp_path), total_steps=3)
    tracker.log(STEPS[1], step=1)
    tracker.finish()
    out = capsys.readouterr().out
    assert out.startswith("[step 1/3 | 33.3%") and "\n  reward overall=0.25\n" in out


# ----------------------------------------------------------------------------- mlflow names


def test_mlflow_names_are_sanitised_and_kept_distinct():
    assert sanitize_mlflow_name("val/acc@1") == "val/acc_1"
    assert sanitize_mlflow_name("a//b/") == "a/b"
    assert sanitize_mlflow_name("x/../y") == "x/__/y"
    assert sanitize_mlflow_name("ok/name-1.0 x") == "ok/name-1.0 x"
    backend = MlflowBackend.__new__(MlflowBackend)  # name mapping only; no server needed
    backend.name_map, backend._taken = {}, {}
    assert [backend.metric_name(n) for n in ("a@b", "a#b", "a_b", "a@b")] == ["a_b", "a_b_2", "a_b_3", "a_b"]


def test_flatten_config():
    assert flatten_config({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


# ----------------------------------------------------------------------------- all backends, read back


def wandb_history(run_dir):
    """History rows {step: {key: value}} from the offline run's .wandb file (a LevelDB-style record log).

    wandb has no public reader for offline runs, so parse it: a 7-byte file header, then 32 KiB blocks of
    records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B"
    pos, pending, history = 7, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(record.history.step.num, {}).update(items)
    return history


def test_all_backends_record_the_same_metrics(offline_env):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = str(offline_env / "run")
    config = {"worker": {"rollout": {"n": 4}}, "training": {"logger": ["file"]}}
    tracker = Tracker(["console", "file", "wandb", "mlflow", "tensorboard"], "proj", "exp", run_dir, config,
                      total_steps=3)
    for step, metrics in STEPS.items():
        tracker.log(metrics, step)
    tracker.log_generations(GENERATIONS, step=3)
    mlflow_backend = tracker.backends["mlflow"]
    tracker.finish()
    keys = list(STEPS[1])

    # file
    assert read_jsonl(os.path.join(run_dir, "metrics.jsonl")) == [{"step": s, **m} for s, m in STEPS.items()]
    assert len(read_jsonl(os.path.join(run_dir, "generations.jsonl"))) == 2

    # wandb (offline run file)
    history = wandb_history(run_dir)
    for step, metrics in STEPS.items():
        assert {k: history[step][k] for k in keys} == metrics
    assert history[3]["val/generations/_type"] == "table-file" and history[3]["val/generations/nrows"] == 2

    # mlflow (sqlite in run_dir; names sanitised, mapping kept)
    client = MlflowClient(tracking_uri=mlflow_backend.tracking_uri)
    assert mlflow_backend.tracking_uri == f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db"
    run = client.get_run(mlflow_backend.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "exp"
    assert run.data.params == {"worker.rollout.n": "4", "training.logger": "['file']"}
    assert mlflow_backend.name_map["val/acc@1"] == "val/acc_1"
    for key in keys:
        history = client.get_metric_history(run.info.run_id, mlflow_backend.name_map[key])
        assert {m.step: m.value for m in history} == {s: m[key] for s, m in STEPS.items()}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"generations", "metric_names.json"}
    assert not os.path.exists(offline_env / "mlruns")  # artifacts stay in the run dir
    saved = json.load(open(client.download_artifacts(run.info.run_id, "generations/step_00000003.json",
                                                     str(offline_env / "dl"))))
    assert saved["rows"] == GENERATIONS

    # tensorboard
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    for key in keys:
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got.keys() == STEPS.keys()
        assert all(math.isclose(got[s], STEPS[s][key], rel_tol=1e-6) for s in STEPS)


def test_tracker_context_manager_marks_failed_runs(offline_env):
    from mlflow.tracking import MlflowClient

    run_dir = str(offline_env / "run")
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(["mlflow"], "proj", "exp", run_dir) as tracker:
            tracker.log({"a": 1.0}, step=1)
            raise RuntimeError("boom")
    backend = tracker.backends["mlflow"]
    assert MlflowClient(tracking_uri=backend.tracking_uri).get_run(backend.run_id).info.status == "FAILED"


def test_console_stream_can_be_redirected():
    stream = io.StringIO()
    ConsoleBackend(stream=stream).log({"a/b": 1.0}, step=7)
    assert stream.getvalue().startswith("[step 7 | elapsed")


# ----------------------------------------------------------------------------- resuming after a crash


def crashed_run(run_dir, loggers, steps=range(1, 6)):
    """A run that logged `steps` (and generations at each) and died without finishing its trackers."""
    tracker = Tracker(loggers, "proj", "exp", run_dir)
    for step in steps:
        tracker.log({"a": float(step)}, step=step)
        tracker.log_generations([{"prompt": "p", "score": float(step)}], step=step)
    return tracker


def test_file_tracker_resume_drops_the_crashed_runs_rows_after_the_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    crashed_run(run_dir, ["file"]).backends["file"]._metrics.write('{"step": 6, "a"')  # torn by the crash
    with Tracker(["file"], "proj", "exp", run_dir, resume_step=3) as tracker:  # resumed from global_step_3
        for step in (4, 5, 6):
            tracker.log({"a": 10.0 * step}, step=step)
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert rows == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}, {"step": 3, "a": 3.0},
                    {"step": 4, "a": 40.0}, {"step": 5, "a": 50.0}, {"step": 6, "a": 60.0}]
    assert [r["step"] for r in read_jsonl(os.path.join(run_dir, "generations.jsonl"))] == [1, 2, 3]
    # Not resuming (a new run in the same folder, as before): rows are appended, nothing dropped.
    with Tracker(["file"], "proj", "exp", run_dir) as tracker:
        tracker.log({"a": 0.0}, step=1)
    assert len(read_jsonl(os.path.join(run_dir, "metrics.jsonl"))) == 7


def test_wandb_and_mlflow_resume_the_same_run(offline_env):
    from mlflow.tracking import MlflowClient

    run_dir = str(offline_env / "run")
    crashed = crashed_run(run_dir, ["wandb", "mlflow"], steps=(1, 2))
    first = {name: backend.run_id for name, backend in crashed.backends.items()}
    crashed.backends["wandb"].run.finish(exit_code=1)  # what wandb's own atexit hook does when the process dies
    assert json.load(open(os.path.join(run_dir, "tracker_runs.json"))) == first
    with Tracker(["wandb", "mlflow"], "proj", "exp", run_dir, {"x": 2}, resume_step=2) as resumed:
        assert {name: backend.run_id for name, backend in resumed.backends.items()} == first
        resumed.log({"a": 3.0}, step=3)
    client = MlflowClient(tracking_uri=resumed.backends["mlflow"].tracking_uri)
    run = client.get_run(first["mlflow"])
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(first["mlflow"], "a")] == [(1, 1.0), (2, 2.0),
                                                                                            (3, 3.0)]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # Both wandb offline folders belong to the one run id (`wandb sync` joins them).
    folders = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(folders) == 2 and all(f.endswith(f"-{first['wandb']}") for f in folders)
    # A new run (no resume_step) in the same folder starts new runs and records their ids.
    with Tracker(["wandb", "mlflow"], "proj", "exp", run_dir) as fresh:
        new = {name: backend.run_id for name, backend in fresh.backends.items()}
    assert new["wandb"] != first["wandb"] and new["mlflow"] != first["mlflow"]
    assert json.load(open(os.path.join(run_dir, "tracker_runs.json"))) == new
