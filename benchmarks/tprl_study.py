"""TPRL vs GRPO on the built-in coloured-shapes task, at equal compute, over seeds.

For every seed: one SFT warmup (the quickstart's, stopped early), then five RL variants that all
start from that warmup's exported weights and run the same number of steps with the same batch:

    grpo              plain GRPO (token filtering and trajectory reweighting off)
    grpo+entropy      + entropy token filtering
    grpo+perception   + perception (visual dependency) token filtering
    grpo+trajectory   + trajectory advantage scaling
    tprl              all three (the quickstart's RL stage)

Each seed is one `stages:` run (mtrl.training.stages) on one Ray runtime; hyperparameters are the
quickstart's (configs/quickstart.yaml) unless overridden on the command line.

    python benchmarks/tprl_study.py --seeds 1 2 3 [--rl-steps 30] [--target 0.8]

Writes benchmarks/results/tprl_study.{json,md,png}. Also a visual-dependency sanity check on the SFT
warmup model (`dependency_check`): the mean per-token KL(p(.|image) || p(.|black image)) of answer
tokens (the colour word) vs template tokens, for the model's own response format "<colour><|im_end|>"
and for "The answer is <colour>.".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

VARIANTS: Dict[str, Dict[str, Any]] = {
    "grpo": dict(enable_entropy_filtering=False, enable_perception_filtering=False,
                 enable_trajectory_reweighting=False),
    "grpo+entropy": dict(enable_entropy_filtering=True, enable_perception_filtering=False,
                         enable_trajectory_reweighting=False),
    "grpo+perception": dict(enable_entropy_filtering=False, enable_perception_filtering=True,
                            enable_trajectory_reweighting=False),
    "grpo+trajectory": dict(enable_entropy_filtering=False, enable_perception_filtering=False,
                            enable_trajectory_reweighting=True),
    "tprl": dict(enable_entropy_filtering=True, enable_perception_filtering=True,
                 enable_trajectory_reweighting=True),
}


def stage_name(variant: str) -> str:
    return "rl_" + variant.replace("+", "_")


def build_config(args, seed: int):
    from mtrl.training.training_config import load_config

    overrides = [f"training.save_checkpoint_path={os.path.join(args.out, f'seed{seed}')}",
                 f"training.seed={seed}", f"dataset.seed={seed}", "training.logger=[file]"]
    if args.rl_lr is not None:
        overrides.append(f"worker.actor.optim.lr={args.rl_lr}")
    base = load_config([f"config={args.config}"] + overrides)
    sft = replace(base.stages[0], name="sft_warmup")
    sft.training = {**dict(sft.training or {}), "max_steps": args.sft_steps, "val_freq": args.sft_steps,
                    "val_before_train": False}
    export = os.path.join(args.out, f"seed{seed}", "sft_warmup", "huggingface")
    stages = [sft]
    rl_template = base.stages[-1]
    for variant, flags in VARIANTS.items():
        if args.only and variant not in args.only:
            continue
        # The variant's switches and the shared warmup go on top of the RL stage's own overrides.
        sections = merged_sections(rl_template, {
            "training": {"max_steps": args.rl_steps, "val_freq": args.val_freq, "val_before_train": False},
            "optimization": dict(flags),
            "worker": {"actor": {"model": {"model_path": export, "build_tiny_if_missing": None}}}})
        stages.append(replace(rl_template, name=stage_name(variant), mode="rl", **sections))
    return replace(base, stages=stages)


def merged_sections(stage, overrides: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return {k: OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(getattr(stage, k) or {}), v))
            for k, v in overrides.items()}


def read_metrics(path: str) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def val_curve(rows: List[Dict[str, Any]]) -> Dict[int, float]:
    return {int(r["step"]): float(r["val/accuracy"]) for r in rows if "val/accuracy" in r}


def collect(args) -> Dict[str, Any]:
    runs: Dict[str, Any] = {}
    for seed in args.seeds:
        sd = os.path.join(args.out, f"seed{seed}")
        sft_curve = val_curve(read_metrics(os.path.join(sd, "sft_warmup", "metrics.jsonl")))
        if not sft_curve:
            continue
        sft_acc = sft_curve[max(sft_curve)]
        seed_runs = {"sft_warmup_val_accuracy": sft_acc, "variants": {}}
        for variant in VARIANTS:
            rd = os.path.join(sd, stage_name(variant))
            curve = val_curve(read_metrics(os.path.join(rd, "metrics.jsonl")))
            done = os.path.join(rd, "stage_done.json")
            if not curve or not os.path.isfile(done):
                continue
            with open(done) as f:
                seconds = json.load(f)["seconds"]
            curve = {0: sft_acc, **curve}
            seed_runs["variants"][variant] = {"curve": curve, "final": curve[max(curve)], "seconds": seconds}
        runs[str(seed)] = seed_runs
    return runs


def summarize(runs: Dict[str, Any], target: float) -> Dict[str, Any]:
    table = {}
    for variant in VARIANTS:
        per_seed = [r["variants"][variant] for r in runs.values() if variant in r["variants"]]
        if not per_seed:
            continue
        finals = [v["final"] for v in per_seed]
        gains = [v["final"] - r["sft_warmup_val_accuracy"] for r in runs.values() for v in [r["variants"].get(variant)]
                 if v]
        reach = []
        for v in per_seed:
            hit = [s for s, a in sorted(v["curve"].items()) if a >= target]
            reach.append(hit[0] if hit else None)
        table[variant] = {
            "seeds": len(per_seed),
            "final_mean": statistics.mean(finals), "final_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "gain_mean": statistics.mean(gains),
            "steps_to_target": reach, "reached": sum(r is not None for r in reach),
            "seconds_mean": statistics.mean(v["seconds"] for v in per_seed),
        }
    return table


def write_outputs(args, runs, table, dependency, wall) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    sft = [r["sft_warmup_val_accuracy"] for r in runs.values()]
    payload = {"config": os.path.relpath(args.config, ROOT), "seeds": [int(s) for s in runs],
               "sft_steps": args.sft_steps, "rl_steps": args.rl_steps, "val_freq": args.val_freq,
               "target_accuracy": args.target, "rl_lr": args.rl_lr, "runs": runs, "table": table,
               "sft_warmup_val_accuracy_mean": statistics.mean(sft) if sft else None,
               "dependency_check": dependency, "total_wall_seconds": round(wall, 1),
               "machine": f"{os.cpu_count()} CPU cores (shared), 2 CPU worker processes",
               "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(os.path.join(RESULTS, "tprl_study.json"), "w") as f:
        json.dump(payload, f, indent=2)
    lines = ["# TPRL vs GRPO on the built-in shapes task (easy, tiny Qwen2-VL, CPU)", "",
             f"Same SFT warmup per seed ({args.sft_steps} steps; val accuracy "
             f"{', '.join(f'{a:.3f}' for a in sft)} for seeds {', '.join(runs)}), then {args.rl_steps} RL steps per "
             f"variant, same batch (config `{payload['config']}`). Seeds: {len(runs)}. Validation: greedy, "
             f"200 rows, every {args.val_freq} steps. Steps to target = first validation step with accuracy >= "
             f"{args.target} (`-` = not reached).", "",
             "| variant | final val acc (mean ± std) | gain over SFT warmup | steps to target (per seed) | "
             "RL wall time (s, mean) |", "|---|---|---|---|---|"]
    for variant, row in table.items():
        reach = ", ".join("-" if r is None else str(r) for r in row["steps_to_target"])
        lines.append(f"| {variant} | {row['final_mean']:.3f} ± {row['final_std']:.3f} | {row['gain_mean']:+.3f} | "
                     f"{reach} | {row['seconds_mean']:.1f} |")
    if dependency:
        lines += ["", f"Visual-dependency sanity check (SFT warmup model of seed {dependency['seed']}, "
                  f"{dependency['rows']} val rows; mean per-token KL(p(.|image) || p(.|all-black image))):", "",
                  "| response format | answer tokens (colour) | template tokens | ratio |", "|---|---|---|---|"]
        names = {"own": "model's own: colour + end-of-turn token (template = end-of-turn)",
                 "the_answer_is": "`The answer is <colour>.`"}
        for fmt, name in names.items():
            d = dependency[fmt]
            lines.append(f"| {name} | {d['answer_mean']:.4f} ({d['answer_tokens']} tok) | {d['template_mean']:.4f} "
                         f"({d['template_tokens']} tok) | {d['ratio']:.1f}x |")
    lines += ["", "Per seed (val accuracy: SFT warmup -> after RL):", "",
              "| seed | SFT warmup | " + " | ".join(table) + " |", "|---" * (len(table) + 2) + "|"]
    for seed, r in runs.items():
        cells = [f"{r['variants'][v]['final']:.3f}" if v in r["variants"] else "-" for v in table]
        lines.append(f"| {seed} | {r['sft_warmup_val_accuracy']:.3f} | " + " | ".join(cells) + " |")
    total = sum(v["seconds"] for r in runs.values() for v in r["variants"].values())
    lines += ["", f"RL wall time summed over all runs: {total / 60:.1f} min on {payload['machine']} (plus one "
              f"~25 s SFT warmup per seed and ~15 s of start-up per stage).", "",
              f"Command: `python benchmarks/tprl_study.py --seeds {' '.join(runs)} --rl-steps {args.rl_steps} "
              f"--val-freq {args.val_freq} --target {args.target}`"]
    with open(os.path.join(RESULTS, "tprl_study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant in table:
            curves = [r["variants"][variant]["curve"] for r in runs.values() if variant in r["variants"]]
            steps = sorted(set.intersection(*[set(c) for c in curves]))
            means = [statistics.mean(c[s] for c in curves) for s in steps]
            sds = [statistics.pstdev([c[s] for c in curves]) if len(curves) > 1 else 0.0 for s in steps]
            line, = ax.plot(steps, means, marker="o", label=variant)
            ax.fill_between(steps, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                            color=line.get_color(), alpha=0.12)
        ax.axhline(args.target, color="gray", ls=":", lw=1)
        ax.set_xlabel("RL step (0 = SFT warmup)")
        ax.set_ylabel("val accuracy")
        ax.set_title(f"shapes:easy, tiny Qwen2-VL, {len(runs)} seeds (mean ± std)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "tprl_study.png"), dpi=110)
    except Exception as e:  # the table is the result; a missing matplotlib only loses the picture
        print(f"[tprl_study] no plot: {e}", file=sys.stderr)


def dependency_check(model_dir: str, val_file: str, image_dir: str, rows: int = 32, seed: int = 0) -> Dict[str, Any]:
    """Mean per-token KL(p(.|image) || p(.|black image)) of the next-token distributions, for the answer
    token(s) vs the template tokens of a response, in two response formats: the model's own
    ("<colour><|im_end|>": template = the end-of-turn token) and "The answer is <colour>."."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    with open(val_file) as f:
        data = [json.loads(line) for line in f][:rows]
    formats = {"own": lambda a: [a, "<|im_end|>"], "the_answer_is": lambda a: ["The answer is", " " + a, "."]}
    answer_index = {"own": 0, "the_answer_is": 1}
    kls: Dict[str, Dict[str, List[float]]] = {k: {"answer": [], "template": []} for k in formats}

    def n_tokens(text, image):
        return processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1]

    for row in data:
        image = Image.open(os.path.join(image_dir, row["images"][0])).convert("RGB")
        black = Image.new("RGB", image.size, (0, 0, 0))
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": row["prompt"].replace("<image>", "")}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for fmt, pieces_of in formats.items():
            spans, text = [], prompt
            for piece in pieces_of(row["answer"]):
                before = n_tokens(text, image)
                text += piece
                spans.append((before, n_tokens(text, image)))
            logps = []
            for img in (image, black):
                with torch.no_grad():
                    logits = model(**processor(text=[text], images=[img], return_tensors="pt")).logits[0].float()
                logps.append(torch.log_softmax(logits, -1))
            kl = (logps[0].exp() * (logps[0] - logps[1])).sum(-1)  # position t - 1 predicts token t
            for k, (a, b) in enumerate(spans):
                kind = "answer" if k == answer_index[fmt] else "template"
                kls[fmt][kind].extend(float(kl[t - 1]) for t in range(a, b))
    out: Dict[str, Any] = {"model": model_dir, "rows": len(data), "seed": seed,
                           "measure": "KL(p(.|image) || p(.|all-black image)) per response token"}
    for fmt, d in kls.items():
        am, tm = statistics.mean(d["answer"]), statistics.mean(d["template"])
        out[fmt] = {"answer_tokens": len(d["answer"]), "template_tokens": len(d["template"]), "answer_mean": am,
                    "template_mean": tm, "ratio": am / max(tm, 1e-12)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sft-steps", type=int, default=None, help="default: the config's SFT stage")
    p.add_argument("--rl-steps", type=int, default=None, help="default: the config's RL stage")
    p.add_argument("--val-freq", type=int, default=10)
    p.add_argument("--rl-lr", type=float, default=None, help="default: the config's")
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--only", nargs="*", default=None, help="run only these variants")
    p.add_argument("--out", default=os.path.join(ROOT, "outputs", "tprl_study"))
    p.add_argument("--report-only", action="store_true", help="only collect existing runs and write results")
    p.add_argument("--no-dependency-check", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.sft_steps is None or args.rl_steps is None:
        from mtrl.training.training_config import load_config
        cfg = load_config([f"config={args.config}"])
        if args.sft_steps is None:
            args.sft_steps = int((cfg.stages[0].training or {}).get("max_steps"))
        if args.rl_steps is None:
            args.rl_steps = int((cfg.stages[-1].training or {}).get("max_steps") or cfg.training.max_steps)
    start = time.perf_counter()
    if not args.report_only:
        from mtrl.training.stages import run_stages

        for seed in args.seeds:
            t0 = time.perf_counter()
            rc = run_stages(build_config(args, seed))
            print(f"[tprl_study] seed {seed}: rc={rc} in {time.perf_counter() - t0:.0f}s", flush=True)
            if rc != 0:
                return rc
            runs = collect(args)
            write_outputs(args, runs, summarize(runs, args.target), None, time.perf_counter() - start)
    runs = collect(args)
    table = summarize(runs, args.target)
    dependency = None
    if not args.no_dependency_check and runs:
        seed = next(iter(runs))
        from mtrl.training.training_config import load_config
        cfg = load_config([f"config={args.config}"])
        dependency = dependency_check(os.path.join(args.out, f"seed{seed}", "sft_warmup", "huggingface"),
                                      cfg.dataset.val_files, cfg.dataset.image_dir, seed=int(seed))
    write_outputs(args, runs, table, dependency, time.perf_counter() - start)
    with open(os.path.join(RESULTS, "tprl_study.md")) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
