"""The policy agent's update: the parameters after a step do not depend on how a mini-batch is cut
into micro-batches (fixed sizes or dynamic token budgets), for every loss aggregation mode."""


import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
from mtrl.models.attention import enable_padding_free_attention
from mtrl.optimization.config import OptimizationConfig
from mtrl.protocol import DataBatch
from mtrl.config.worker import ActorConfig

PROMPT, RESPONSE, ROWS, VOCAB = 6, 5, 8, 97


def tiny_model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(config).float()
    enable_padding_free_attention(model)
    return model


def make_batch():
    g = torch.Generator().manual_seed(1)
    prompt_lens = torch.randint(2, PROMPT + 1, (ROWS,), generator=g)
    response_lens = torch.randint(1, RESPONSE + 1, (ROWS,), generator=g)
    prompt_mask = (torch.arange(PROMPT) >= PROMPT - prompt_lens[:, None]).long()  # left padding
    response_mask = (torch.arange(RESPONSE) < response_lens[:, None]).long()  # right padding
    input_ids = torch.randint(1, VOCAB, (ROWS, PROMPT + RESPONSE), generator=g)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    input_ids = input_ids * attention_mask
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return DataBatch(tensors={
        "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
        "responses": input_ids[:, PROMPT:], "response_mask": response_mask,
        "advantages": torch.randn(ROWS, RESPONSE, generator=g) * response_mask,
        "token_mask": (torch.rand(ROWS, RESPONSE, generator=g) > 0.3).float(),
    })


def run_update(micro_batch_size, dynamic, loss_agg_mode, token_budget=1000, opt=None):
    model = tiny_model()
    config = ActorConfig(micro_batch_size_per_device_for_update=micro_batch_size,
                         micro_batch_size_per_device_for_experience=3, dynamic_batching=dynamic,
                         max_token_len_per_device=token_budget, loss_agg_mode=loss_agg_mode, max_grad_norm=1e9)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    agent = ParallelPolicyAgent(config, model, torch.device("cpu"), optimizer)
    batch = make_batch()
    old = agent.compute_log_probs(batch, temperature=1.0)["log_probs"]
    # Perturb the old log-probs so that some ratios are clipped.
    batch.tensors["old_log_probs"] = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))
    metrics = agent.update_policy(batch, temperature=1.0, opt=opt or OptimizationConfig(),
                                  mini_batch_size=ROWS)
    return model, metrics


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_size_does_not_change_the_step(mode):
    reference, ref_metrics = run_update(ROWS, False, mode)
    for micro, dynamic, budget in [(1, False, 0), (4, False, 0), (0, True, 25)]:
        model, metrics = run_update(micro or 1, dynamic, mode, budget or 1000)
        for (name, p), q in zip(reference.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=f"{name} differs (micro={micro}, dynamic={dynamic})")
        assert metrics["actor/pg_loss"] == pytest.approx(ref_metrics["actor/pg_loss"], abs=1e-5)


def test_entropy_bonus_is_micro_batch_invariant_and_changes_the_step():
    opt = OptimizationConfig(entropy_bonus_coef=0.5)
    reference, ref_metrics = run_update(ROWS, False, "token-mean", opt=opt)
    plain, _ = run_update(ROWS, False, "token-mean")
    assert max((p - q).abs().max().item() for p, q in zip(reference.parameters(), plain.parameters())) > 1e-4
    model, metrics = run_update(0, True, "token-mean", 25, opt=opt)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=f"{name} differs with dynamic batching")
    # The logged term is -mean entropy over the mini-batch's response tokens, the same however it is cut.
    assert metrics["actor/entropy_bonus_loss"] == pytest.approx(ref_metrics["actor/entropy_bonus_loss"], abs=1e-5)
    assert ref_metrics["actor/entropy_bonus_loss"] < 0


def test_compute_log_probs_keeps_row_order_with_dynamic_batching():
    model = tiny_model()
    batch = make_batch()
    fixed = ParallelPolicyAgent(ActorConfig(micro_batch_size_per_device_for_experience=ROWS, dynamic_batching=False),
                                model, torch.device("cpu")).compute_log_probs(batch, 1.0, return_entropy=True)
    dynamic = ParallelPolicyAgent(ActorConfig(dynamic_batching=True, max_token_len_per_device=20),
                                  model, torch.device("cpu")).compute_log_probs(batch, 1.0, return_entropy=True)
    torch.testing.assert_close(dynamic["log_probs"], fixed["log_probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(dynamic["entropy"], fixed["entropy"], atol=1e-5, rtol=0)
