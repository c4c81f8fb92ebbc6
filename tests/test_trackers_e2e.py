"""A real training run with every logger on (console, file, wandb offline, mlflow on local sqlite,
tensorboard): each backend holds the same step metrics, and the validation generations are logged to
each (slow)."""

import glob
import json
import math
import os

import pytest

from mtrl.utils.tracking import sanitize_mlflow_name

N_GENERATIONS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from test_checkpoint import run_cli

    workdir = tmp_path_factory.mktemp("trackers_e2e")
    home = workdir / "wandb_home"
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
                                             "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "MLFLOW_DISABLE_TELEMETRY",
                                             "MLFLOW_TRACKING_URI")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CACHE_DIR=str(home),
                      WANDB_CONFIG_DIR=str(home), WANDB_DATA_DIR=str(home), WANDB_ARTIFACT_DIR=str(home),
                      MLFLOW_DISABLE_TELEMETRY="true")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        proc, rows = run_cli(workdir, "all_loggers", "dataset.val_files=outputs/quickstart/shapes/val.jsonl",
                             "training.val_before_train=true", "training.val_freq=2", "dataset.val_batch_size=16",
                             f"training.val_generations_to_log={N_GENERATIONS}", steps=2,
                             logger="[console,file,wandb,mlflow,tensorboard]")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return workdir / "runs" / "all_loggers", proc, rows


def file_metrics(rows):
    """{step: {key: value}} from metrics.jsonl (several lines for one step are merged)."""
    out = {}
    for row in rows:
        out.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step" and v is not None})
    return out


@pytest.mark.slow
def test_every_backend_holds_the_same_step_metrics(run):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_tracking import wandb_history

    run_dir, proc, rows = run
    expected = file_metrics(rows)
    assert sorted(expected) == [0, 1, 2]
    assert "val/reward_score" in expected[0] and "actor/pg_loss" in expected[1] and "val/reward_score" in expected[2]
    assert "[step 2/2" in proc.stdout and "reward_score=" in proc.stdout  # console
    keys = sorted({k for metrics in expected.values() for k in metrics})
    assert len(keys) > 40

    history = wandb_history(str(run_dir))
    for step, metrics in expected.items():
        for key, value in metrics.items():
            assert history[step][key] == pytest.approx(value, rel=1e-9, abs=1e-12), ("wandb", step, key)

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("quickstart")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_name == "all_loggers" and mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["worker.rollout.n"] == "4"
    for key in keys:
        got = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, sanitize_mlflow_name(key))}
        want = {s: m[key] for s, m in expected.items() if key in m}
        assert got.keys() == want.keys() and all(got[s] == pytest.approx(want[s], rel=1e-9) for s in want), key

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert set(keys) <= set(events.Tags()["scalars"])
    for key in keys:
        got = {e.step: e.value for e in events.Scalars(key)}
        want = {s: m[key] for s, m in expected.items() if key in m}
        assert got.keys() == want.keys(), key
        assert all(math.isclose(got[s], want[s], rel_tol=1e-6, abs_tol=1e-30) for s in want), key


@pytest.mark.slow
def test_validation_generations_reach_every_backend(run):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_tracking import wandb_history

    run_dir, _, _ = run
    lines = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in lines] == [0] * N_GENERATIONS + [2] * N_GENERATIONS
    assert {"prompt", "response", "ground_truth", "score"} <= set(lines[0])
    assert "What" in lines[0]["prompt"] and isinstance(lines[0]["score"], float)

    history = wandb_history(str(run_dir))
    for step in (0, 2):
        assert history[step]["val/generations/_type"] == "table-file"
        assert history[step]["val/generations/nrows"] == N_GENERATIONS
    assert glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / "media" / "table" / "val" / "*.json"))

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    names = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "generations")}
    assert names == {"generations/step_00000000.json", "generations/step_00000002.json"}
    saved = json.load(open(client.download_artifacts(mlflow_run.info.run_id, "generations/step_00000002.json",
                                                     str(run_dir / "dl"))))
    assert saved["rows"] == [{k: v for k, v in g.items() if k != "step"} for g in lines[N_GENERATIONS:]]

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "val/generations/text_summary" in events.Tags()["tensors"]
    steps = [e.step for e in events.Tensors("val/generations/text_summary")]
    assert steps == [0, 2]
