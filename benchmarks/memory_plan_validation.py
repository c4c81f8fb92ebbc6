"""The memory planner (mtrl/tools/memory_plan.py) against memory measured on CPU.

    python benchmarks/memory_plan_validation.py                      # 20M and 80M, checkpointing off and on
    python benchmarks/memory_plan_validation.py --cases 20M --json out.json

For each case a tiny-builder Qwen2.5-VL model of that size is written once, then a fresh worker process
(gloo, world size 1, fp32, FSDP2 via the trainer's own `build_fsdp_model`, AdamW, `ParallelPolicyAgent`) runs
real PPO updates (text-only rows, or rows with one image each): one to create the optimizer state, then the measured one. Measured peak =
the bytes of the parameters and AdamW state that exist before the update (counted exactly) + the rise of the
process's peak RSS over the measured update (VmHWM, reset just before it through /proc/self/clear_refs). The
worker runs with `MALLOC_MMAP_THRESHOLD_=65536`, so every tensor larger than 64 KB is its own mapping and freed
memory leaves the RSS at once: the RSS then follows the live tensors. The planner's CPU estimate for the same
config is the larger of its `update` and `step` columns (no rollout, no reference: the update alone).
Results: benchmarks/results/memory_plan_validation.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> tiny-builder sizes (bpe vocabulary: ~700 tokens, so the vocabulary logits are small).
SIZES = {
    "20M": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=2, vision_hidden_size=256, vision_intermediate_size=512, vision_depth=4,
                vision_num_heads=4),
    "80M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=7, num_attention_heads=16,
                num_key_value_heads=4, vision_hidden_size=256, vision_intermediate_size=512, vision_depth=4,
                vision_num_heads=4),
}
ROWS, MICRO_BATCH, SEQ = 16, 8, 128  # two micro-batches of 8 rows x 128 tokens = 1024 tokens
# With an image: each row's prompt starts with one 224 x 224 image (16 x 16 patches of 14 pixels, 64 tokens after
# the 2 x 2 merge), so the vision tower runs on 8 x 256 patches per micro-batch.
IMAGE_GRID = 16
# (size, gradient checkpointing, image per row)
CASES = [("20M", False, False), ("20M", True, False), ("20M", False, True), ("80M", False, False),
         ("80M", True, False)]


def lengths(images: bool):
    """(prompt, response) tokens of every row."""
    return (96, 32) if images else (64, 64)


def plan_config(model_dir: str, checkpointing: bool, images: bool = False):
    """The trainer config of the measured update (what the planner is asked about)."""
    from mtrl.training.training_config import load_config

    prompt, response = lengths(images)
    pixels = (IMAGE_GRID * 14) ** 2
    return load_config([
        "dataset.train_files=unused.jsonl", f"dataset.max_prompt_length={prompt}",
        f"dataset.max_response_length={response}", f"dataset.rollout_batch_size={ROWS}",
        f"dataset.min_pixels={pixels}", f"dataset.max_pixels={pixels}",
        "training.device=cpu", "training.n_gpus_per_node=1", "optimization.advantage_estimator=grpo",
        "optimization.disable_divergence=true", "worker.rollout.n=2", f"worker.actor.global_batch_size={ROWS // 2}",
        f"worker.actor.model.model_path={model_dir}", "worker.actor.fsdp.mixed_precision_dtype=fp32",
        f"worker.actor.model.enable_gradient_checkpointing={str(checkpointing).lower()}",
        "worker.actor.dynamic_batching=false", f"worker.actor.micro_batch_size_per_device_for_update={MICRO_BATCH}",
    ])


def estimate(model_dir: str, checkpointing: bool, images: bool = False) -> dict:
    from mtrl.tools.memory_plan import GB, plan_memory, read_architecture

    plan = plan_memory(plan_config(model_dir, checkpointing, images), read_architecture(model_dir), device="cpu",
                       images_per_sample=1 if images else 0)
    phase = max(("update", "step"), key=plan.total)
    return {"params": plan.arch.params, "estimate_gb": plan.total(phase) / GB, "estimate_phase": phase,
            "components_gb": {r.component: r.bytes.get(phase, 0.0) / GB for r in plan.rows if r.bytes.get(phase)}}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def worker(model_dir: str, checkpointing: bool, images: bool = False) -> dict:
    """One real update in this process (world size 1); its measured peak memory."""
    import torch
    import torch.distributed as dist

    from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
    from mtrl.config.worker import FSDPConfig
    from mtrl.optimization.config import OptimizationConfig
    from mtrl.protocol import DataBatch
    from mtrl.workers.actor.actor_worker import sequence_position_ids
    from mtrl.workers.fsdp_utils import build_optimizer
    from mtrl.workers.fsdp_worker import build_fsdp_model

    torch.set_num_threads(2)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    actor = plan_config(model_dir, checkpointing, images).worker.actor
    model = build_fsdp_model(model_dir, fsdp=FSDPConfig(mixed_precision_dtype="fp32"), device_type="cpu",
                             trainable=True, gradient_checkpointing=checkpointing, padding_free=True)
    optimizer = build_optimizer(model, actor.optim)
    agent = ParallelPolicyAgent(actor, model, torch.device("cpu"), optimizer)
    g = torch.Generator().manual_seed(0)
    prompt, response = lengths(images)
    input_ids = torch.randint(0, 600, (ROWS, prompt + response), generator=g)  # ordinary (non-special) tokens
    vision = None
    if images:
        c = model.config
        image_tokens = IMAGE_GRID ** 2 // 4
        input_ids[:, 0], input_ids[:, image_tokens + 1] = c.vision_start_token_id, c.vision_end_token_id
        input_ids[:, 1:image_tokens + 1] = c.image_token_id
        patch_dim = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
        vision = [{"pixel_values": torch.randn(IMAGE_GRID ** 2, patch_dim, generator=g),
                   "image_grid_thw": torch.tensor([[1, IMAGE_GRID, IMAGE_GRID]])} for _ in range(ROWS)]
    attention_mask = torch.ones_like(input_ids)
    batch = DataBatch(tensors={
        "input_ids": input_ids, "attention_mask": attention_mask, "responses": input_ids[:, prompt:],
        "position_ids": sequence_position_ids(model.config, input_ids, attention_mask, vision),
        "response_mask": torch.ones(ROWS, response), "old_log_probs": -6.0 * torch.ones(ROWS, response),
        "advantages": torch.randn(ROWS, response, generator=g)},
        non_tensors={"multi_modal_inputs": vision} if images else {})
    opt = OptimizationConfig(disable_divergence=True)
    agent.update_policy(batch, 1.0, opt, ROWS)  # creates the AdamW state
    static = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
                 for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v))
    before_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    agent.update_policy(batch, 1.0, opt, ROWS)
    rise = (_status_kb("VmHWM") - before_kb) * 1024
    dist.destroy_process_group()
    gb = 1024 ** 3
    return {"measured_gb": (static + state + rise) / gb, "params_gb": static / gb, "adamw_gb": state / gb,
            "update_rise_gb": rise / gb}


def run_case(model_dir: str, checkpointing: bool, images: bool = False) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    flags = (["--checkpointing"] if checkpointing else []) + (["--images"] if images else [])
    out = subprocess.run([sys.executable, __file__, "--worker", model_dir] + flags,
                         env=env, capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    result = {**estimate(model_dir, checkpointing, images), **measured, "gradient_checkpointing": checkpointing,
              "images": images}
    result["ratio"] = result["estimate_gb"] / result["measured_gb"]
    return result


def build_model(name: str, folder: Path) -> str:
    from mtrl.models.tiny import build_tiny_model

    path = folder / f"tiny_{name}"
    if not (path / "config.json").is_file():
        build_tiny_model("qwen2_5_vl", path, **SIZES[name])
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=None, help="sizes to run (default: all of SIZES)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/memory_plan_validation.json"))
    parser.add_argument("--model-dir", default=None, help="where the tiny models are built (default: a temp dir)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--images", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpointing, args.images)))
        return 0
    folder = Path(args.model_dir or tempfile.mkdtemp(prefix="mtrl-memplan-"))
    results = []
    for name, ckpt, images in CASES:
        if args.cases and name not in args.cases:
            continue
        r = {"case": name, **run_case(build_model(name, folder), ckpt, images)}
        results.append(r)
        print(f"{name} ({r['params'] / 1e6:.1f}M params), checkpointing={ckpt}, images={images}: estimate {r['estimate_gb']:.3f} GB "
              f"({r['estimate_phase']}), measured {r['measured_gb']:.3f} GB (params {r['params_gb']:.3f} + AdamW "
              f"{r['adamw_gb']:.3f} + update rise {r['update_rise_gb']:.3f}): ratio {r['ratio']:.3f}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
