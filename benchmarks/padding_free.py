"""Log-prob forward (and forward+backward) throughput: padded batches vs. padding-free packing.

A batch of responses with RL-like length spread (most short, a few long) through a small Qwen2;
both paths give the same log-probs (tests/test_padding_free.py), the packed one skips the padding.

    python benchmarks/padding_free.py [--hidden 256 --layers 4 --rows 32 --repeats 3]

Writes benchmarks/results/padding_free.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mtrl.models.attention import enable_padding_free_attention
from mtrl.models.packing import forward_micro_batch

RESULTS = Path(__file__).parent / "results" / "padding_free.json"


def make_batch(rows: int, prompt: int, response: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    # Long-tailed response lengths, as in RL rollouts: most responses stop early.
    lengths = (torch.distributions.Exponential(4.0 / response).sample((rows,)).clamp(1, response)).long()
    prompt_lengths = torch.randint(prompt // 2, prompt + 1, (rows,), generator=g)
    prompt_mask = (torch.arange(prompt) >= prompt - prompt_lengths[:, None]).long()
    response_mask = (torch.arange(response) < lengths[:, None]).long()
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    input_ids = torch.randint(1, vocab, attention_mask.shape, generator=g) * attention_mask
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}, response


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab = 4096
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=args.hidden,
                                         intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                         num_attention_heads=8, num_key_value_heads=4,
                                         max_position_embeddings=1024))
    enable_padding_free_attention(model)
    batch, response = make_batch(args.rows, args.prompt, args.response, vocab)
    real_tokens = int(batch["attention_mask"].sum())
    padded_tokens = batch["attention_mask"].numel()

    def forward(padding_free: bool):
        with torch.no_grad():
            forward_micro_batch(model, batch, None, response, padding_free=padding_free)

    def train_step(padding_free: bool):
        out = forward_micro_batch(model, batch, None, response, padding_free=padding_free)
        out["log_probs"].sum().backward()
        model.zero_grad(set_to_none=True)

    result = {"config": vars(args), "real_tokens": real_tokens, "padded_tokens": padded_tokens,
              "padding_fraction": 1 - real_tokens / padded_tokens}
    for name, fn in (("forward", forward), ("forward_backward", train_step)):
        padded = timed(lambda: fn(False), args.repeats)
        packed = timed(lambda: fn(True), args.repeats)
        result[name] = {"padded_s": padded, "padding_free_s": packed, "speedup": padded / packed,
                        "padding_free_real_tokens_per_s": real_tokens / packed,
                        "padded_real_tokens_per_s": real_tokens / padded}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
