"""Reward models: the score is read at the last response token, a Bradley-Terry model trained on the built-in
task's correct-vs-wrong answers ranks held-out pairs above chance, and its exported folder loads back
(`load_reward_model`) with the same scores."""

import pytest
import torch

from mtrl.agents.preference_agent import PreferenceAgent, last_token_scores, with_scoring_token
from mtrl.models.loader import load_config, load_model, load_processor
from mtrl.models.multimodal import batch_multimodal_inputs, mm_token_type_ids
from mtrl.models.packing import model_position_ids
from mtrl.optimization.config import OptimizationConfig
from mtrl.utils.errors import UserError
from mtrl.utils.shapes_task import write_preference_pairs
from mtrl.utils.sft_dataset import PreferenceDataset
from mtrl.config.worker import ActorConfig
from mtrl.workers.export import write_hf_folder
from mtrl.models.loader import load_reward_model, read_score_head
from shapes_assets import dataset_kwargs, load_policy, shapes_task, tiny_vl_model


@pytest.fixture(scope="module")
def data():
    task = shapes_task()
    model = tiny_vl_model()
    tokenizer, processor = load_processor(model)
    kwargs = dict(**dataset_kwargs(task))
    train = PreferenceDataset(write_preference_pairs(task, "train"), tokenizer, processor, load_config(model), **kwargs)
    val = PreferenceDataset(write_preference_pairs(task, "val"), tokenizer, processor, load_config(model), **kwargs)
    return model, train, val


def test_scoring_token_is_appended_after_the_last_response_token():
    tensors = {"input_ids": torch.tensor([[0, 7, 8, 9, 0], [6, 7, 8, 9, 4]]),
               "attention_mask": torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
               "position_ids": torch.tensor([[0, 0, 1, 2, 0], [0, 1, 2, 3, 4]]),
               "response_mask": torch.tensor([[1, 0], [1, 1]])}
    out, columns = with_scoring_token(tensors, pad_token_id=0)
    assert columns.tolist() == [1, 2]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5]]
    assert out["responses"].shape == (2, 3)


def test_score_is_the_value_head_on_the_last_token(data):
    model_path, train, _ = data
    model = load_policy(model_path, for_value=True)
    batch = train.collate([train[0], train[1]])
    with torch.no_grad():
        scores = last_token_scores(model, batch, torch.device("cpu"), padding_free=True,
                                   pad_token_id=train.pad_token_id)
    # Reference: an ordinary (sdpa) forward of each row alone, without padding; the value at its last token.
    plain = load_model(model_path, for_value=True)
    for i in range(len(batch)):
        mask = batch.tensors["attention_mask"][i].bool()
        ids = batch.tensors["input_ids"][i][mask][None]
        pos = batch.tensors["position_ids"][i][..., mask][None]
        vision = batch_multimodal_inputs([batch.non_tensors["multi_modal_inputs"][i]], torch.device("cpu"))
        vision["mm_token_type_ids"] = mm_token_type_ids(ids, plain.config)
        with torch.no_grad():
            values = plain(input_ids=ids, position_ids=model_position_ids(pos), **vision).values
        assert float(scores[i]) == pytest.approx(float(values[0, -1, 0]), abs=1e-4)


def test_reward_model_ranks_held_out_pairs_above_chance(data, tmp_path):
    model_path, train, val = data
    model = load_policy(model_path, for_value=True)
    cfg = ActorConfig(dynamic_batching=False, micro_batch_size_per_device_for_update=16,
                      micro_batch_size_per_device_for_experience=16, max_grad_norm=1.0)
    agent = PreferenceAgent("reward_model", cfg, OptimizationConfig(), model, torch.device("cpu"),
                            torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95)),
                            pad_token_id=train.pad_token_id)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to a busy machine
    try:
        for step in range(64):
            rows = torch.randint(0, len(train), (16,), generator=g).tolist()
            agent.update(train.collate([train[i] for i in rows]), mini_batch_pairs=16)
    finally:
        torch.set_num_threads(threads)
    stats = agent.evaluate(val.collate([val[i] for i in range(len(val))])).tensors
    accuracy = float((stats["chosen"] > stats["rejected"]).float().mean())
    assert accuracy > 0.65, f"held-out pair accuracy {accuracy:.2f} (chance 0.5)"

    # Export as a Hugging Face folder and load it back as a reward model: the same scores.
    out = write_hf_folder(model.state_dict(), str(tmp_path / "rm"), model_path, tied=False)
    assert read_score_head(out) is not None
    loaded = load_reward_model(out)
    from mtrl.models.attention import enable_padding_free_attention

    enable_padding_free_attention(loaded)
    batch = val.collate([val[0], val[1]])
    a = last_token_scores(model.eval(), batch, torch.device("cpu"), pad_token_id=val.pad_token_id)
    b = last_token_scores(loaded.eval(), batch, torch.device("cpu"), pad_token_id=val.pad_token_id)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_policy_folder_is_not_a_reward_model(data):
    model_path, *_ = data
    with pytest.raises(UserError, match="no reward head"):
        load_reward_model(model_path)
