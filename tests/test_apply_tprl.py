"""po.apply_tprl: every TPRL decision the trainer makes on a batch, in one call (hand-computed cases)."""

import math

import pytest
import torch

from mtrl.optimization import policy_optimization as po
from mtrl.optimization.config import OptimizationConfig

T = torch.tensor


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def columns(**extra):
    mask = T([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    return {"response_mask": mask, "advantages": mask.float(), **extra}


TPRL_ON = dict(enable_perception_filtering=True, top_p_perception_tokens=0.5, enable_trajectory_reweighting=True,
               trajectory_scaling_min=0.8)


def test_worker_dependency_gives_mask_scaling_and_metrics():
    # The worker's exact (full_kl) scores are used as they are; aug_log_probs would be ignored.
    dependency = T([[0.1, 0.9, 0.5], [0.2, 0.2, 0.0], [0.6, 0.3, 0.9]])
    tensors = columns(dependency=dependency)
    metrics = po.apply_tprl(tensors, OptimizationConfig(**TPRL_ON))
    assert tensors["dependency"] is dependency
    # Keep ceil(0.5 n) tokens per response by score: 2 of 3, 1 of 2 (tie: the earlier token), 2 of 3.
    close(tensors["token_mask"], [[0, 1, 1], [1, 0, 0], [1, 0, 1]])
    # Response means S = 0.5, 0.2, 0.6 -> n = 0.75, 0, 1, mean(n) = 7/12 -> alpha = 0.8 + 0.2 n / mean(n).
    alpha = [0.8 + 0.2 * 0.75 * 12 / 7, 0.8, 0.8 + 0.2 * 12 / 7]
    close(tensors["advantages"], T([[1.0, 1, 1], [1, 1, 0], [1, 1, 1]]) * T(alpha)[:, None])
    assert set(metrics) == {"perception_token_fraction", "perception_threshold", "perception_selected_mean",
                            "perception_rejected_mean", "kept_token_fraction", "sensitivity_score_mean",
                            "scaling_factor_mean", "scaling_factor_max", "scaling_factor_min"}
    close(metrics["perception_token_fraction"], 5 / 8)
    close(metrics["kept_token_fraction"], 5 / 8)
    close(metrics["perception_threshold"], 0.2)
    close(metrics["sensitivity_score_mean"], 3.7 / 8)
    close(metrics["scaling_factor_mean"], 1.0)
    close(metrics["scaling_factor_max"], alpha[2])
    close(metrics["scaling_factor_min"], 0.8)


def test_perturbed_log_probs_become_sampled_k3_dependency():
    # d = aug - old: S = exp(d) - d - 1 (clamped to [0, 10]); 0 on padding.
    old = torch.zeros(3, 3)
    aug = T([[math.log(2), 0.0, -1.0], [0.0, math.log(3), 5.0], [20.0, 0.0, 0.0]])
    tensors = columns(old_log_probs=old, aug_log_probs=aug)
    po.apply_tprl(tensors, OptimizationConfig(**TPRL_ON))
    s = lambda d: math.exp(d) - d - 1  # noqa: E731
    close(tensors["dependency"], [[1 - math.log(2), 0, s(-1.0)], [0, 2 - math.log(3), 0], [10, 0, 0]])
    assert "token_mask" in tensors


def test_entropy_filter_alone_and_nothing_to_scale_without_a_perception_pass():
    # A batch without images has no perception output: only the entropy filter acts, and the
    # trajectory scaling has nothing to act on even when enabled.
    entropys = T([[0.3, 0.1, 0.2], [0.5, 0.4, 9.0], [0.0, 0.0, 1.0]])
    tensors = columns(entropys=entropys)
    advantages = tensors["advantages"]
    metrics = po.apply_tprl(tensors, OptimizationConfig(enable_entropy_filtering=True, top_p_entropy_tokens=0.5,
                                                        enable_trajectory_reweighting=True))
    close(tensors["token_mask"], [[1, 0, 1], [1, 0, 0], [1, 0, 1]])  # padding's 9.0 is never kept; ties: earlier
    assert tensors["advantages"] is advantages and "dependency" not in tensors
    assert set(metrics) == {"entropy_token_fraction", "entropy_threshold", "entropy_selected_mean",
                            "entropy_rejected_mean", "kept_token_fraction"}


def test_tprl_off_leaves_the_batch_alone():
    tensors = columns(entropys=torch.ones(3, 3), dependency=torch.ones(3, 3))
    before = dict(tensors)
    assert po.apply_tprl(tensors, OptimizationConfig()) == {}
    assert tensors == before


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_both_filters_or_ed_as_the_step_functions_say(scope):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 5, generator=g) > 0.2).long()
    tensors = {"response_mask": mask, "advantages": torch.randn(6, 5, generator=g) * mask,
               "entropys": torch.rand(6, 5, generator=g), "old_log_probs": -torch.rand(6, 5, generator=g),
               "aug_log_probs": -torch.rand(6, 5, generator=g)}
    opt = OptimizationConfig(enable_entropy_filtering=True, filter_scope=scope, trajectory_scaling_max=1.5, **TPRL_ON)
    advantages = tensors["advantages"]
    metrics = po.apply_tprl(tensors, opt)
    dependency = po.compute_visual_dependency(tensors["old_log_probs"], tensors["aug_log_probs"], mask)
    token_mask, mask_metrics = po.compute_tprl_token_mask(mask, tensors["entropys"], dependency, 0.2, 0.5, scope)
    alpha = po.compute_trajectory_scaling(dependency, mask, 0.8, 1.5)
    torch.testing.assert_close(tensors["token_mask"], token_mask, atol=0, rtol=0)
    torch.testing.assert_close(tensors["advantages"], advantages * alpha[:, None], atol=0, rtol=0)
    expected = {**mask_metrics, **po.compute_trajectory_metrics(dependency, mask, alpha)}
    assert metrics.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(metrics[k], expected[k], atol=0, rtol=0, msg=k)
