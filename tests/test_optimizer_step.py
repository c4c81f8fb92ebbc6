"""The optimizer step skips non-finite gradients, counts the skips, and too many in a row stop the run."""

import math

import pytest
import torch

from mtrl.agents.optimizer_step import (SkippedUpdates, TooManySkippedUpdates, clipped_optimizer_step,
                                        stop_after_skipped_updates)


def linear_with_grad(grad_value: float):
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    model.weight.grad = torch.full((1, 2), grad_value)
    return model


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_norm_skips_the_step_and_drops_the_gradient(bad):
    model = linear_with_grad(bad)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    norm = clipped_optimizer_step(model, optimizer, max_norm=1.0)
    assert not math.isfinite(norm)
    assert model.weight.tolist() == [[1.0, 2.0]] and model.weight.grad is None


def test_finite_norm_clips_and_steps():
    model = linear_with_grad(3.0)  # norm 3 * sqrt(2), clipped to 1: each component 1 / sqrt(2)
    norm = clipped_optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0), max_norm=1.0)
    assert norm == pytest.approx(3 * math.sqrt(2))
    expected = [1.0 - 1 / math.sqrt(2), 2.0 - 1 / math.sqrt(2)]
    assert model.weight[0].tolist() == pytest.approx(expected, abs=1e-6) and model.weight.grad is None


def test_skip_counter_counts_per_report_and_in_a_row_across_reports():
    skips = SkippedUpdates("critic")
    for norm in (1.0, math.nan, math.inf):
        assert skips.record(norm) is norm
    assert skips.metrics() == {"critic/skipped_updates": 2.0, "critic/skipped_updates_in_a_row": 2.0}
    skips.record(math.nan)
    assert skips.metrics() == {"critic/skipped_updates": 1.0, "critic/skipped_updates_in_a_row": 3.0}
    skips.record(0.5)
    assert skips.metrics() == {"critic/skipped_updates": 0.0, "critic/skipped_updates_in_a_row": 0.0}


def test_limit_of_skipped_updates_in_a_row_stops_with_a_message():
    metrics = {"actor/skipped_updates_in_a_row": 4.0, "critic/skipped_updates_in_a_row": 5.0, "actor/lr": 1.0}
    stop_after_skipped_updates(metrics, 6, step=3)
    stop_after_skipped_updates(metrics, None, step=3)
    stop_after_skipped_updates(metrics, 0, step=3)
    with pytest.raises(TooManySkippedUpdates, match=r"Step 3: the last 5 critic optimizer steps were skipped because "
                                                    r"the loss or the gradient was not finite .*"
                                                    r"training.max_skipped_updates = 5.*find_last_checkpoint=true"):
        stop_after_skipped_updates(metrics, 5, step=3)


@pytest.mark.slow
def test_a_run_whose_updates_stay_non_finite_stops_with_exit_2(tmp_path):
    """lr=1e30: the first mini-batch's step blows the weights up, every later gradient is NaN (already in step 1,
    which has several mini-batches); with max_skipped_updates=1 the first skip stops the run after logging it."""
    from test_checkpoint import run_cli

    proc, rows = run_cli(tmp_path, "nan", "worker.actor.optim.lr=1e30", "training.max_skipped_updates=1",
                         "training.save_freq=-1", steps=4, expect_rc=2)
    assert "mtrl: error: Step 1: the last 1 actor optimizer steps were skipped" in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["actor/skipped_updates"] >= 1.0 and rows[0]["actor/skipped_updates_in_a_row"] == 1.0
