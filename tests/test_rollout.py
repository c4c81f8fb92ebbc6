"""The HF rollout engine: weight sync, n samples per prompt, EOS masking, release and re-sync."""

import numpy as np
import pytest
import torch
from PIL import Image

from mtrl.models.tiny import make_tiny_model
from mtrl.utils.dataset import RLDataset
from mtrl.workers.rollout import SamplingParams, check_engine_available, response_mask_from_ids
from mtrl.workers.rollout.hf_engine import HFRolloutEngine


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("qwen2_vl", seed=0)


@pytest.fixture(scope="module")
def prompts(tiny):
    rng = np.random.default_rng(0)
    rows = [{"prompt": "<image>What colour is the circle?", "answer": "red",
             "images": [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))]},
            {"prompt": "How many squares are there?", "answer": "2", "images": []}]
    data = RLDataset.from_rows(rows, tiny.tokenizer, tiny.processor, tiny.model.config,
                               min_pixels=3136, max_pixels=3136)
    return data.collate([data[0], data[1]])


def engine_for(tiny):
    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return HFRolloutEngine(lambda: make_tiny_model("qwen2_vl", seed=123).model, tiny.model.config, [eos],
                           tiny.tokenizer.pad_token_id, torch.device("cpu"), micro_batch_size=3)


