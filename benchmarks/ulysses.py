"""Step time with Ulysses sequence parallelism (ulysses_size=2) vs without (1), two gloo ranks on CPU.

Both ranks shard one Qwen2 model with FSDP2 and run the actor's passes on their own rows: the log-prob
pass (no grad) and one update (forward + backward over every micro-batch). With ulysses_size=2 the two
ranks run each other's micro-batches together, each holding half of every sequence. A CPU has no fast
interconnect, so this is a sanity check (same numbers, bounded overhead), not a GPU speed figure.

    python benchmarks/ulysses.py [--hidden 256 --layers 4 --rows 8 --seq 512 --repeats 3]

Writes benchmarks/results/ulysses.json.
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

from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
from mtrl.config.worker import ActorConfig, FSDPConfig
from mtrl.models.attention import enable_padding_free_attention
from mtrl.models.ulysses import SequenceParallel
from mtrl.optimization.config import OptimizationConfig
from mtrl.protocol import DataBatch
from mtrl.workers.fsdp_utils import apply_fsdp2

RESULTS = Path(__file__).parent / "results" / "ulysses.json"


def build(args) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=2048, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=4 * args.seq)
    model = Qwen2ForCausalLM(config)
    enable_padding_free_attention(model, backend="torch")
    return model


def rows(args, rank: int) -> DataBatch:
    """Full-length rows (prompt seq/2, response seq/2) with random old log-probs and advantages."""
    g = torch.Generator().manual_seed(rank)
    response = args.seq // 2
    ids = torch.randint(1, 2048, (args.rows, args.seq), generator=g)
    mask = torch.ones(args.rows, args.seq, dtype=torch.long)
    response_mask = torch.ones(args.rows, response)
    return DataBatch(tensors={
        "input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(args.seq).expand(args.rows, -1),
        "responses": ids[:, -response:], "response_mask": response_mask,
        "old_log_probs": -7.0 + 0.1 * torch.randn(args.rows, response, generator=g),
        "advantages": torch.randn(args.rows, 1, generator=g).expand(-1, response).clone()})


def worker(rank: int, args, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = build(args)
    apply_fsdp2(model, FSDPConfig(mixed_precision_dtype="fp32"), "cpu", list(model.model.layers))
    batch = rows(args, rank)
    config = ActorConfig(dynamic_batching=False, micro_batch_size_per_device_for_update=1,
                         micro_batch_size_per_device_for_experience=1)
    results = {}
    for size in (1, 2):
        agent = ParallelPolicyAgent(config, model, torch.device("cpu"), torch.optim.SGD(model.parameters(), lr=0.0),
                                    SequenceParallel.create(size))
        times = {"log_probs_s": [], "update_s": []}
        for repeat in range(args.repeats + 1):  # the first round warms up
            dist.barrier()
            start = time.perf_counter()
            log_probs = agent.compute_log_probs(batch, 1.0)["log_probs"]
            dist.barrier()
            middle = time.perf_counter()
            agent.update_policy(batch, 1.0, OptimizationConfig(), mini_batch_size=len(batch))
            dist.barrier()
            if repeat:
                times["log_probs_s"].append(middle - start)
                times["update_s"].append(time.perf_counter() - middle)
        results[f"ulysses_{size}"] = {k: min(v) for k, v in times.items()}
        results[f"ulysses_{size}"]["log_prob_sum"] = float(log_probs.sum())
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8, help="rows per rank")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=29613)
    args = parser.parse_args()
    tmp = RESULTS.with_suffix(".tmp")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(args, str(tmp)), nprocs=2, join=True)
    result = {"config": vars(args), **json.loads(tmp.read_text())}
    for key in ("log_probs_s", "update_s"):
        result[f"{key[:-2]}_ratio_2_vs_1"] = result["ulysses_2"][key] / result["ulysses_1"][key]
    tmp.unlink()
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
