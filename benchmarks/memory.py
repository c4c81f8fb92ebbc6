"""Host memory of sharded loading, training and the streamed weight sync, with 1 vs 2 workers (issue 14).

A random Qwen2 of ~300M parameters from the tiny builder (`mtrl.models.tiny`, bigger sizes) is loaded by real
Ray workers with `build_fsdp_model` (meta device on every rank, rank 0 reads the checkpoint, FSDP2 over gloo),
trained a few AdamW steps on random tokens, then synced into the `hf` rollout engine's bf16 copy. Per worker:
the peak RSS (VmHWM) after loading and after training, and the RSS a sync adds on top of the resident engine
copy (sampled every millisecond), streamed (`RolloutWeightSync.weights`) vs the old whole-state-dict gather.
The driver's peak RSS too. The model folder is written by a separate process so the driver stays small.

    python benchmarks/memory.py [--hidden 1024 --layers 24 --steps 2]

Writes benchmarks/results/memory.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from mtrl.single_controller.base import Dispatch, Worker, register

RESULTS = Path(__file__).parent / "results" / "memory.json"
GB = 2**30


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB


def peak_rss_gb() -> float:
    """VmHWM: the process's peak resident memory so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def extra_rss_during(fn) -> float:
    """The most RSS `fn()` adds above what the process held when it started (GiB), sampled every ms."""
    baseline, peak, done = rss_gb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_gb())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], rss_gb()) - baseline


class MemoryWorker(Worker):
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def run(self, model_path: str, steps: int, seq_len: int) -> dict:
        import gc

        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from mtrl.config.worker import FSDPConfig, ModelConfig, OptimConfig
        from mtrl.models.loader import load_model
        from mtrl.workers.fsdp_utils import build_optimizer
        from mtrl.workers.fsdp_worker import build_fsdp_model
        from mtrl.workers.rollout.hf_engine import HFRolloutEngine
        from mtrl.workers.rollout.weight_sync import RolloutWeightSync

        self.init_distributed()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world_size))
        out = {"rank": self.rank, "start_rss_gb": rss_gb()}
        start = time.perf_counter()
        model = build_fsdp_model(model_path, fsdp=FSDPConfig(mixed_precision_dtype="fp32"), device_type="cpu",
                                 trainable=True)
        gc.collect()
        out.update(load_s=time.perf_counter() - start, load_peak_rss_gb=peak_rss_gb(), after_load_rss_gb=rss_gb())
        numel = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(model, OptimConfig(lr=1e-5))
        generator = torch.Generator().manual_seed(self.rank)
        start = time.perf_counter()
        for _ in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=generator)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        out.update(step_s=(time.perf_counter() - start) / steps, train_peak_rss_gb=peak_rss_gb(),
                   after_train_rss_gb=rss_gb())

        sync = RolloutWeightSync(model, ModelConfig(), dtype=torch.bfloat16)
        engine = HFRolloutEngine(lambda: load_model(model_path, dtype=torch.bfloat16, empty=True), model.config,
                                 [0], 0, torch.device("cpu"))
        out["first_sync_extra_gb"] = extra_rss_during(lambda: sync.sync_to(engine))  # incl. the engine's copy
        out["streamed_sync_extra_gb"] = extra_rss_during(lambda: sync.sync_to(engine))  # engine resident

        def full_gather():
            weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            engine.model.load_state_dict(weights, strict=False)

        out["full_gather_sync_extra_gb"] = extra_rss_during(full_gather)
        largest = max(p.numel() for p in model.parameters())
        out.update(params=numel, model_fp32_gb=numel * 4 / GB, model_bf16_gb=numel * 2 / GB,
                   largest_tensor_fp32_gb=largest * 4 / GB, largest_tensor_bf16_gb=largest * 2 / GB,
                   end_peak_rss_gb=peak_rss_gb())
        return out


def build_model(args, folder: str) -> None:
    """The random model, written by a child process (its ~1 GB init must not count as the driver's)."""
    subprocess.run([sys.executable, "-m", "mtrl.models.tiny", "--arch", "qwen2", "--out", folder,
                    "--hidden-size", str(args.hidden), "--intermediate-size", str(args.intermediate),
                    "--num-hidden-layers", str(args.layers), "--num-attention-heads", str(args.heads),
                    "--num-key-value-heads", str(args.kv_heads)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    import ray

    from mtrl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup, init_ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    result = {"config": vars(args), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="mtrl_memory_") as folder:
        build_model(args, folder)
        init_ray(num_cpus=4)
        for workers in (1, 2):
            group = RayWorkerGroup(RayResourcePool([workers], use_gpu=False), RayClassWithInitArgs(MemoryWorker),
                                   name_prefix=f"mem{workers}")
            result["runs"][f"{workers}_workers"] = group.run(folder, args.steps, args.seq_len)
            group.shutdown()
        ray.shutdown()
    result["driver_peak_rss_gb"] = peak_rss_gb()
    one, two = result["runs"]["1_workers"][0], result["runs"]["2_workers"]

    def above_start(runs, key):  # what the model costs, without the ~0.8 GB of imports every worker starts with
        return [r[key] - r["start_rss_gb"] for r in runs]

    result["summary"] = {
        "params": one["params"],
        "worker_start_rss_gb": one["start_rss_gb"],
        "load_peak_rss_above_start_gb": {"1 worker": above_start([one], "load_peak_rss_gb"),
                                         "2 workers": above_start(two, "load_peak_rss_gb")},
        "train_peak_rss_above_start_gb": {"1 worker": above_start([one], "train_peak_rss_gb"),
                                          "2 workers": above_start(two, "train_peak_rss_gb")},
        "sync_extra_gb": {"streamed": [r["streamed_sync_extra_gb"] for r in two],
                          "full_gather": [r["full_gather_sync_extra_gb"] for r in two],
                          "model_bf16_gb": one["model_bf16_gb"], "model_fp32_gb": one["model_fp32_gb"],
                          "largest_tensor_bf16_gb": one["largest_tensor_bf16_gb"]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
