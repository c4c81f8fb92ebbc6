"""Shared-prompt forwards (mtrl.models.shared_prompts): each distinct prompt once, same numbers as the plain forward."""

import torch
import pytest

from mtrl.models.packing import forward_micro_batch
from mtrl.models.shared_prompts import forward_shared_prompts, prompt_groups, shared_prompt_plan
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

    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for forward in (lambda: forward_micro_batch(model, tensors, mm_arg, R, temperature=1.3),
                    lambda: forward_shared_prompts(model, tensors, mm_arg, R, plan, temperature=1.3)):
        model.zero_grad()
        (forward()["log_probs"] * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


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
