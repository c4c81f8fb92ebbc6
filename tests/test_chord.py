"""CHORD: the mu schedule, the phi weighting, the mixed loss in the agent (each term normalised over its own
rows, micro-batching invariant) and the layout of expert rows in the update batch."""

import math

import pytest
import torch
from test_agent import tiny_model

from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
from mtrl.optimization import policy_optimization as po
from mtrl.optimization.config import OptimizationConfig
from mtrl.protocol import DataBatch
from mtrl.training.chord import expert_rows_per_mini_batch, mix_expert_rows
from mtrl.config.worker import ActorConfig

PROMPT, RESPONSE, ROWS, VOCAB = 6, 5, 8, 97


# ----------------------------------------------------------------------------- mu schedule


@pytest.mark.parametrize("step,expected", [
    (0, 0.0),                  # warmup starts at 0
    (5, 0.3),                  # half-way through warmup: 0.6 * 5 / 10
    (10, 0.6),                 # peak
    (20, 0.1 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.5))),  # mid-decay: 0.35
    (25, 0.1 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.75))),
    (30, 0.1),                 # valley
    (1000, 0.1),
])
def test_mu_schedule_matches_hand_computed_values(step, expected):
    mu = po.compute_chord_mu(step, mu_warmup_steps=10, mu_decay_steps=20, mu_peak=0.6, mu_valley=0.1)
    assert mu == pytest.approx(expected, abs=1e-12)


def test_mu_schedule_edge_cases():
    assert po.compute_chord_mu(0, 0, 10, 0.5, 0.1) == pytest.approx(0.5)  # no warmup: peak at once
    assert po.compute_chord_mu(3, 0, 0, 0.2, 0.2) == pytest.approx(0.2)   # constant
    assert po.compute_chord_mu(12, 10, 0, 0.5, 0.05) == pytest.approx(0.05)  # no decay: straight to the valley


# ----------------------------------------------------------------------------- phi and the SFT loss


def test_phi_is_p_times_one_minus_p_without_gradient():
    log_probs = torch.log(torch.tensor([[0.5, 0.9, 0.1, 1.0]])).requires_grad_()
    phi = po.compute_chord_phi(log_probs)
    torch.testing.assert_close(phi, torch.tensor([[0.25, 0.09, 0.09, 0.0]]), atol=1e-6, rtol=0)
    assert not phi.requires_grad


def test_sft_loss_token_mean_and_phi_weighting():
    p = torch.tensor([[0.5, 0.25, 0.8], [0.9, 0.1, 0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    log_probs = torch.log(p).requires_grad_()
    plain = po.compute_sft_loss(log_probs, mask)
    expected = -(torch.log(p) * mask).sum() / mask.sum()
    torch.testing.assert_close(plain, expected)
    phi_loss = po.compute_sft_loss(log_probs, mask, enable_phi_function=True)
    weights = p * (1 - p)
    torch.testing.assert_close(phi_loss, -(torch.log(p) * weights * mask).sum() / mask.sum())
    phi_loss.backward()
    # phi is a stop-gradient weight: d loss / d log p = -phi / count on valid tokens.
    torch.testing.assert_close(log_probs.grad, -weights * mask / mask.sum())
    # Global normaliser: the micro-batch loss is its share of the mini-batch loss.
    half = po.compute_sft_loss(torch.log(p[:1]), mask[:1], global_token_count=5)
    torch.testing.assert_close(half, -(torch.log(p[:1]) * mask[:1]).sum() / 5)


# ----------------------------------------------------------------------------- the agent's mixed loss


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, PROMPT + 1, (ROWS,), generator=g)
    response_lens = torch.randint(1, RESPONSE + 1, (ROWS,), generator=g)
    prompt_mask = (torch.arange(PROMPT) >= PROMPT - prompt_lens[:, None]).long()
    response_mask = (torch.arange(RESPONSE) < response_lens[:, None]).long()
    input_ids = torch.randint(1, VOCAB, (ROWS, PROMPT + RESPONSE), generator=g)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    input_ids = input_ids * attention_mask
    is_expert = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0], dtype=torch.float32)
    return DataBatch(tensors={
        "input_ids": input_ids, "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "responses": input_ids[:, PROMPT:], "response_mask": response_mask,
        "advantages": torch.randn(ROWS, RESPONSE, generator=g) * response_mask * (1 - is_expert[:, None]),
        "is_expert": is_expert,
    }, meta={"chord_mu": 0.3, "chord_phi": True})


def run_update(micro, model=None, mu=0.3):
    model = model or tiny_model()
    config = ActorConfig(micro_batch_size_per_device_for_update=micro, dynamic_batching=False, max_grad_norm=1e9)
    agent = ParallelPolicyAgent(config, model, torch.device("cpu"), torch.optim.SGD(model.parameters(), lr=1.0))
    batch = make_batch()
    batch.meta["chord_mu"] = mu
    batch.tensors["old_log_probs"] = agent.compute_log_probs(batch, 1.0)["log_probs"].detach()
    return model, agent.update_policy(batch, 1.0, OptimizationConfig(), mini_batch_size=ROWS), batch


