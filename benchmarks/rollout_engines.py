"""Generation on an FSDP2-sharded policy vs. the hybrid-engine pattern (gather once, generate unsharded).

Two gloo ranks on CPU, each generating for its own prompts:
  sharded   `generate(synced_gpus=True)` on the FSDP2 model: every new token all-gathers every layer.
  hybrid    the actor's weight sync (`RolloutWeightSync`) once into an unsharded copy, then generate.

    python benchmarks/rollout_engines.py [--hidden 256 --layers 4 --prompts 8 --new-tokens 32]

Writes benchmarks/results/rollout_engines.json.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen2Config, Qwen2ForCausalLM

from mtrl.config.worker import FSDPConfig, ModelConfig
from mtrl.workers.fsdp_utils import apply_fsdp2
from mtrl.workers.rollout.weight_sync import RolloutWeightSync

RESULTS = Path(__file__).parent / "results" / "rollout_engines.json"


def build(args) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=2048, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=512)
    return Qwen2ForCausalLM(config).eval()


def generate(model, prompts, args, synced: bool) -> torch.Tensor:
    return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, synced_gpus=synced,
                          pad_token_id=0, eos_token_id=None)


def worker(rank: int, args, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    sharded = build(args)
    apply_fsdp2(sharded, FSDPConfig(mixed_precision_dtype="fp32"), "cpu", list(sharded.model.layers))
    prompts = torch.randint(1, 2048, (args.prompts, 16), generator=torch.Generator().manual_seed(rank))
    timings = {}
    with torch.no_grad():
        generate(sharded, prompts[:1], args, synced=True)  # warm-up
        dist.barrier()
        start = time.perf_counter()
        out_sharded = generate(sharded, prompts, args, synced=True)
        dist.barrier()
        timings["sharded_s"] = time.perf_counter() - start

        start = time.perf_counter()
        copy = build(args)
        copy.load_state_dict(dict(RolloutWeightSync(sharded, ModelConfig()).weights()))
        gathered = time.perf_counter()
        out_hybrid = generate(copy, prompts, args, synced=False)
        dist.barrier()
        timings["hybrid_s"] = time.perf_counter() - start
        timings["hybrid_gather_s"] = gathered - start
    timings["same_tokens"] = bool(torch.equal(out_sharded, out_hybrid))
    if rank == 0:
        Path(out_file).write_text(json.dumps(timings))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=29611)
    args = parser.parse_args()
    tmp = RESULTS.with_suffix(".tmp")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(args, str(tmp)), nprocs=2, join=True)
    result = {"config": vars(args), **json.loads(tmp.read_text())}
    result["speedup"] = result["sharded_s"] / result["hybrid_s"]
    tmp.unlink()
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
