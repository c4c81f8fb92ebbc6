"""Update-phase FLOP/s of a Qwen2-VL (default the ~30M-parameter one) against this machine's fp32 matmul peak.

    python benchmarks/update_flops.py [--model big|tiny] [--shape 16x8x64] [--repeats 3] [--profile]

Peak: the best of a few ``torch.mm`` of (n, n) fp32 squares (2 n^3 FLOPs each), with the same thread
count as the update. Update: one RL policy update on one micro-batch of P x G rows -- the worker's
``forward_micro_batch`` (log-probs and entropy), a token-weighted loss, backward, AdamW step -- timed
padding-free, padded and with shared prompts (mtrl.models.shared_prompts: each prompt once for its G
responses), interleaved (A B C A B C ...), wall and process CPU time, in one process.

The batch has the compare_trl shapes: each row a prompt of one 56x56 image (4 merged vision tokens)
and ``--prompt-text`` text tokens, then a response of between T/2 and T tokens (seeded).

FLOPs are the *model* FLOPs of the real tokens (padding not counted, so the padding-free and padded paths are
charged the same useful work; the shared-prompt path is charged what it executes, `shared_prompt_flops`):
6 x matmul parameters x the tokens that pass them, plus attention:

* decoder layers' linear weights x T (real tokens of the packed batch),
* the LM head (V x hidden) x N (response tokens; only those positions are projected),
* the vision tower's linear weights x its patches,
* attention: 6 x layers x heads x head_dim x sum_i L_i^2 (the causal half of QK^T and AV, 2 FLOPs
  per multiply-add, backward twice the forward).

Both per wall second and per process CPU second (update and peak alike): on a machine shared with
other jobs the wall-clock ratio is meaningless, the CPU-time one stays close to the quiet-machine ratio.

Writes benchmarks/results/update_flops.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_trl import BIG_SIZES, RESULTS  # noqa: E402 (the one home of the ~30M model's sizes)

from mtrl.models.attention import enable_padding_free_attention  # noqa: E402
from mtrl.models.packing import forward_micro_batch  # noqa: E402
from mtrl.models.shared_prompts import forward_shared_prompts, shared_prompt_plan  # noqa: E402
from mtrl.models.tiny import make_tiny_model  # noqa: E402
from mtrl.utils.rope import compute_position_ids  # noqa: E402

IMAGE_GRID = (1, 4, 4)  # a 56x56 image in 14-pixel patches; 2x2 merge -> 4 placeholder tokens


def matmul_peak(n: int = 2048, tries: int = 5) -> Dict[str, float]:
    """Best fp32 FLOP/s of (n, n) @ (n, n) over a few tries (after a warm-up), per wall second and per
    process CPU second (the latter is what a loaded machine leaves comparable)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(tries):
        start, cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu)
    return {"n": n, "tries": tries, "best_s": best, "flops_per_s": 2 * n ** 3 / best,
            "best_cpu_s": best_cpu, "flops_per_cpu_s": 2 * n ** 3 / best_cpu}


