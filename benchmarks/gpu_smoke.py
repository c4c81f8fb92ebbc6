"""GPU smoke run (issue 14): a few GRPO + TPRL steps on every visible GPU with NCCL and bf16, and the memory of
each phase. Not run on this project's CPU CI: it is here for whoever has a GPU.

It builds a random Qwen2-VL of ~1B parameters with the tiny builder (`mtrl.models.tiny`, bigger sizes: fp32
weights + grads + Adam ~17 GB, sharded over the GPUs, plus the bf16 reference and the rollout copy), writes an
RL config derived from configs/quickstart.yaml (the shapes task, one RL stage, `training.device=cuda`,
`fsdp.mixed_precision_dtype=bf16`) and runs the trainer on it, then prints, per step, the actor's
`memory/{phase}_max_allocated_gb` / `_reserved_gb` (generate, log_probs, perception, ref, update) and
`memory/host_rss_gb`.

    python benchmarks/gpu_smoke.py [--steps 3 --hidden 2048 --layers 24 --out outputs/gpu_smoke]

Without CUDA it stops at once with a message saying so (exit code 2).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def require_cuda() -> int:
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu_smoke.py needs a CUDA GPU (torch.cuda.is_available() is False here: "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine; on CPU "
              "the test suite and benchmarks/memory.py cover the same code.", file=sys.stderr)
        sys.exit(2)
    return torch.cuda.device_count()


def smoke_config(args, gpus: int, model_path: str) -> dict:
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config.pop("stages")
    data = str(Path(args.out) / "shapes")
    config["dataset"].update(train_files=f"{data}/train.jsonl", val_files=f"{data}/val.jsonl", image_dir=data,
                             rollout_batch_size=8 * gpus)
    config["dataset"].pop("sft_files")
    config["training"].update(device="cuda", n_gpus_per_node=gpus, max_steps=args.steps, val_freq=-1,
                              val_before_train=False, save_checkpoint_path=str(Path(args.out) / "run"),
                              logger=["console", "file"])
    actor = config["worker"]["actor"]
    actor["model"].update(model_path=model_path, enable_gradient_checkpointing=True)
    actor["model"].pop("build_tiny_if_missing")
    actor["fsdp"]["mixed_precision_dtype"] = "bf16"
    actor["optim"]["lr"] = 1e-5
    actor["global_batch_size"] = 4 * gpus
    config["worker"]["reward"]["reward_fn_path"] = str(ROOT / "reward_fns" / "shapes.py")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--out", default="outputs/gpu_smoke")
    args = parser.parse_args()
    gpus = require_cuda()

    import yaml

    from mtrl.models.tiny import ensure_tiny_model
    from mtrl.utils.shapes_task import task_corpus

    out = Path(args.out).resolve()
    args.out = str(out)
    model_path = ensure_tiny_model(out / "model", arch="qwen2_vl", corpus=task_corpus("easy"), hidden_size=args.hidden,
                                   intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                   num_attention_heads=16, num_key_value_heads=4)
    config_file = out / "gpu_smoke.yaml"
    config_file.write_text(yaml.safe_dump(smoke_config(args, gpus, str(model_path))))
    print(f"[gpu_smoke] {gpus} GPU(s), model {model_path}, config {config_file}", flush=True)
    subprocess.run([sys.executable, "-m", "mtrl.training.training_main", f"config={config_file}"], check=True,
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    rows = [json.loads(line) for path in sorted((out / "run").rglob("metrics.jsonl"))
            for line in path.read_text().splitlines()]
    for row in rows:
        memory = {k: round(v, 2) for k, v in sorted(row.items()) if k.startswith("memory/")}
        if memory:
            print(f"[gpu_smoke] step {row.get('step')}: " + ", ".join(f"{k[7:]}={v}" for k, v in memory.items()))
    if not any(k.startswith("memory/") for row in rows for k in row):
        sys.exit("[gpu_smoke] no memory/ metrics were logged")


if __name__ == "__main__":
    main()