def test_response_mask_stops_after_first_eos():
    responses = torch.tensor([[5, 9, 7, 9], [9, 1, 2, 3], [1, 2, 3, 4]])
    mask = response_mask_from_ids(responses, [9], pad_token_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert responses.tolist() == [[5, 9, 0, 0], [9, 0, 0, 0], [1, 2, 3, 4]]  # after EOS: padding


def test_generate_uses_the_synced_weights_and_survives_release(tiny, prompts):
    engine = engine_for(tiny)
    engine.load_weights(tiny.model.state_dict().items())
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    first = engine.generate(prompts.select(), greedy)
    expected = tiny.model.generate(input_ids=prompts["input_ids"][1:], attention_mask=prompts["attention_mask"][1:],
                                   max_new_tokens=6, do_sample=False, eos_token_id=engine.eos_token_ids,
                                   pad_token_id=engine.pad_token_id, suppress_tokens=engine.suppress_tokens)
    # Row 1 is text-only: the engine's copy must match the source model token for token.
    n = expected.shape[1] - prompts["input_ids"].shape[1]
    assert first["responses"][1, :n].tolist() == expected[0, prompts["input_ids"].shape[1]:].tolist()
    engine.release()
    assert all(p.is_meta for p in engine.model.parameters())
    engine.load_weights(tiny.model.state_dict().items())
    again = engine.generate(prompts.select(), greedy)
    assert torch.equal(again["responses"], first["responses"])


def test_n_samples_interleaved_without_vision_tokens(tiny, prompts):
    engine = engine_for(tiny)
    engine.load_weights(tiny.model.state_dict().items())
    torch.manual_seed(0)
    out = engine.generate(prompts.select(), SamplingParams(n=3, temperature=1.0, max_new_tokens=5))
    assert len(out) == 6 and list(out["uid"]) == [prompts["uid"][0]] * 3 + [prompts["uid"][1]] * 3
    assert torch.equal(out["prompts"], out["input_ids"])
    assert out["responses"].shape == out["response_mask"].shape and out["responses"].shape[1] <= 5
    assert not torch.isin(out["responses"], torch.tensor(engine.suppress_tokens)).any()


def test_vllm_without_vllm_fails_clearly():
    with pytest.raises(RuntimeError, match="worker.rollout.name=vllm"):
        check_engine_available("vllm")
    check_engine_available("hf")


def test_sampling_is_seeded_per_response_not_per_micro_batch(tiny, prompts):
    """The same (seed, prompt uid, sample k) gives the same response whatever rows share its micro-batch:
    what makes generation independent of the worker count."""
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=11)
    outputs = []
    for micro in (1, 4):
        engine = engine_for(tiny)
        engine.micro_batch_size = micro
        engine.load_weights(tiny.model.state_dict().items())
        outputs.append(engine.generate(prompts.select(), params))
    assert torch.equal(outputs[0]["responses"], outputs[1]["responses"])
    # Prompt 1 alone (as on another worker) gets the same three responses as in the batch of two.
    alone = engine.generate(prompts.index([1]), params)
    assert torch.equal(alone["responses"], outputs[1]["responses"][3:, :alone["responses"].shape[1]])
    other_seed = engine.generate(prompts.select(), SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=12))
    assert not torch.equal(other_seed["responses"], outputs[1]["responses"])
    # The three samples of a prompt are not copies of each other.
    assert len({tuple(r.tolist()) for r in outputs[1]["responses"][:3]}) > 1


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 3, 1.0), (1.3, -1, 0.8), (1.0, 4, 0.6)])
def test_seeded_sampling_draws_from_the_warped_distribution(temperature, top_k, top_p):
    """Gumbel-max over the shaped scores: the support equals transformers' warpers' and the frequencies
    match their softmax (20k draws, 4 sigma)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from mtrl.workers.rollout.hf_engine import SeededSampling

    scores = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k > 0 else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    expected = LogitsProcessorList(warpers)(None, scores.clone()).softmax(-1)[0]
    draws = 20000
    sampler = SeededSampling(list(range(draws)), SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
                             torch.device("cpu"))
    picks = sampler(None, scores.expand(draws, -1)).argmax(-1)
    freq = torch.bincount(picks, minlength=scores.shape[1]).double() / draws
    assert torch.equal(freq > 0, expected > 0)
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert bool(((freq - expected).abs() <= 4 * sigma + 1e-9).all()), (freq, expected)


def test_micro_batch_size_counts_responses_as_documented(tiny, prompts):
    """`worker.rollout.micro_batch_size_per_device` counts generated rows (prompts x n), as its comment says."""
    import inspect

    from mtrl.config.worker import RolloutConfig

    source = inspect.getsource(RolloutConfig)
    above = source[:source.index("micro_batch_size_per_device:")].rstrip().split("\n")
    comment = " ".join(line.strip() for line in above[-2:] if line.strip().startswith("#"))
    assert "x n" in comment and "rows" in comment, comment
    sizes, prefilled = [], []

    class Recording(HFRolloutEngine):
        def _generate_micro_batch(self, mb, copies, params, seeds):
            sizes.append(int(copies.sum()))
            prefilled.append(list(mb["uid"]))
            return super()._generate_micro_batch(mb, copies, params, seeds)

    engine = Recording(lambda: make_tiny_model("qwen2_vl", seed=123).model, tiny.model.config,
                       [tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")], tiny.tokenizer.pad_token_id,
                       torch.device("cpu"), micro_batch_size=4)
    engine.load_weights(tiny.model.state_dict().items())
    engine.generate(prompts.select(), SamplingParams(n=3, temperature=1.0, max_new_tokens=2, seed=1))
    assert sizes == [4, 2]  # 2 prompts x 3 responses = 6 rows in calls of at most 4
    # each call prefills the prompts its rows answer once: rows a a a b, then b b
    uid = list(prompts["uid"])
    assert prefilled == [uid, uid[1:]]


def test_media_per_row_is_the_most_any_row_has(tiny):
    """What the vllm engine reserves room for per prompt (`worker.rollout.limit_mm_per_prompt` left empty)."""
    from mtrl.utils.data_mixing import MixtureDataset

    image = Image.new("RGB", (56, 56))
    one = RLDataset.from_rows([{"prompt": "<image>a", "images": [image]}, {"prompt": "b"}], tiny.tokenizer,
                              tiny.processor, tiny.model.config, min_pixels=3136, max_pixels=3136)
    two = RLDataset.from_rows([{"prompt": "<image><image>c", "images": [image, image]}], tiny.tokenizer,
                              tiny.processor, tiny.model.config, min_pixels=3136, max_pixels=3136)
    assert one.media_per_row() == {"image": 1, "video": 0}
    assert MixtureDataset([one, two]).media_per_row() == {"image": 2, "video": 0}
