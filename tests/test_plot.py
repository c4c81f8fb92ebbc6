"""`python -m mtrl.tools.plot RUN_DIR`: training curves from metrics.jsonl as a PNG (synthetic metrics: fast;
a real quickstart run: slow)."""

import json
import os
import struct
import subprocess
import sys

import pytest

from mtrl.tools.plot import PANELS, main, panel_keys, read_metrics


def png_size(path):
    """(width, height) of a PNG, checking the signature and the IHDR chunk."""
    data = open(path, "rb").read(32)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_read_metrics_last_value_per_step_and_nulls_skipped(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", [
        {"step": 0, "val/reward_score": 0.1},
        {"step": 1, "reward/overall": 0.2, "actor/pg_loss": None},
        {"step": 2, "reward/overall": 0.3},
        {"step": 2, "reward/overall": 0.35},  # a resumed run logged step 2 again
    ])
    (tmp_path / "metrics.jsonl").open("a").write("not json\n")
    series = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert series["reward/overall"] == ([1, 2], [0.2, 0.35])
    assert series["val/reward_score"] == ([0], [0.1])
    assert "actor/pg_loss" not in series
    assert panel_keys(series, ("reward/overall",), ("reward/", "val/")) == ["reward/overall", "val/reward_score"]


def test_plot_writes_a_png_with_every_panel(tmp_path, capsys):
    rows = []
    for step in range(1, 21):
        rows.append({"step": step, "reward/overall": step / 20, "reward/accuracy": step / 40,
                     "actor/pg_loss": 0.1 / step, "critic/vf_loss": 1.0 / step,
                     "actor/entropy_token_fraction": 0.2, "actor/perception_token_fraction": 0.2,
                     "actor/scaling_factor_mean": 1.0, "actor/scaling_factor_max": 1.5, "actor/entropy": 2.0,
                     "actor/grad_norm": 0.5, "actor/approx_kl": 0.01, "response_length/mean": 30 + step,
                     "perf/tokens_per_second": 1000 + step, "perf/step_seconds": 2.0, "actor/lr": 1e-6})
        if step % 5 == 0:
            rows.append({"step": step, "val/reward_score": step / 25})
    write_metrics(tmp_path / "metrics.jsonl", rows)
    assert main([str(tmp_path)]) == 0
    out = tmp_path / "metrics.png"
    assert capsys.readouterr().out.strip() == str(out)
    width, height = png_size(out)
    assert width >= 1200 and height >= 900 and out.stat().st_size > 50_000
    # --out, and a metrics.jsonl path instead of the folder.
    assert main([str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "sub" / "x.png")]) == 0
    assert png_size(tmp_path / "sub" / "x.png") == (width, height)
    assert len(PANELS) == 12


def test_staged_run_gets_one_png_per_stage(tmp_path, capsys):
    for stage, key in (("sft_warmup", "expert/sft_loss"), ("rl", "actor/pg_loss")):
        (tmp_path / stage).mkdir()
        write_metrics(tmp_path / stage / "metrics.jsonl", [{"step": s, key: 1.0 / s} for s in (1, 2, 3)])
    assert main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    assert sorted(os.listdir(tmp_path / "plots")) == ["rl.png", "sft_warmup.png"]
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "rl" / "metrics.png").is_file() and (tmp_path / "sft_warmup" / "metrics.png").is_file()
    series = read_metrics(str(tmp_path / "sft_warmup" / "metrics.jsonl"))
    assert panel_keys(series, ("actor/pg_loss",), (), suffix="loss") == ["expert/sft_loss"]


def test_plot_errors(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "holds no metrics" in err


@pytest.mark.slow
def test_plot_of_a_real_quickstart_run(tmp_path_factory):
    from test_checkpoint import cli_env, run_cli

    workdir = tmp_path_factory.mktemp("plot_e2e")
    val = "outputs/quickstart/shapes/val.jsonl"
    run_cli(workdir, "quickstart", f"dataset.val_files={val}", "training.val_before_train=true",
            "training.val_freq=2", steps=4)
    run = workdir / "runs" / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "mtrl.tools.plot", str(run), "--out", str(run / "curves.png")],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    width, height = png_size(run / "curves.png")
    assert (width, height) == (1800, 1440) and (run / "curves.png").stat().st_size > 80_000
    series = read_metrics(str(run / "metrics.jsonl"))
    assert series["val/reward_score"][0] == [0, 2, 4] and series["reward/overall"][0] == [1, 2, 3, 4]
    assert "actor/perception_token_fraction" in series and "perf/tokens_per_second" in series