def make_batch(config, P: int, G: int, T: int, prompt_text: int, seed: int = 0):
    """P x G rows in the DATA_LAYOUT format (left-padded prompt, right-padded response, mRoPE ids)."""
    g = torch.Generator().manual_seed(seed)
    patch = config.vision_config.patch_size
    n_patches = IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2]
    vision = [config.vision_start_token_id] + [config.image_token_id] * (n_patches // 4) + [config.vision_end_token_id]
    prompt_len = len(vision) + prompt_text
    B, L = P * G, prompt_len + T
    input_ids = torch.full((B, L), config.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    position_ids = torch.zeros(B, 3, L, dtype=torch.long)
    mm: List[dict] = []
    for p in range(P):
        text = torch.randint(10, 500, (prompt_text,), generator=g).tolist()
        image = {"pixel_values": torch.randn(n_patches, 3 * 2 * patch * patch, generator=g),
                 "image_grid_thw": torch.tensor([IMAGE_GRID])}
        for _ in range(G):
            n_resp = int(torch.randint(T // 2, T + 1, (1,), generator=g))
            row = torch.tensor(text[:1] + vision + text[1:] + torch.randint(10, 500, (n_resp,), generator=g).tolist())
            i = len(mm)
            input_ids[i, :prompt_len + n_resp] = row  # the prompt fills its slot; the response starts at prompt_len
            attention_mask[i, :prompt_len + n_resp] = 1
            position_ids[i, :, :prompt_len + n_resp] = compute_position_ids(config, row, image["image_grid_thw"])
            mm.append(image)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}, mm


def model_flops(model, tensors, response_length: int) -> Dict[str, float]:
    """Model FLOPs of one forward + backward over the batch's real tokens (see the module docstring)."""
    config = model.config.text_config
    mask = tensors["attention_mask"]
    tokens = int(mask.sum())
    response_tokens = int(mask[:, -response_length:].sum())
    lengths = mask.sum(1).double()

    def linear_params(module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    decoder = linear_params(model.model.language_model.layers)
    head = model.lm_head.weight.numel()
    vision = linear_params(model.model.visual)
    patches = sum(int(torch.tensor(IMAGE_GRID).prod()) for _ in range(mask.shape[0]))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads_width = config.num_attention_heads * head_dim
    attention = 6 * config.num_hidden_layers * heads_width * float((lengths ** 2).sum())
    parts = {"decoder_linear": 6 * decoder * tokens, "lm_head": 6 * head * response_tokens,
             "vision_linear": 6 * vision * patches, "attention": attention}
    return {**parts, "total": sum(parts.values()), "tokens": tokens, "response_tokens": response_tokens,
            "padded_tokens": mask.numel()}


def shared_prompt_flops(model, tensors, mm, response_length: int) -> Dict[str, float]:
    """Model FLOPs the shared-prompt forward executes (padding included): each distinct prompt once (stage 1,
    its vision patches too), every response's R' - 1 inputs on its prompt's keys (stage 2)."""
    config = model.config.text_config
    plan = shared_prompt_plan(tensors, mm, response_length, padding_free=True)
    prompts, rows = len(plan.first_rows), len(plan.group)
    prompt_len = tensors["input_ids"].shape[1] - response_length - plan.prompt_start
    queries = plan.response_width - 1  # stage 2's inputs per row

    def linear_params(module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    # 12 x width x attended (query, key) pairs per layer: the plain count's 6 x width x L^2 is its L^2 / 2 pairs.
    pairs = prompts * prompt_len ** 2 / 2 + rows * (queries * prompt_len + queries ** 2 / 2)
    parts = {"decoder_linear": 6 * linear_params(model.model.language_model.layers) * (prompts * prompt_len + rows * queries),
             "lm_head": 6 * model.lm_head.weight.numel() * (prompts + rows * queries),
             "vision_linear": 6 * linear_params(model.model.visual) * prompts * int(torch.tensor(IMAGE_GRID).prod()),
             "attention": 12 * config.num_hidden_layers * width * pairs}
    return {**parts, "total": sum(parts.values())}


def update_step(model, optimizer, tensors, mm, T: int, path: str) -> None:
    if path == "shared_prompts":
        out = forward_shared_prompts(model, tensors, mm, T, shared_prompt_plan(tensors, mm, T, padding_free=True),
                                     return_entropy=True)
    else:
        out = forward_micro_batch(model, tensors, mm, T, padding_free=path == "padding_free", return_entropy=True)
    mask = tensors["attention_mask"][:, -T:]
    loss = -(out["log_probs"] * mask).sum() / mask.sum()  # token-mean policy-gradient loss, advantage 1
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["big", "tiny"], default="big")
    p.add_argument("--shape", default="16x8x64", help="P x G x T")
    p.add_argument("--prompt-text", type=int, default=40, help="text tokens per prompt (besides the image)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. the cores)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one update per path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    P, G, T = (int(x) for x in args.shape.split("x"))
    torch.manual_seed(0)
    model = make_tiny_model("qwen2_vl", **(BIG_SIZES if args.model == "big" else {})).model.train()
    enable_padding_free_attention(model)
    params = sum(x.numel() for x in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    tensors, mm = make_batch(model.config, P, G, T, args.prompt_text)
    flops = model_flops(model, tensors, T)
    executed = {"padding_free": flops["total"], "padded": flops["total"],
                "shared_prompts": shared_prompt_flops(model, tensors, mm, T)["total"]}
    peak_before = matmul_peak()

    paths = ("padding_free", "padded", "shared_prompts")
    times: Dict[str, Dict[str, List[float]]] = {name: {"wall_s": [], "cpu_s": []} for name in paths}
    for name in paths:  # warm-up (allocator, AdamW state)
        update_step(model, optimizer, tensors, mm, T, name)
    for _ in range(args.repeats):
        for name in paths:
            wall, cpu = time.perf_counter(), time.process_time()
            update_step(model, optimizer, tensors, mm, T, name)
            times[name]["wall_s"].append(time.perf_counter() - wall)
            times[name]["cpu_s"].append(time.process_time() - cpu)
    peak_after = matmul_peak()
    peak = max(peak_before, peak_after, key=lambda r: r["flops_per_s"])
    peak["flops_per_cpu_s"] = max(peak_before["flops_per_cpu_s"], peak_after["flops_per_cpu_s"])

    results: Dict[str, Any] = {}
    for name, t in times.items():
        best, best_cpu = min(t["wall_s"]), min(t["cpu_s"])
        work = executed[name]  # the FLOPs this path runs (the shared-prompt path runs fewer for the same update)
        results[name] = {**t, "median_wall_s": statistics.median(t["wall_s"]), "best_wall_s": best,
                         "executed_flops": work, "flops_per_s_best": work / best,
                         "fraction_of_peak_best": work / best / peak["flops_per_s"],
                         "flops_per_cpu_s_best": work / best_cpu,
                         "fraction_of_peak_per_cpu_s": work / best_cpu / peak["flops_per_cpu_s"],
                         "speedup_vs_padding_free": min(times["padding_free"]["wall_s"]) / best}
    payload = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "load": os.getloadavg(), "model": args.model,
               "params": params, "shape": {"P": P, "G": G, "T": T, "prompt_text": args.prompt_text},
               "flops_per_update": flops, "matmul_peak": peak, "results": results,
               "command": "python benchmarks/update_flops.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "update_flops.json"), "w") as f:
        json.dump(payload, f, indent=2)
    print(f"{args.model} Qwen2-VL {params / 1e6:.1f}M params, P{P}xG{G}xT{T}: {flops['tokens']} real tokens "
          f"({flops['padded_tokens']} padded), {flops['total'] / 1e9:.1f} GFLOP per update; fp32 matmul peak "
          f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s, {peak['flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU s "
          f"({torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f})")
    for name, r in results.items():
        print(f"  {name} ({r['executed_flops'] / 1e9:.1f} GFLOP, {r['speedup_vs_padding_free']:.2f}x padding-free): "
              f"wall {' '.join(f'{x:.3f}' for x in r['wall_s'])} s, cpu "
              f"{' '.join(f'{x:.3f}' for x in r['cpu_s'])} s; best {r['flops_per_s_best'] / 1e9:.1f} GFLOP/s = "
              f"{100 * r['fraction_of_peak_best']:.0f}% of peak; per CPU s {r['flops_per_cpu_s_best'] / 1e9:.1f} = "
              f"{100 * r['fraction_of_peak_per_cpu_s']:.0f}% of peak")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

        for name in paths:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                update_step(model, optimizer, tensors, mm, T, name)
            print(f"=== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
