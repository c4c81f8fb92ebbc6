"""Each registered policy loss other than PPO (which tests/test_end_to_end.py runs) trains the quickstart's
RL stage (GRPO + TPRL, 2 FSDP2 CPU workers) for two steps through the CLI, with DAPO's overlong shaping on
(slow).

The untrained tiny model scores 0 on every quickstart answer and rarely stops before the 8-token limit (so
the overlong penalty alone is often the same for every response of a step): the runs score responses with
a reward that varies with their text, so each loss gets non-zero advantages; the penalty is checked on top.
"""

import math

import pytest
from shapes_assets import TEXT_VARYING_REWARD
from test_end_to_end import run_cli

from mtrl.optimization.config import POLICY_LOSS_NAMES

# buffer = the whole max response length (8 tokens): a response of l tokens gets -0.5 l / 8
OVERLONG = ["optimization.overlong_buffer_length=8", "optimization.overlong_penalty_factor=0.5"]
# clip_cov / kl_cov restrain 5% of the tokens instead of verl's 0.02% (which is one token here)
COVARIANCE = ["optimization.clip_cov_ratio=0.05", "optimization.clip_cov_lb=-1", "optimization.kl_cov_ratio=0.05"]
FAST = ["training.val_before_train=false", "dataset.rollout_batch_size=8"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for all runs, so the generated task and tiny model are made once."""
    return tmp_path_factory.mktemp("losses_e2e")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in POLICY_LOSS_NAMES if n != "ppo"])
def test_each_policy_loss_trains_two_steps_with_overlong_shaping(workdir, name):
    reward = workdir / "text_reward.py"
    reward.write_text(TEXT_VARYING_REWARD)
    _, rows = run_cli(workdir, f"loss_{name}", f"optimization.policy_loss={name}", *OVERLONG, *COVARIANCE, *FAST,
                      f"worker.reward.reward_fn_path={reward}", steps=2)
    train_rows = [r for r in rows if "actor/pg_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:
        assert math.isfinite(r["actor/pg_loss"]) and math.isfinite(r["actor/approx_kl"])
        assert 0 < r["actor/grad_norm"] < math.inf
        # the mean penalty is -0.5 / 8 times the step's mean response length
        assert r["reward/overlong_penalty_mean"] == pytest.approx(-0.5 / 8 * r["response_length/mean"], abs=1e-6)
    # validation is not shaped: the reward function's scores lie in [0, 1], while shaped scores of these mostly
    # 8-token responses would be about reward - 0.5, often < 0
    val_scores = [r["val/reward_score"] for r in rows if "val/reward_score" in r]
    assert val_scores and all(v >= 0 for v in val_scores)
