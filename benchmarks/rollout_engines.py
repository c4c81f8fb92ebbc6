"""Rollout engines measured on CPU.

Default: generation on an FSDP2-sharded policy vs. the hybrid-engine pattern (gather once, generate unsharded).
Two gloo ranks, each generating for its own prompts:
  sharded   `generate(synced_gpus=True)` on the FSDP2 model: every new token all-gathers every layer.
  hybrid    the actor's weight sync (`RolloutWeightSync`) once into an unsharded copy, then generate.

    python benchmarks/rollout_engines.py [--hidden 256 --layers 4 --prompts 8 --new-tokens 32]

`--engines`: MTRL's two rollout engines, `hf` (transformers generate) and `vllm` (vLLM's V1 engine), one process,
the same tiny Qwen2 folder, the same prompts, greedy, a fixed number of new tokens; tokens/s of each (run it in the
vLLM environment: `source .ci/vllm-env.sh`).

    python benchmarks/rollout_engines.py --engines [--hidden 256 --layers 4 --prompts 8 --new-tokens 32]

Writes benchmarks/results/rollout_engines.json (`engines`: one entry per shape for --engines).
"""

import argparse
import json
import os
import statistics
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


def engines_tokens(responses: torch.Tensor, eos) -> int:
    """Generated tokens, up to and including the first EOS of each row."""
    from mtrl.workers.rollout.base import response_mask_from_ids

    return int(response_mask_from_ids(responses.clone(), eos, 0).sum())


def engine_throughput(args) -> dict:
    """hf vs vllm engine: generated tokens/s on the same prompts (median of `--repeats` alternated calls after a
    warm-up call each)."""
    import tempfile

    from mtrl.config.worker import RolloutConfig
    from mtrl.models.tiny import build_tiny_model, make_tiny_model
    from mtrl.protocol import DataBatch
    from mtrl.workers.rollout import SamplingParams
    from mtrl.workers.rollout.hf_engine import HFRolloutEngine
    from mtrl.workers.rollout.vllm_engine import VLLMRolloutEngine

    sizes = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                 num_key_value_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden)
    folder = tempfile.mkdtemp(prefix="mtrl-bench-")
    build_tiny_model("qwen2", f"{folder}/model", **sizes)
    tiny = make_tiny_model("qwen2", **sizes)
    vocab = tiny.model.config.vocab_size
    ids = torch.randint(10, vocab - 10, (args.prompts, 16), generator=torch.Generator().manual_seed(0))
    prompts = DataBatch(tensors={"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                 "position_ids": torch.arange(16).expand(args.prompts, 16).clone()},
                        non_tensors={"uid": [str(i) for i in range(args.prompts)]})
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=args.new_tokens)
    eos = [tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    engines = {
        "hf": HFRolloutEngine(lambda: make_tiny_model("qwen2", **sizes).model, tiny.model.config, eos, 0,
                              torch.device("cpu"), micro_batch_size=args.prompts),
        "vllm": VLLMRolloutEngine(f"{folder}/model", tiny.model.config, RolloutConfig(max_model_len=512),
                                  torch.float32, eos, 0, seed=0),
    }
    result, outputs, seconds = {}, {}, {name: [] for name in engines}
    for engine in engines.values():
        engine.load_weights(tiny.model.state_dict().items())
        engine.generate(prompts.select(), params)  # warm-up
    for _ in range(args.repeats):  # alternated, so that load on the machine hits both alike
        for name, engine in engines.items():
            start = time.perf_counter()
            out = engine.generate(prompts.select(), params)
            seconds[name].append(time.perf_counter() - start)
            outputs[name] = out["responses"]
    for name, times in seconds.items():
        median = statistics.median(times)
        result[f"{name}_s"] = median
        result[f"{name}_s_range"] = [min(times), max(times)]
        result[f"{name}_tokens_per_s"] = int(engines_tokens(outputs[name], eos)) / median
    result["same_tokens"] = bool(torch.equal(outputs["hf"], outputs["vllm"]))
    result["vllm_speedup"] = result["hf_s"] / result["vllm_s"]
    result["threads"] = torch.get_num_threads()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--engines", action="store_true", help="hf vs vllm engine tokens/s (vLLM environment)")
    parser.add_argument("--repeats", type=int, default=5, help="--engines: timed calls per engine")
    args = parser.parse_args()
    if args.engines:  # one entry per model / batch shape, the latest run of each
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        config = {k: v for k, v in vars(args).items() if k not in ("port", "engines")}
        runs = [r for r in previous.get("engines", []) if r["config"] != config]
        runs.append({"config": config, **engine_throughput(args)})
        previous["engines"] = runs
        RESULTS.write_text(json.dumps(previous, indent=2) + "\n")
        print(json.dumps(runs[-1], indent=2))
        return
    tmp = RESULTS.with_suffix(".tmp")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(args, str(tmp)), nprocs=2, join=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    result = {"config": vars(args), **json.loads(tmp.read_text())}
    if "engines" in previous:
        result["engines"] = previous["engines"]
    result["speedup"] = result["sharded_s"] / result["hybrid_s"]
    tmp.unlink()
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
