"""The quickstart (configs/quickstart.yaml): an SFT warmup then TPRL RL, from one command.

The fast test checks the shipped config's shape; the slow one runs the whole quickstart (about three
minutes on 2 CPU cores) and checks that it ends with the summary lines and that RL raised validation
accuracy well above the SFT warmup's (default seed: 0.33 -> 0.99; benchmarks/results/tprl_study.md
has the gains measured over seeds).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mtrl.training.stages import resolve_stages
from mtrl.training.training_config import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_quickstart_is_sft_warmup_then_tprl_on_two_workers():
    config = load_config([f"config={QUICKSTART}"])
    stages = resolve_stages(config)
    assert [(s.name, s.mode) for s in stages] == [("sft_warmup", "sft"), ("rl", "rl")]
    rl = stages[1].config
    assert rl.training.n_gpus_per_node == 2
    opt = rl.optimization
    assert opt.enable_entropy_filtering and opt.enable_perception_filtering and opt.enable_trajectory_reweighting
    # The RL stage is anchored to the warmup policy (see the config's comment for why).
    assert not opt.disable_divergence and opt.use_divergence_loss and opt.divergence_coef > 0
    assert stages[0].config.optimization.disable_divergence  # the SFT warmup needs no reference model
    assert rl.worker.actor.model.model_path == stages[0].export_dir
    assert config.dataset.generate_if_missing and stages[0].config.worker.actor.model.build_tiny_if_missing


@pytest.mark.slow
def test_quickstart_runs_and_reports_the_accuracy_change(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mtrl.training.training_main", f"config={QUICKSTART}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    tail = proc.stdout.strip().splitlines()[-5:]
    assert any("mtrl.tools.plot" in line for line in tail)
    assert any("huggingface" in line for line in tail)
    m = re.search(r"val/accuracy: sft_warmup ([0-9.]+) -> after rl ([0-9.]+)", "\n".join(tail))
    assert m, tail
    sft, rl = float(m.group(1)), float(m.group(2))
    assert rl >= sft + 0.3, (sft, rl)
    run = tmp_path / "outputs" / "quickstart" / "run"
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert any("actor/perception_token_fraction" in r for r in rows)
