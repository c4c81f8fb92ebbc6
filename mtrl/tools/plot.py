"""Training curves of a run as one PNG, from its ``metrics.jsonl``.

    python -m mtrl.tools.plot checkpoints/quickstart/tprl                 # -> RUN_DIR/metrics.png
    python -m mtrl.tools.plot outputs/quickstart/run/rl --out curves.png
    python -m mtrl.tools.plot outputs/quickstart/run        # staged run: one PNG per stage folder

Panels: reward (``reward/*``), validation score (``val/*``), losses (policy, value, divergence, SFT,
DPO ...), TPRL token fractions and trajectory scaling, entropy, gradient norm, KL and clipping,
response length, throughput, step time and learning rate. A panel whose metrics the run did not log
says so. When a step was logged more than once (a resumed run appends to the same file), the last
value wins. Matplotlib's Agg backend is used, so no display is needed.
"""

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

Series = Dict[str, Tuple[List[int], List[float]]]

# (title, exact keys in drawing order, key prefixes whose other keys are added, y label); the Losses panel
# also takes every other training key ending in "loss" (SFT, DPO, reward-model stages).
PANELS: Sequence[Tuple[str, Sequence[str], Sequence[str], str]] = (
    ("Reward (train)", ("reward/overall",), ("reward/",), "reward"),
    ("Validation", ("val/reward_score",), ("val/",), "score"),
    ("Losses", ("actor/pg_loss", "critic/vf_loss", "actor/divergence_loss", "actor/entropy_loss",
                "expert/sft_loss", "usual/pg_loss"), (), "loss"),
    ("TPRL token fractions", ("actor/entropy_token_fraction", "actor/perception_token_fraction",
                              "actor/kept_token_fraction"), (), "fraction of response tokens"),
    ("TPRL trajectory scaling", ("actor/scaling_factor_mean", "actor/scaling_factor_max",
                                 "actor/scaling_factor_min"), (), "alpha"),
    ("Entropy", ("actor/entropy",), (), "nats / token"),
    ("Gradient norm", ("actor/grad_norm", "critic/grad_norm"), (), "norm (before clipping)"),
    ("KL and clipping", ("actor/approx_kl", "actor/clipfrac", "actor/clipfrac_lower", "actor/reward_divergence",
                         "actor/divergence_loss"), (), "value"),
    ("Response length", ("response_length/mean", "response_length/max", "response_length/min"), (), "tokens"),
    ("Throughput", ("perf/tokens_per_second", "perf/throughput"), (), "tokens / s"),
    ("Step time", ("perf/step_seconds", "timing/generate", "timing/update_actor", "timing/validation",
                   "timing/save_checkpoint"), (), "seconds"),
    ("Learning rate", ("actor/lr", "critic/lr", "actor/divergence_coef"), (), "value"),
)
MAX_LINES = 8


def metrics_path(run: str) -> str:
    return run if os.path.isfile(run) else os.path.join(run, "metrics.jsonl")


def read_metrics(path: str) -> Series:
    """{metric: (steps, values)} sorted by step; the last value logged for a step wins; nulls are skipped."""
    by_key: Dict[str, Dict[int, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                print(f"[mtrl.plot] {path}:{number}: not JSON, skipped", file=sys.stderr)
                continue
            step = row.get("step")
            if not isinstance(step, (int, float)):
                continue
            for key, value in row.items():
                if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if math.isfinite(value):
                    by_key.setdefault(key, {})[int(step)] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_key.items()}


def panel_keys(series: Series, keys: Sequence[str], prefixes: Sequence[str],
               suffix: Optional[str] = None) -> List[str]:
    chosen = [k for k in keys if k in series]
    for prefix in prefixes:
        chosen += sorted(k for k in series if k.startswith(prefix) and k not in chosen and not k.endswith("_std"))
    if suffix:
        chosen += sorted(k for k in series if k.endswith(suffix) and k not in chosen and not k.startswith("val/"))
    return chosen[:MAX_LINES]


def plot(run: str, out: Optional[str] = None, title: Optional[str] = None) -> str:
    """Draw the run's curves into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = metrics_path(run)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (train with training.logger including `file`)")
    series = read_metrics(path)
    if not series:
        raise ValueError(f"{path} holds no metrics")
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.png")
    cols = 3
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, keys, prefixes, ylabel) in zip(axes.flat, PANELS):
        chosen = panel_keys(series, keys, prefixes, suffix="loss" if name == "Losses" else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not chosen:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        for i, key in enumerate(chosen):
            steps, values = series[key]
            few = len(steps) <= 30
            ax.plot(steps, values, label=key, linewidth=2.0 if i == 0 else 1.2, marker="o" if few else None,
                    markersize=3)
        ax.legend(fontsize=7, loc="best")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    steps = sorted({s for xs, _ in series.values() for s in xs})
    fig.suptitle(title or f"{os.path.abspath(os.path.dirname(path))}  (steps {steps[0]}-{steps[-1]})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def stage_runs(run: str) -> List[str]:
    """The folders to plot: ``run`` itself, or, for the root of a staged run (``stages:``), each stage folder."""
    if os.path.isfile(metrics_path(run)) or not os.path.isdir(run):
        return [run]
    stages = [os.path.join(run, name) for name in sorted(os.listdir(run))
              if os.path.isfile(os.path.join(run, name, "metrics.jsonl"))]
    return stages or [run]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtrl.tools.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder (with metrics.jsonl), a metrics.jsonl file, or the root "
                                        "folder of a staged run (one PNG per stage)")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/metrics.png); for a staged run, a folder "
                                      "for one STAGE.png each")
    parser.add_argument("--title", help="figure title (default: the run folder and step range)")
    args = parser.parse_args(argv)
    runs = stage_runs(args.run_dir)
    try:
        for run in runs:
            out = args.out
            if out and len(runs) > 1:
                out = os.path.join(out, os.path.basename(os.path.normpath(run)) + ".png")
            print(plot(run, out, args.title))
    except (FileNotFoundError, ValueError) as e:
        print(f"mtrl.plot: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
