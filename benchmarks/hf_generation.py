"""The hf rollout engine's generation speed on compare_trl.py's work, against the engine of another commit.

The tiny Qwen2-VL (`mtrl.models.tiny`; `--big`: compare_trl.py's hidden 512 x 6 layers), the shapes-task prompts
(56x56 images), P prompts x G samples x T max new tokens, temperature 1, one micro-batch, fp32 on CPU, one
thread (`--threads`). Both engines run in this process, alternated after a warm-up call each; the engine of
`--against` is this repository's hf_engine.py at that commit (default: the commit before the decode loop).
Reports median wall and CPU seconds per `generate`, generated tokens/s, and whether the tokens and
log-probs are the same.

    python benchmarks/hf_generation.py [--shape 16x8x64] [--big] [--repeats 5] [--against 08d9d5f]

Writes benchmarks/results/hf_generation.json (one entry per shape and model).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "hf_generation.json"
BIG_SIZES = dict(hidden_size=512, num_hidden_layers=6, intermediate_size=1376, num_attention_heads=8,
                 num_key_value_heads=4)


def engine_class_at(commit: str):
    """`HFRolloutEngine` as hf_engine.py was at `commit` (loaded as its own module)."""
    source = subprocess.run(["git", "show", f"{commit}:mtrl/workers/rollout/hf_engine.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="mtrl-hf-engine-")) / f"hf_engine_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HFRolloutEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="16x8x64", help="P prompts x G samples x T max new tokens")
    parser.add_argument("--big", action="store_true", help="compare_trl.py's --big model (hidden 512, 6 layers)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", default="08d9d5f", help="the commit whose engine is the baseline")
    args = parser.parse_args()
    from mtrl.models.tiny import make_tiny_model
    from mtrl.utils.dataset import RLDataset
    from mtrl.utils.shapes_task import ensure_task
    from mtrl.workers.rollout import SamplingParams
    from mtrl.workers.rollout.hf_engine import HFRolloutEngine

    torch.set_num_threads(args.threads)
    P, G, T = (int(x) for x in args.shape.split("x"))
    sizes = BIG_SIZES if args.big else {}
    tiny = make_tiny_model("qwen2_vl", **sizes)
    task = ensure_task(os.path.join(tempfile.gettempdir(), "mtrl-hf-generation-shapes"), n_train=max(P, 16),
                       n_val=1, seed=0, difficulty="easy")
    data = RLDataset(os.path.join(task, "train.jsonl"), tiny.tokenizer, tiny.processor, tiny.model.config,
                     image_dir=task, min_pixels=3136, max_pixels=3136, max_prompt_length=96)
    prompts = data.collate([data[i] for i in range(P)])
    params = SamplingParams(n=G, temperature=1.0, max_new_tokens=T, seed=5)
    eos = [tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    engines = {}
    for name, cls in ((f"before ({args.against})", engine_class_at(args.against)), ("now", HFRolloutEngine)):
        engine = cls(lambda: make_tiny_model("qwen2_vl", seed=1, **sizes).model, tiny.model.config, eos,
                     tiny.tokenizer.pad_token_id, torch.device("cpu"), micro_batch_size=P * G)
        engine.load_weights(tiny.model.state_dict().items())
        engine.generate(prompts.select(), params)  # warm-up
        engines[name] = engine
    wall, cpu, outs = ({name: [] for name in engines} for _ in range(3))
    for _ in range(args.repeats):  # alternated, so that load on the machine hits both alike
        for name, engine in engines.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            outs[name] = engine.generate(prompts.select(), params)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    (before, a), (_, b) = outs.items()
    result = {"config": {**vars(args), "params": sum(p.numel() for p in tiny.model.parameters())},
              "same_tokens": bool(torch.equal(a["responses"], b["responses"])),
              "log_prob_max_abs_diff": float((a["rollout_log_probs"] - b["rollout_log_probs"]).abs().max())}
    for name in engines:
        tokens = int(outs[name]["response_mask"].sum())
        result[name] = {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name]),
                        "wall_s_range": [min(wall[name]), max(wall[name])], "tokens": tokens,
                        "tokens_per_s": tokens / statistics.median(wall[name]),
                        "tokens_per_cpu_s": tokens / statistics.median(cpu[name])}
    result["cpu_speedup"] = result[before]["cpu_s"] / result["now"]["cpu_s"]
    result["wall_speedup"] = result[before]["wall_s"] / result["now"]["wall_s"]
    result["load_average"] = os.getloadavg()
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    key = lambda r: (r["config"]["shape"], r["config"]["big"])  # noqa: E731
    runs = [r for r in previous if key(r) != key(result)] + [result]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(runs, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
