"""MTRL vs TRL's GRPOTrainer on the same work: s/step, tokens/s, start-up to the first step.

Both trainers get the same tiny Qwen2-VL folder (`mtrl.models.tiny`), the same shapes-task rows
(`mtrl.utils.shapes_task`, 56x56 images), the same P prompts x G samples x T max new tokens, lr,
temperature, reward function (reward_fns/shapes.py), one update per rollout, no reference model and
no KL (beta = 0), fp32 on CPU, one process each. MTRL runs twice: plain GRPO and with TPRL (entropy +
perception token filtering, trajectory reweighting). Runs alternate (mtrl_grpo, mtrl_tprl, trl,
mtrl_grpo, ...); the first `--warmup` steps of each run are skipped. Every run is its own process,
so start-up (imports, Ray, model load) is measured from process start to the end of the first step.

    python benchmarks/compare_trl.py [--shapes 4x4x16 16x8x64] [--steps 4] [--repeats 2] [--big] [--workers 2]

`--big` adds the ~30M-parameter Qwen2-VL (`BIG_SIZES`; compute-bound on CPU). `--workers 2` adds MTRL GRPO
with 2 worker processes on the same global batch (each computes half of every batch), to check that 2
processes beat 1. Each shape also reports the update phase's rate of plain-forward work (the FLOPs TRL runs
for the same update) against this machine's fp32 matmul peak (`update_flops.matmul_peak`); the executed
FLOP/s are measured by `update_flops.py`.

TRL is a benchmark-only dependency (`pip install trl`); MTRL never imports it. Writes
benchmarks/results/compare_trl.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
REWARD_FN = os.path.join(ROOT, "reward_fns", "shapes.py")
# The ~30M-parameter model (compute-bound on CPU): head_dim 64, grouped-query attention as the real ones.
BIG_SIZES = dict(hidden_size=640, num_hidden_layers=8, intermediate_size=1344, num_attention_heads=10,
                 num_key_value_heads=5)
BIG_MODEL = "tiny_qwen2_vl_30m"
TPRL = dict(enable_entropy_filtering=True, top_p_entropy_tokens=0.5, enable_perception_filtering=True,
            top_p_perception_tokens=0.5, enable_trajectory_reweighting=True, trajectory_scaling_min=0.8)
GRPO = dict(enable_entropy_filtering=False, enable_perception_filtering=False, enable_trajectory_reweighting=False)


def prepare(work: str, big: bool) -> Dict[str, str]:
    from mtrl.models.tiny import ensure_tiny_model
    from mtrl.utils.shapes_task import ensure_task

    model = ensure_tiny_model(os.path.join(work, BIG_MODEL if big else "tiny_qwen2_vl"), "qwen2_vl",
                              **(BIG_SIZES if big else {}))
    task = ensure_task(os.path.join(work, "shapes"), n_train=2000, n_val=32, seed=0, difficulty="easy")
    return {"model": model, "task": task}


def n_params(model_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# ------------------------------------------------------------------ MTRL


def mtrl_config(s: Dict[str, Any], paths: Dict[str, str], run_dir: str, tprl: bool,
                workers: int = 1) -> Dict[str, Any]:
    """`workers` worker processes share the same global batch: each gets 1/workers of the rows."""
    task = paths["task"]
    rows = s["P"] * s["G"] // workers
    return {
        "dataset": {"train_files": os.path.join(task, "train.jsonl"), "val_files": os.path.join(task, "val.jsonl"),
                    "image_dir": task, "min_pixels": 3136, "max_pixels": 3136, "max_prompt_length": 96,
                    "max_response_length": s["T"], "rollout_batch_size": s["P"], "val_batch_size": 32,
                    "seed": 1},
        "training": {"project_name": "compare_trl", "experiment_name": "run", "save_checkpoint_path": run_dir,
                     "logger": ["file"], "device": "cpu", "n_gpus_per_node": workers, "total_epochs": 1,
                     "max_steps": s["steps"], "val_freq": -1, "val_before_train": False, "save_freq": -1,
                     "seed": 1},
        "optimization": {"advantage_estimator": "grpo", "disable_divergence": True, **(TPRL if tprl else GRPO)},
        "worker": {
            # Old log-probs: GRPO takes the update's own forward (`auto`: one optimizer step per rollout, as
            # TRL); TPRL needs them before the update, so it takes the ones the hf engine records.
            "actor": {"model": {"model_path": paths["model"], "enable_gradient_checkpointing": False},
                      "old_log_probs": "rollout" if tprl else "auto",
                      "optim": {"lr": s["lr"], "warmup_steps": 0, "weight_decay": 0.0},
                      "fsdp": {"mixed_precision_dtype": "fp32"},
                      # one update per rollout: the whole rollout is one mini-batch and one micro-batch
                      "global_batch_size": s["P"], "micro_batch_size_per_device_for_update": rows,
                      "micro_batch_size_per_device_for_experience": rows,
                      "max_token_len_per_device": 1 << 20},
            "rollout": {"n": s["G"], "temperature": s["temperature"], "micro_batch_size_per_device": rows},
            "reward": {"reward_fn_path": REWARD_FN},
        },
    }


def run_mtrl(s: Dict[str, Any], paths: Dict[str, str], work: str, tprl: bool, tag: str,
             workers: int = 1) -> Dict[str, Any]:
    import yaml

    run_dir = os.path.join(work, "runs", tag)
    shutil.rmtree(run_dir, ignore_errors=True)  # a previous run's checkpoint there would be resumed, not rerun
    os.makedirs(run_dir)
    cfg_path = os.path.join(run_dir, "config_in.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(mtrl_config(s, paths, run_dir, tprl, workers), f)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    start = time.time()
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mtrl.training.training_main", f"config={cfg_path}"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        first_step = None  # process start -> step 1's metrics line written
        while proc.poll() is None:
            if first_step is None and os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
                first_step = time.time() - start
            time.sleep(0.1)
    wall = time.time() - start
    if proc.returncode != 0:
        with open(os.path.join(run_dir, "log.txt")) as f:
            raise RuntimeError(f"MTRL run {tag} failed:\n{f.read()[-4000:]}")
    with open(metrics) as f:
        steps = [r for r in (json.loads(line) for line in f if line.strip()) if "perf/step_seconds" in r]
    timing = {k: statistics.median(r[k] for r in steps[s["warmup"]:]) for k in steps[-1]
              if k.startswith("timing/") and k != "timing/save_checkpoint"}  # saved once, after the last step
    return {"step_seconds": [r["perf/step_seconds"] for r in steps],
            "tokens": [r["perf/total_tokens"] for r in steps],
            "startup_to_first_step_s": first_step if first_step is not None else wall,
            "first_step_s": steps[0]["perf/step_seconds"], "wall_s": wall, "timing_median": timing}


# ------------------------------------------------------------------ TRL (in its own process)


def trl_worker(spec: Dict[str, Any]) -> None:
    """Runs in a child process: `compare_trl.py --trl-worker SPEC.json`. Writes spec['out']."""
    start = spec["start"]
    import importlib.util

    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    s, paths = spec["shape"], spec["paths"]
    mod_spec = importlib.util.spec_from_file_location("shapes_reward", REWARD_FN)
    reward_mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(reward_mod)

    def shapes_reward(completions, answer, **_):
        return [reward_mod.reward_function({"response": c[0]["content"], "ground_truth": a})[0]
                for c, a in zip(completions, answer)]

    with open(os.path.join(paths["task"], "train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    need = s["P"] * s["steps"]
    rows = rows[:need]
    data = Dataset.from_list([{
        "prompt": [{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": r["prompt"].replace("<image>", "")}]}],
        "image": Image.open(os.path.join(paths["task"], r["images"][0])).convert("RGB"),
        "answer": r["answer"]} for r in rows])
    processor = AutoProcessor.from_pretrained(paths["model"], padding_side="left")
    model = AutoModelForImageTextToText.from_pretrained(paths["model"], dtype=torch.float32)
    args = GRPOConfig(output_dir=spec["dir"], per_device_train_batch_size=s["P"] * s["G"],
                      gradient_accumulation_steps=1, num_generations=s["G"], max_completion_length=s["T"],
                      learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      temperature=s["temperature"], top_p=1.0, top_k=0, beta=0.0, num_iterations=1,
                      max_steps=s["steps"], logging_steps=1, save_strategy="no", report_to="none",
                      use_cpu=True, bf16=False, fp16=False, seed=1, shuffle_dataset=False, dataloader_num_workers=0,
                      disable_dropout=True, log_completions=False, gradient_checkpointing=False)
    ends: List[float] = []
    tokens: List[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                tokens.append(float(logs["num_tokens"]))

    trainer = GRPOTrainer(model=model, reward_funcs=[shapes_reward], args=args, train_dataset=data,
                          processing_class=processor, callbacks=[StepClock()])
    trainer.train()
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    per_step_tokens = [b - a for a, b in zip([0.0] + tokens, tokens)]
    with open(spec["out"], "w") as f:
        json.dump({"step_seconds": step_s, "tokens": per_step_tokens[1:],
                   "startup_to_first_step_s": ends[0] - start, "wall_s": time.time() - start}, f)


def run_trl(s: Dict[str, Any], paths: Dict[str, str], work: str, tag: str) -> Dict[str, Any]:
    run_dir = os.path.join(work, "runs", tag)
    os.makedirs(run_dir, exist_ok=True)
    # one extra step: TRL's step times are differences of step-end times, so step 1 has none
    spec = {"shape": {**s, "steps": s["steps"] + 1}, "paths": paths, "dir": run_dir,
            "out": os.path.join(run_dir, "result.json"), "start": time.time()}
    spec_path = os.path.join(run_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--trl-worker", spec_path], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run {tag} failed:\n{proc.stderr[-4000:]}")
    with open(spec["out"]) as f:
        return json.load(f)


# ------------------------------------------------------------------ report


def stats(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: Dict[str, List[Dict[str, Any]]], warmup: int) -> Dict[str, Any]:
    out = {}
    for name, reps in runs.items():
        # MTRL lists every step (skip the warm-up ones); TRL's list starts at step 2 already
        skip = warmup if name.startswith("mtrl") else max(warmup - 1, 0)
        secs = [x for r in reps for x in r["step_seconds"][skip:]]
        tps = [t / x for r in reps for t, x in zip(r["tokens"][skip:], r["step_seconds"][skip:])]
        out[name] = {"s_per_step": stats(secs), "tokens_per_s": stats(tps),
                     "startup_to_first_step_s": stats([r["startup_to_first_step_s"] for r in reps])}
        if name.startswith("mtrl"):
            keys = reps[0]["timing_median"]
            out[name]["timing_median"] = {k: statistics.median(r["timing_median"][k] for r in reps) for k in keys}
    med = {k: v["s_per_step"]["median"] for k, v in out.items()}
    out["ratios"] = {"mtrl_grpo_over_trl": med["mtrl_grpo"] / med["trl"],
                     "mtrl_tprl_over_mtrl_grpo": med["mtrl_tprl"] / med["mtrl_grpo"]}
    for name in out:
        if name.startswith("mtrl_grpo_") and name.endswith("w"):  # mtrl_grpo_2w: N worker processes
            out["ratios"][f"{name}_over_mtrl_grpo"] = med[name] / med["mtrl_grpo"]
    return out


def update_flops(result: Dict[str, Any], params: int, peak: float) -> Dict[str, float]:
    """Achieved update-phase FLOP/s of the MTRL GRPO runs, estimated as 6 x params x tokens per step over the
    median `timing/update_actor` (attention FLOPs not counted: an underestimate; benchmarks/update_flops.py
    counts every term for one update in-process)."""
    tokens = statistics.median(t for r in result["raw"]["mtrl_grpo"] for t in r["tokens"])
    flops_per_s = 6 * params * tokens / result["mtrl_grpo"]["timing_median"]["timing/update_actor"]
    return {"tokens_per_step": tokens, "flops_per_s": flops_per_s, "matmul_peak_flops_per_s": peak,
            "fraction_of_peak": flops_per_s / peak}


def cell(x: Dict[str, float]) -> str:
    return f"{x['median']:.3f} ({x['min']:.3f}-{x['max']:.3f})"


def write_markdown(payload: Dict[str, Any]) -> str:
    lines = ["# MTRL vs TRL GRPOTrainer (tiny Qwen2-VL, shapes task, CPU, one process)", "",
             f"Date {payload['date']}, {payload['machine']}. Load (`uptime`) before: `{payload['load_before']}`, "
             f"after: `{payload['load_after']}` (shared machine: numbers are noisy).", "",
             "Matched settings: " + ", ".join(f"{k}={v}" for k, v in payload["matched"].items()), "",
             "| model | shape P x G x T | MTRL GRPO s/step | MTRL TPRL s/step | TRL s/step | MTRL/TRL | TPRL/GRPO | "
             "tokens/s MTRL / TRL | start-up to 1st step MTRL / TRL (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in payload["results"].items():
        g, t, trl = r["mtrl_grpo"], r["mtrl_tprl"], r["trl"]

        lines.append(f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {key} | {cell(g['s_per_step'])} | "
                     f"{cell(t['s_per_step'])} | {cell(trl['s_per_step'])} | "
                     f"{r['ratios']['mtrl_grpo_over_trl']:.2f} | {r['ratios']['mtrl_tprl_over_mtrl_grpo']:.2f} | "
                     f"{g['tokens_per_s']['median']:.0f} / {trl['tokens_per_s']['median']:.0f} | "
                     f"{g['startup_to_first_step_s']['median']:.1f} / {trl['startup_to_first_step_s']['median']:.1f} |")
    lines += ["", "s/step: median (min-max) over the non-warm-up steps of all repeats.", ""]
    for key, r in payload["results"].items():
        for name, ratio in r["ratios"].items():
            if name.startswith("mtrl_grpo_") and name.endswith("w_over_mtrl_grpo"):
                run = name[:-len("_over_mtrl_grpo")]
                lines.append(f"- {key} MTRL GRPO with {run[len('mtrl_grpo_'):-1]} worker processes on the same "
                             f"global batch: {cell(r[run]['s_per_step'])} s/step, {ratio:.2f} x the 1-process step")
        u = r["update_flops"]
        lines.append(f"- {key} update phase ~{u['flops_per_s'] / 1e9:.3g} GFLOP/s of plain-forward work (6 x params x "
                     f"{u['tokens_per_step']:.0f} tokens / timing/update_actor: what TRL computes; MTRL's "
                     f"shared-prompt forward executes fewer FLOPs for it, so this can pass the peak) = "
                     f"{100 * u['fraction_of_peak']:.0f}% of this machine's fp32 matmul peak "
                     f"{u['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    lines += ["", "MTRL phase medians (timing/*, s):", ""]
    for key, r in payload["results"].items():
        for name in (n for n in r if n.startswith("mtrl_") and "timing_median" in r[n]):
            tm = ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in r[name]["timing_median"].items())
            lines.append(f"- {key} {name}: {tm}")
    lines += ["", f"Command: `{payload['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["4x4x16", "16x8x64"], help="P x G x T")
    p.add_argument("--steps", type=int, default=4, help="steps per run")
    p.add_argument("--warmup", type=int, default=1, help="steps skipped at the start of each run")
    p.add_argument("--repeats", type=int, default=2, help="alternations per shape")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--big", action="store_true", help="also the ~30M-parameter model (hidden 640, 8 layers)")
    p.add_argument("--workers", type=int, default=1,
                   help="also MTRL GRPO with this many worker processes on the same global batch (vs 1)")
    p.add_argument("--work", default=os.path.join(ROOT, "outputs", "compare_trl"))
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_worker:
        with open(args.trl_worker) as f:
            trl_worker(json.load(f))
        return 0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    load_before = uptime()
    models = [False, True] if args.big else [False]
    from update_flops import matmul_peak  # noqa: PLC0415 (a sibling script; it imports this one)

    peak = matmul_peak()["flops_per_s"]  # before the runs: the main process is idle while they run
    results: Dict[str, Any] = {}
    for big in models:
        paths = prepare(args.work, big)
        for shape in args.shapes:
            P, G, T = (int(x) for x in shape.split("x"))
            s = dict(P=P, G=G, T=T, steps=args.steps, warmup=args.warmup, lr=args.lr, temperature=args.temperature)
            key = f"{'big ' if big else ''}P{P}xG{G}xT{T}"
            runs: Dict[str, List[Dict[str, Any]]] = {"mtrl_grpo": [], "mtrl_tprl": [], "trl": []}
            multi = f"mtrl_grpo_{args.workers}w"
            if args.workers > 1:
                runs[multi] = []
            for rep in range(args.repeats):  # alternate: A B C A B C ...
                tag = f"{'big_' if big else ''}{shape}_r{rep}"
                runs["mtrl_grpo"].append(run_mtrl(s, paths, args.work, False, f"mtrl_grpo_{tag}"))
                runs["mtrl_tprl"].append(run_mtrl(s, paths, args.work, True, f"mtrl_tprl_{tag}"))
                runs["trl"].append(run_trl(s, paths, args.work, f"trl_{tag}"))
                if args.workers > 1:
                    runs[multi].append(run_mtrl(s, paths, args.work, False, f"{multi}_{tag}", args.workers))
                print(f"[compare_trl] {key} repeat {rep}: " + ", ".join(
                    f"{k} {statistics.median(v[-1]['step_seconds'][1:] or v[-1]['step_seconds']):.3f}s"
                    for k, v in runs.items()), flush=True)
            params = n_params(paths["model"])
            results[key] = {"model": BIG_MODEL if big else "tiny_qwen2_vl", "params": params,
                            **summarize(runs, args.warmup), "raw": runs}
            results[key]["update_flops"] = update_flops(results[key], params, peak)
            md = write_results(args, argv, load_before, uptime(), results)  # after every shape: partial results
    print(md)
    return 0


def write_results(args, argv, load_before: str, load_after: str, results: Dict[str, Any]) -> str:
    import transformers
    import trl

    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} CPU cores (shared)",
        "load_before": load_before, "load_after": load_after,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        "matched": {"model": "tiny Qwen2-VL folder (mtrl.models.tiny, qwen2_vl, bpe tokenizer)",
                    "data": "shapes:easy train rows in order, 56x56 images (min=max pixels 3136)",
                    "reward": "reward_fns/shapes.py reward_function (format_weight 0.1)",
                    "algorithm": "GRPO, group-normalised advantages, no reference model, no KL (beta=0)",
                    "updates_per_rollout": 1, "lr": args.lr, "temperature": args.temperature, "top_p": 1.0,
                    "top_k": "off", "dtype": "fp32", "device": "cpu",
                    "optimizer": "AdamW, torch's fused kernel (TRL: transformers' default adamw_torch_fused; MTRL: "
                                 "build_optimizer)",
                    "mtrl_old_log_probs": "GRPO auto (the update's own forward), TPRL rollout (recorded by the "
                                          "hf engine while generating)",
                    "mtrl_share_prompts": "on (the default: each prompt's forward runs once for its G responses "
                                          "in the update; TRL runs every row's prompt)",
                    "processes": 1 if args.workers == 1 else f"1 (and {args.workers} MTRL worker processes in "
                                                             f"mtrl_grpo_{args.workers}w, each 1/{args.workers} of "
                                                             "every batch, same global batch)",
                    "steps_per_run": args.steps, "warmup_steps_skipped": args.warmup, "repeats": args.repeats,
                    "order": "mtrl_grpo, mtrl_tprl, trl" + (f", mtrl_grpo_{args.workers}w" if args.workers > 1 else "")
                             + " alternating, each run a fresh process",
                    **({"big_model": f"{BIG_MODEL}: " + ", ".join(f"{k}={v}" for k, v in BIG_SIZES.items())}
                       if args.big else {})},
        "results": results,
        "command": "python benchmarks/compare_trl.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "compare_trl.json"), "w") as f:
        json.dump(payload, f, indent=2)
    md = write_markdown(payload)
    with open(os.path.join(RESULTS, "compare_trl.md"), "w") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
