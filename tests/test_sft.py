"""SFT data (every common row shape, images, response tokens as the chat template renders them) and the
SFT update (loss on response tokens only, falling on a fixed batch, micro-batching invariant)."""

import json

import pytest
import torch

from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
from mtrl.models.loader import load_config, load_processor
from mtrl.optimization.config import OptimizationConfig
from mtrl.utils.dataset import DatasetError
from mtrl.utils.sft_dataset import SFTDataset, normalise_sft_row
from mtrl.config.worker import ActorConfig
from shapes_assets import dataset_kwargs, load_policy, shapes_task, tiny_vl_model


@pytest.fixture(scope="module")
def assets():
    task = shapes_task()
    model = tiny_vl_model()
    tokenizer, processor = load_processor(model)
    return task, model, tokenizer, processor, load_config(model)


@pytest.mark.parametrize("row,prompt,response", [
    ({"prompt": "p", "response": "r"}, "p", "r"),
    ({"prompt": "p", "answer": 3}, "p", "3"),
    ({"question": "q", "answer": "a"}, "q", "a"),
    ({"instruction": "do", "input": "x", "output": "o"}, "do\n\nx", "o"),
    ({"input": "i", "output": "o"}, "i", "o"),
    ({"query": "q", "response": "r"}, "q", "r"),
])
def test_row_shapes_are_recognised(row, prompt, response):
    assert normalise_sft_row(row) == (prompt, response)


def test_message_rows():
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}]}
    prompt, response = normalise_sft_row(row)
    assert response == "a" and [m["role"] for m in prompt] == ["system", "user"]
    sharegpt = {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}
    assert normalise_sft_row(sharegpt)[1] == "a"
    with pytest.raises(DatasetError, match="last message"):
        normalise_sft_row({"messages": [{"role": "user", "content": "u"}]})
    with pytest.raises(DatasetError, match="not an SFT row"):
        normalise_sft_row({"text": "x"}, "f.jsonl, line 3")


def test_sft_dataset_builds_prompt_response_sequences_with_images(assets, tmp_path):
    task, _, tokenizer, processor, model_config = assets
    rows = [{"messages": [{"role": "user", "content": "<image>What colour is the shape?"},
                          {"role": "assistant", "content": "red"}], "images": ["images/train_00000.png"]},
            {"question": "What colour is the circle?", "answer": "blue"}]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = SFTDataset(str(path), tokenizer, processor, model_config, **dataset_kwargs(task))
    batch = ds.collate([ds[0], ds[1]])
    t = batch.tensors
    assert t["input_ids"].shape[1] == t["prompts"].shape[1] + t["responses"].shape[1]
    assert t["position_ids"].shape[:2] == (2, 3)  # mRoPE rows for the whole sequence
    texts = tokenizer.batch_decode([r[m.bool()] for r, m in zip(t["responses"], t["response_mask"])])
    assert texts == ["red<|im_end|>", "blue<|im_end|>"]  # the end of the turn, not the newline after it
    assert "pixel_values" in batch.non_tensors["multi_modal_inputs"][0] and not batch.non_tensors["multi_modal_inputs"][1]
    assert torch.equal(t["is_expert"], torch.ones(2))
    # Position ids continue from the prompt into the response.
    p = t["prompts"].shape[1]
    assert int(t["position_ids"][1, 0, p]) == int(t["position_ids"][1, 0, p - 1]) + 1


def test_shapes_rows_are_sft_rows_and_long_responses_are_cut(assets):
    task, _, tokenizer, processor, model_config = assets
    ds = SFTDataset(f"{task}/train.jsonl", tokenizer, processor, model_config, max_response_length=2,
                    **dataset_kwargs(task))
    item = ds[0]
    assert item["responses"].shape[0] == 2 and ds.num_truncated == 1


def sft_batch(assets, rows=8):
    task, _, tokenizer, processor, model_config = assets
    ds = SFTDataset(f"{task}/train.jsonl", tokenizer, processor, model_config, **dataset_kwargs(task))
    batch = ds.collate([ds[i] for i in range(rows)])
    batch.meta.update(chord_mu=1.0, chord_phi=False)
    return batch


def test_sft_loss_falls_on_a_fixed_batch(assets):
    _, model_path, *_ = assets
    model = load_policy(model_path)
    agent = ParallelPolicyAgent(ActorConfig(dynamic_batching=False, micro_batch_size_per_device_for_update=4,
                                            max_grad_norm=1.0), model, torch.device("cpu"),
                                torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0))
    batch = sft_batch(assets)
    losses = [agent.update_policy(batch, 1.0, OptimizationConfig(), mini_batch_size=len(batch))["expert/sft_loss"]
              for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[6] < losses[0], losses


def test_sft_loss_is_the_response_token_nll_and_micro_batching_invariant(assets):
    _, model_path, *_ = assets
    batch = sft_batch(assets)
    params = []
    for micro in (8, 3):
        model = load_policy(model_path)
        agent = ParallelPolicyAgent(ActorConfig(dynamic_batching=False, micro_batch_size_per_device_for_update=micro,
                                                max_grad_norm=1e9), model, torch.device("cpu"),
                                    torch.optim.SGD(model.parameters(), lr=0.5))
        log_probs = agent.compute_log_probs(batch, 1.0)["log_probs"]
        mask = batch.tensors["response_mask"]
        nll = float(-(log_probs * mask).sum() / mask.sum())
        metrics = agent.update_policy(batch, 1.0, OptimizationConfig(), mini_batch_size=len(batch))
        assert metrics["expert/sft_loss"] == pytest.approx(nll, rel=1e-4)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
