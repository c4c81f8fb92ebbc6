"""The hf engine's decode loop (mtrl/workers/rollout/decoding.py) against transformers `generate`: the same tokens
and log-probs for text models and Qwen2-VL / Qwen2.5-VL / Qwen3-VL with images and videos, n samples per prompt,
rows stopping early; each prompt prefilled once (shared) or once per response (unshared) alike."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

from mtrl.models.multimodal import batch_multimodal_inputs, mm_token_type_ids
from mtrl.models.tiny import make_tiny_model
from mtrl.utils.dataset import RLDataset
from mtrl.workers.rollout import SamplingParams, decoding, response_mask_from_ids
from mtrl.workers.rollout.base import response_seeds
from mtrl.workers.rollout.hf_engine import HFRolloutEngine, SampledTokenLogProbs, SeededSampling

ARCHS = ("qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SAMPLING = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=7)


def image(seed, width=56, height=56):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    """(tiny model, prompts): for the VL archs an image row, a text row (shorter: left padding) and a video row."""
    tiny = make_tiny_model(request.param, seed=0)
    if tiny.processor is None:
        rows = [{"prompt": "How many squares are there?", "answer": "2"},
                {"prompt": "Name a colour.", "answer": "red"}]
    else:
        rows = [{"prompt": "<image>What colour is the circle?", "answer": "red", "images": [image(1)]},
                {"prompt": "Name a colour.", "answer": "red"},
                {"prompt": "<video>What happens?", "answer": "x", "videos": [[image(s, 56, 84) for s in range(4)]]}]
    data = RLDataset.from_rows(rows, tiny.tokenizer, tiny.processor, tiny.model.config, min_pixels=3136,
                               max_pixels=3136, video_fps=2.0)
    return tiny, data.collate([data[i] for i in range(len(rows))])


def engine_for(tiny, eos, micro_batch_size=64):
    engine = HFRolloutEngine(lambda: type(tiny.model)(tiny.model.config), tiny.model.config, eos,
                             tiny.tokenizer.pad_token_id, torch.device("cpu"), micro_batch_size=micro_batch_size)
    engine.load_weights(tiny.model.state_dict().items())
    return engine


def im_end(tiny):
    return [tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def generate_path(tiny, prompts, params, eos, suppress):
    """(responses, rollout_log_probs) of transformers `generate` on the repeated prompts with the engine's logits
    processors: what the engine computed before it had its own loop."""
    batch = prompts.repeat(params.n)
    ids, pad = batch["input_ids"], tiny.tokenizer.pad_token_id
    vision = batch_multimodal_inputs(batch.non_tensors.get("multi_modal_inputs"))
    if vision:
        vision["mm_token_type_ids"] = mm_token_type_ids(ids, tiny.model.config)
    seeds = response_seeds(params.seed, prompts.non_tensors["uid"], params.n)
    sampling = [] if params.greedy else [SeededSampling(seeds, params, torch.device("cpu"))]
    recorder = SampledTokenLogProbs(sampling[0].shape if sampling else (lambda scores: scores))
    suppressing = [SuppressTokensLogitsProcessor(suppress)] if suppress else []
    with torch.no_grad():
        out = tiny.model.generate(input_ids=ids, attention_mask=batch["attention_mask"],
                                  max_new_tokens=params.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                  do_sample=False, top_k=None, top_p=None, temperature=None,
                                  logits_processor=LogitsProcessorList([*suppressing, recorder, *sampling]), **vision)
    generated = out[:, ids.shape[1]:]
    log_probs = recorder.finish(generated)
    width = params.max_new_tokens - generated.shape[1]
    responses = torch.nn.functional.pad(generated, (0, width), value=pad)
    mask = response_mask_from_ids(responses, eos, pad)
    return responses, torch.nn.functional.pad(log_probs, (0, width)) * mask


def assert_same_as_generate(tiny, prompts, params, eos, micro_batch_size=64):
    engine = engine_for(tiny, eos, micro_batch_size)
    out = engine.generate(prompts.select(), params)
    responses, log_probs = generate_path(tiny, prompts, params, eos, engine.suppress_tokens)
    assert torch.equal(out["responses"], responses)
    torch.testing.assert_close(out["rollout_log_probs"], log_probs, atol=1e-5, rtol=0)
    return out


@pytest.mark.parametrize("params", [SamplingParams(n=1, temperature=0.0, max_new_tokens=8), SAMPLING,
                                    SamplingParams(n=2, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=8,
                                                   seed=3)], ids=["greedy", "sampling", "top_k_top_p"])
def test_tokens_and_log_probs_equal_generate(case, params):
    tiny, prompts = case
    out = assert_same_as_generate(tiny, prompts, params, im_end(tiny))
    assert float(out["rollout_log_probs"][out["response_mask"].bool()].mean()) < -1.0  # real log-probs


def test_micro_batches_that_split_a_prompts_responses(case):
    """Rows a a | a b | b b ...: a prompt prefilled in two micro-batches, and one prefilled per response row
    (micro-batch 1: no sharing), give what one shared prefill gives."""
    tiny, prompts = case
    for micro in (2, 1):
        assert_same_as_generate(tiny, prompts, SAMPLING, im_end(tiny), micro_batch_size=micro)


def test_rows_that_stop_early_leave_the_batch(case, monkeypatch):
    """EOS ids that the tiny model emits early (its most frequent early tokens): rows stop at different steps; every
    finished row leaves the forward's batch at once (share 0) or by quarters (the default), same tokens."""
    tiny, prompts = case
    first, _ = generate_path(tiny, prompts, SAMPLING, im_end(tiny), engine_for(tiny, im_end(tiny)).suppress_tokens)
    counts = torch.bincount(first[:, 1:4].flatten())
    eos = im_end(tiny) + counts.topk(2).indices.tolist()
    drops = []
    select = decoding.InPlaceLayer.batch_select_indices
    monkeypatch.setattr(decoding.InPlaceLayer, "batch_select_indices",
                        lambda self, indices: (drops.append(len(indices)), select(self, indices)))
    for share in (0.0, decoding.DROP_FINISHED_SHARE):
        monkeypatch.setattr(decoding, "DROP_FINISHED_SHARE", share)
        drops.clear()
        out = assert_same_as_generate(tiny, prompts, SAMPLING, eos)
        lengths = out["response_mask"].sum(1)
        assert len(set(lengths.tolist())) > 1 and int(lengths.min()) < SAMPLING.max_new_tokens
        layers = tiny.model.config.get_text_config().num_hidden_layers
        # one selection per layer expands the prompts to their responses, the others drop finished rows
        assert drops[:layers] == [len(out)] * layers
        if share == 0.0:
            assert len(drops) > layers and all(d < len(out) for d in drops[layers:])


def test_seeded_uniforms_are_each_rows_stream_step_by_step():
    """Drawn many steps per call (CPU), a row's uniforms are still its generator's stream one step at a time: what
    `SeededSampling` drew before, so the same seeds give the same tokens."""
    seeds, vocab, steps = [3, 11, 12], 50, 7
    sampler = SeededSampling(seeds, SamplingParams(max_new_tokens=steps), torch.device("cpu"))
    sampler.DRAW_ELEMENTS = 3 * vocab  # refills after three steps: blocks of 3, 3, then 1 of the next block
    drawn = torch.stack([sampler._uniform(vocab, torch.device("cpu")) for _ in range(steps)])
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    one_by_one = torch.stack([torch.stack([torch.rand(vocab, generator=g) for g in generators])
                              for _ in range(steps)])
    assert torch.equal(drawn, one_by_one)
