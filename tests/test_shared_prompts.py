"""Shared-prompt forwards (mtrl.models.shared_prompts): each distinct prompt once, same numbers as the plain forward."""

import torch
import pytest

from mtrl.models.loader import _enable_activation_checkpointing
from mtrl.models.packing import forward_micro_batch
from mtrl.models.shared_prompts import (
    forward_shared_prompts,
    keep_cache_under_checkpointing,
    prompt_groups,
    shared_prompt_plan,
)
from test_padding_free import ATOL, add_position_ids, image, make_batch, reference_outputs, tiny, video  # noqa: F401

R = 6


def grouped_batch(model, arch, group_size=4, seed=0):
    """Three prompts (two with an image, one text-only; a video on qwen2_vl), each with `group_size` responses of
    different lengths; rows of one prompt interleaved with the others' (shared prompts need not be adjacent)."""
    config = model.config
    if arch == "qwen2":
        prompts = [(12, {}), (14, {}), (9, {})]
    else:
        prompts = [(8, image(config, 1, 4, 4, seed=1)), (12, {}), (5, image(config, 1, 4, 8, seed=2))]
    if arch == "qwen2_vl":
        prompts.append((5, video(config, 2, 4, 4, seed=3)))
    rows = [(n, 1 + (g * 2 + p) % R, mm) for g in range(group_size) for p, (n, mm) in enumerate(prompts)]
    tensors, mm = make_batch(config, rows, prompt_len=15, response_len=R, seed=seed)
    prompt_len = 15
    for i in range(len(rows)):  # each row takes the prompt of its group's first row
        first = i % len(prompts)
        tensors["input_ids"][i, :prompt_len] = tensors["input_ids"][first, :prompt_len]
        tensors["attention_mask"][i, :prompt_len] = tensors["attention_mask"][first, :prompt_len]
    add_position_ids(model, tensors, mm)
    return tensors, [dict(m) for m in mm], len(prompts)


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_log_probs_entropy_and_gradients_equal_the_plain_forward(tiny, arch):
    ref, model = tiny.pair(arch)
    tensors, mm, n_prompts = grouped_batch(model, arch)
    mm_arg = None if arch == "qwen2" else mm
    plan = shared_prompt_plan(tensors, mm_arg, R, padding_free=True)
    assert plan is not None and len(plan.first_rows) == n_prompts
    with torch.no_grad():
        expected, expected_entropy, _ = reference_outputs(ref, tensors, mm, R, temperature=1.3)
    out = forward_shared_prompts(model, tensors, mm_arg, R, plan, temperature=1.3, return_entropy=True)
    torch.testing.assert_close(out["log_probs"].detach(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["entropy"], expected_entropy, atol=ATOL, rtol=0)

    # Gradients: the plain forward's, and the shared one's with and without activation checkpointing (which
    # runs every layer of both stages again in the backward pass).
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0))

    def gradients(forward):
        model.zero_grad()
        (forward()["log_probs"] * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_grads = gradients(lambda: forward_micro_batch(model, tensors, mm_arg, R, temperature=1.3))
    shared = lambda: forward_shared_prompts(model, tensors, mm_arg, R, plan, temperature=1.3)  # noqa: E731
    got = [gradients(shared)]
    keep_cache_under_checkpointing(model)
    _enable_activation_checkpointing(model)  # non-reentrant, under either name transformers 5 gives it
    model.train()
    got.append(gradients(shared))
    for grads in got:
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_plan_groups_equal_prompts_with_equal_images_and_only_when_it_saves_work(tiny):
    model = tiny.pair("qwen2_vl")[1]
    tensors, mm, n_prompts = grouped_batch(model, "qwen2_vl")
    plan = shared_prompt_plan(tensors, mm, R, padding_free=True)
    rows = len(mm)
    assert plan.group.tolist() == [i % n_prompts for i in range(rows)]
    assert plan.first_rows.tolist() == list(range(n_prompts))
    assert plan.response_width == int(tensors["attention_mask"][:, -R:].sum(-1).max())
    # The same prompt ids with other pixels (e.g. the perception pass's per-sample perturbation): not shared.
    other = [dict(m, pixel_values=m["pixel_values"] + i) if "pixel_values" in m else m for i, m in enumerate(mm)]
    _, regrouped = prompt_groups(tensors, other, R)
    image_rows = [i for i, m in enumerate(mm) if "pixel_values" in m]
    assert len({regrouped[i] for i in image_rows}) == len(image_rows)
    # ... while the rows whose inputs did not change still share: the text-only prompt and the video prompt.
    assert len({regrouped[i] for i in range(rows) if i not in image_rows}) == n_prompts - 2
    # All prompts distinct: nothing to share.
    distinct = {k: v[:n_prompts] for k, v in tensors.items()}
    assert shared_prompt_plan(distinct, mm[:n_prompts], R, padding_free=True) is None
    # Long responses on short prompts: two calls for no saving, so the plain forward is kept.
    assert shared_prompt_plan({k: v[:, 10:] for k, v in tensors.items()}, mm, R, padding_free=True) is None


# ---------------------------------------------------------------------------------------------- the agent
def grouped_rows(group_size=4, prompts=3, prompt_len=12, response_len=5, vocab=97):
    """A rollout-like DataBatch: `prompts` prompts x `group_size` responses, rows of a prompt consecutive."""
    import numpy as np

    from mtrl.protocol import DataBatch

    g = torch.Generator().manual_seed(1)
    rows = prompts * group_size
    prompt_lens = torch.randint(8, prompt_len + 1, (prompts,), generator=g).repeat_interleave(group_size)
    response_lens = torch.randint(1, response_len + 1, (rows,), generator=g)
    prompt_ids = torch.randint(1, vocab, (prompts, prompt_len), generator=g).repeat_interleave(group_size, 0)
    input_ids = torch.cat([prompt_ids, torch.randint(1, vocab, (rows, response_len), generator=g)], 1)
    prompt_mask = (torch.arange(prompt_len) >= prompt_len - prompt_lens[:, None]).long()
    response_mask = (torch.arange(response_len) < response_lens[:, None]).long()
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    input_ids = input_ids * attention_mask
    return DataBatch(tensors={
        "input_ids": input_ids, "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "responses": input_ids[:, prompt_len:], "response_mask": response_mask,
        "advantages": torch.randn(rows, response_len, generator=g) * response_mask,
    }, non_tensors={"uid": np.repeat(np.array([f"p{i}" for i in range(prompts)], dtype=object), group_size)})


def test_make_micro_batches_keeps_a_prompts_rows_together_under_a_token_budget():
    from mtrl.agents.parallel_policy_agent import make_micro_batches

    batch = grouped_rows()
    budget = int(batch.tensors["attention_mask"].sum(-1).view(-1, 4).sum(-1).max())  # the largest group fits
    rows_only = make_micro_batches(batch, 1, True, budget)
    grouped = make_micro_batches(batch, 1, True, budget, keep_groups=True)
    assert any(len({r // 4 for r in rows}) > 1 for _, rows in rows_only)  # the row-level budget splits prompts
    for _, rows in grouped:
        assert all(r // 4 * 4 + k in rows for r in rows for k in range(4))  # every group whole
    assert sorted(r for _, rows in grouped for r in rows) == list(range(len(batch)))
    # A group over the budget is cut into pieces within it (the budget bounds a micro-batch's memory).
    lengths = batch.tensors["attention_mask"].sum(-1)
    small = int(lengths[:4].sum()) - 1
    for _, rows in make_micro_batches(batch, 1, True, small, keep_groups=True):
        assert int(lengths[rows].sum()) <= small


@pytest.mark.parametrize("micro_batch_size, dynamic", [(12, False), (5, False), (1, True)])
def test_the_agent_update_with_shared_prompts_equals_the_plain_one(micro_batch_size, dynamic, monkeypatch):
    from test_agent import tiny_model

    import mtrl.agents.parallel_policy_agent as agent_module
    from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
    from mtrl.config.worker import ActorConfig
    from mtrl.optimization.config import OptimizationConfig

    calls = []
    monkeypatch.setattr(agent_module, "forward_shared_prompts",
                        lambda *a, **k: calls.append(1) or forward_shared_prompts(*a, **k))
    results = []
    for share in (False, True):
        model = tiny_model()
        config = ActorConfig(micro_batch_size_per_device_for_update=micro_batch_size, dynamic_batching=dynamic,
                             max_token_len_per_device=60, share_prompts=share, max_grad_norm=1e9)
        agent = ParallelPolicyAgent(config, model, torch.device("cpu"), torch.optim.SGD(model.parameters(), lr=1.0))
        batch = grouped_rows()
        old = agent.compute_log_probs(batch, temperature=1.0)["log_probs"]
        batch.tensors["old_log_probs"] = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))
        metrics = agent.update_policy(batch, temperature=1.0, opt=OptimizationConfig(), mini_batch_size=len(batch))
        results.append((old, model, metrics))
        assert bool(calls) == share  # the shared forward ran (log-prob pass and update) only when asked
    (old, plain, plain_metrics), (shared_old, shared, shared_metrics) = results
    torch.testing.assert_close(shared_old, old, atol=1e-5, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), shared.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=name)
    assert shared_metrics["actor/pg_loss"] == pytest.approx(plain_metrics["actor/pg_loss"], abs=1e-5)
