"""DPO: the loss variants against hand-computed values, and the chosen-rejected margin growing on a fixed
batch of preference pairs with images (tiny Qwen2-VL, frozen reference)."""

import math

import pytest
import torch

from mtrl.agents.preference_agent import PreferenceAgent
from mtrl.models.loader import load_config, load_processor
from mtrl.optimization import policy_optimization as po
from mtrl.optimization.config import OptimizationConfig
from mtrl.utils.shapes_task import write_preference_pairs
from mtrl.utils.sft_dataset import PreferenceDataset
from mtrl.config.worker import ActorConfig
from shapes_assets import dataset_kwargs, load_policy, shapes_task, tiny_vl_model


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# pi_c, pi_r, ref_c, ref_r -> h = (pi_c - pi_r) - (ref_c - ref_r) = (-1 - -3) - (-2 - -2.5) = 1.5
PI_C, PI_R, REF_C, REF_R, H = -1.0, -3.0, -2.0, -2.5, 1.5


@pytest.mark.parametrize("loss_type,beta,smoothing,expected", [
    ("sigmoid", 0.1, 0.0, -math.log(sigmoid(0.15))),
    ("sigmoid", 0.5, 0.2, -0.8 * math.log(sigmoid(0.75)) - 0.2 * math.log(sigmoid(-0.75))),
    ("hinge", 0.1, 0.0, 1 - 0.15),
    ("hinge", 1.0, 0.0, 0.0),                     # relu(1 - 1.5)
    ("ipo", 0.1, 0.0, (1.5 - 1 / 0.2) ** 2),       # (h - 1/(2 beta))^2 = 12.25
    ("ipo", 2.0, 0.0, (1.5 - 0.25) ** 2),
])
def test_dpo_loss_variants_match_hand_computed_values(loss_type, beta, smoothing, expected):
    t = lambda x: torch.tensor([x])  # noqa: E731
    losses, chosen, rejected = po.compute_dpo_loss(t(PI_C), t(PI_R), t(REF_C), t(REF_R), beta=beta,
                                                   loss_type=loss_type, label_smoothing=smoothing)
    assert float(losses[0]) == pytest.approx(expected, rel=1e-6)
    assert float(chosen[0]) == pytest.approx(beta * (PI_C - REF_C))
    assert float(rejected[0]) == pytest.approx(beta * (PI_R - REF_R))


def test_dpo_loss_rejects_unknown_type_and_sequence_log_probs():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        po.compute_dpo_loss(*(torch.zeros(1),) * 4, loss_type="kto")
    lp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(po.sequence_log_probs(lp, mask), torch.tensor([-3.0, -1.5]))
    torch.testing.assert_close(po.sequence_log_probs(lp, mask, average=True), torch.tensor([-1.5, -0.5]))


def test_bradley_terry_loss_with_margin():
    loss = po.compute_bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([-math.log(sigmoid(0.5)), math.log(2.0)]))


@pytest.fixture(scope="module")
def pairs():
    task = shapes_task()
    model = tiny_vl_model()
    tokenizer, processor = load_processor(model)
    path = write_preference_pairs(task, "train")
    ds = PreferenceDataset(path, tokenizer, processor, load_config(model), **dataset_kwargs(task))
    return model, ds


def test_preference_batches_interleave_chosen_and_rejected(pairs):
    _, ds = pairs
    batch = ds.collate([ds[0], ds[1]])
    assert batch.tensors["is_chosen"].tolist() == [1.0, 0.0, 1.0, 0.0]
    texts = ds.tokenizer.batch_decode([r[m.bool()] for r, m in zip(batch.tensors["responses"],
                                                                   batch.tensors["response_mask"])])
    assert texts[0] != texts[1] and all(t.endswith("<|im_end|>") for t in texts)
    assert "pixel_values" in batch.non_tensors["multi_modal_inputs"][1]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_margin_grows_on_a_fixed_batch(pairs, loss_type):
    model_path, ds = pairs
    policy, ref = load_policy(model_path), load_policy(model_path)
    ref.requires_grad_(False)
    opt = OptimizationConfig()
    opt.dpo.loss_type, opt.dpo.beta = loss_type, 0.1
    cfg = ActorConfig(dynamic_batching=False, micro_batch_size_per_device_for_update=4,
                      micro_batch_size_per_device_for_experience=8, max_grad_norm=1.0)
    agent = PreferenceAgent("dpo", cfg, opt, policy, torch.device("cpu"),
                            torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0), ref_model=ref,
                            pad_token_id=ds.pad_token_id)
    batch = ds.collate([ds[i] for i in range(8)])
    margins = [agent.update(batch, mini_batch_pairs=8)["dpo/margin"] for _ in range(6)]
    assert margins[0] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert margins[-1] > margins[1] > 0, margins
    stats = agent.evaluate(batch).tensors
    assert float((stats["chosen"] > stats["rejected"]).float().mean()) >= 0.75