def test_mixed_loss_is_weighted_sum_of_per_subset_normalised_losses():
    model = tiny_model()
    batch = make_batch()
    agent = ParallelPolicyAgent(ActorConfig(dynamic_batching=False), model, torch.device("cpu"))
    log_probs = agent.compute_log_probs(batch, 1.0)["log_probs"]
    batch.tensors["old_log_probs"] = log_probs
    expert = batch.tensors["is_expert"][:, None]
    mask = batch.tensors["response_mask"]
    pg, _ = po.compute_policy_loss(log_probs, log_probs, batch.tensors["advantages"], mask * (1 - expert), 0.2, 0.3, 3.0)
    sft = po.compute_sft_loss(log_probs, mask * expert, enable_phi_function=True)
    from mtrl.agents.parallel_policy_agent import _global_counts, expert_masks

    norm = dict(zip(("usual", "expert"), _global_counts(list(expert_masks(batch)), torch.device("cpu"))))
    loss, metrics = agent._micro_batch_loss(batch, 1.0, OptimizationConfig(), norm)
    torch.testing.assert_close(loss, 0.7 * pg + 0.3 * sft, atol=1e-6, rtol=1e-6)
    assert metrics["expert/sft_loss"] == pytest.approx(float(sft), abs=1e-6)
    assert metrics["usual/pg_loss"] == pytest.approx(float(pg), abs=1e-6)


@pytest.mark.parametrize("mu", [0.0, 0.3, 1.0])
def test_mixed_update_does_not_depend_on_micro_batch_size(mu):
    reference, ref_metrics, _ = run_update(ROWS, mu=mu)
    for micro in (1, 3):
        model, metrics, _ = run_update(micro, mu=mu)
        for (name, p), q in zip(reference.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=f"{name} differs (micro={micro})")
        assert metrics["expert/sft_loss"] == pytest.approx(ref_metrics["expert/sft_loss"], abs=1e-5)
        assert metrics["usual/pg_loss"] == pytest.approx(ref_metrics["usual/pg_loss"], abs=1e-5)


def test_pure_expert_batch_needs_no_rl_tensors():
    model = tiny_model()
    batch = make_batch()
    batch.tensors["is_expert"] = torch.ones(ROWS)
    for key in ("advantages",):
        batch.tensors.pop(key)
    batch.meta["chord_mu"] = 1.0
    agent = ParallelPolicyAgent(ActorConfig(dynamic_batching=False, micro_batch_size_per_device_for_update=4), model,
                                torch.device("cpu"), torch.optim.SGD(model.parameters(), lr=0.1))
    metrics = agent.update_policy(batch, 1.0, OptimizationConfig(), mini_batch_size=ROWS)
    assert "expert/sft_loss" in metrics and "usual/pg_loss" not in metrics and "actor/pg_loss" not in metrics


# ----------------------------------------------------------------------------- expert rows in the update batch


def test_expert_rows_per_mini_batch():
    assert expert_rows_per_mini_batch(32, 0.2, 2) == 8        # 8 / 40 = 0.2
    assert expert_rows_per_mini_batch(32, 0.25, 4) == 12      # 32 / 3 = 10.7 -> 12 (multiple of 4)
    assert expert_rows_per_mini_batch(4, 0.01, 2) == 2        # at least one row per rank


def rl_batch(rows, p, r, tag):
    ids = torch.full((rows, p + r), 5)
    return DataBatch(tensors={
        "prompts": ids[:, :p], "responses": ids[:, p:], "input_ids": ids, "attention_mask": torch.ones(rows, p + r, dtype=torch.long),
        "position_ids": torch.arange(p + r).repeat(rows, 1), "response_mask": torch.ones(rows, r, dtype=torch.long),
        "old_log_probs": torch.full((rows, r), float(tag)), "advantages": torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, r).clone(),
        "token_mask": torch.ones(rows, r)},
        non_tensors={"multi_modal_inputs": [{} for _ in range(rows)], "uid": [str(i) for i in range(rows)]})


def test_mix_expert_rows_gives_each_rank_and_mini_batch_its_share():
    usual = rl_batch(16, 4, 3, tag=-1)
    expert_src = rl_batch(8, 6, 5, tag=0)
    expert = DataBatch({k: expert_src.tensors[k] for k in ("prompts", "responses", "input_ids", "attention_mask",
                                                           "position_ids", "response_mask")},
                       {"multi_modal_inputs": expert_src.non_tensors["multi_modal_inputs"]})
    out = mix_expert_rows(usual, expert, mini_batches=2, pad_token_id=0)
    assert len(out) == 24 and out.tensors["responses"].shape[1] == 5 and out.tensors["prompts"].shape[1] == 6
    flags = out.tensors["is_expert"].tolist()
    # [mini 0: rollout rows 0-7 + expert rows 0-3][mini 1: rollout rows 8-15 + expert rows 4-7]; the
    # controller's dispatch order splits each mini-batch over the ranks.
    assert flags == ([0.0] * 8 + [1.0] * 4) * 2
    # The rollout rows keep their order with their advantages.
    usual_adv = out.tensors["advantages"][out.tensors["is_expert"] == 0][:, 0].tolist()
    assert usual_adv == list(range(16))
    # Expert rows: zero advantages / old log-probs, token_mask 1, padded columns masked out.
    ex = out.tensors["is_expert"] == 1
    assert float(out.tensors["advantages"][ex].abs().sum()) == 0 and float(out.tensors["token_mask"][ex].min()) == 1
    assert out.tensors["response_mask"][~ex][:, 3:].sum() == 0  # usual responses (width 3) were right-padded
    assert out.tensors["attention_mask"][~ex][:, :2].sum() == 0  # usual prompts (width 4) were left-padded
