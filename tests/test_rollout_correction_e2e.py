"""The quickstart's RL stage (GRPO + TPRL, 2 FSDP2 CPU workers, hf engine) for two steps through the CLI with
truncated importance sampling on (slow): the mismatch and weight metrics are logged every step, finite.

The engine's log-probs are the behaviour policy's: sampling never draws the vision placeholder tokens, so
their probability is removed from its distribution, while the actor's old log-probs keep it. On the untrained
tiny model those four tokens hold ~1.4% of the mass (measured: mean |diff| 0.0136, k3 KL ~1e-4, in fp32 and
bf16 alike; a trained model gives them ~0); the numerical part on top is ~1e-7 in fp32 and ~1.6e-4 in bf16
(KV-cached decoding vs one padding-free forward; measured before the suppressed mass was counted). All far from
the cap, so TIS truncates nothing and the weights are the ratios themselves, slightly below 1.
"""

import math

import pytest
from test_end_to_end import run_cli
from shapes_assets import TEXT_VARYING_REWARD
from test_policy_losses_e2e import FAST

# largest mean |diff|, largest max |diff|, largest k3 KL allowed: a few times what was measured
BOUNDS = (0.05, 0.1, 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16"])
def test_quickstart_rl_with_tis_logs_the_mismatch(tmp_path, dtype):
    reward = tmp_path / "text_reward.py"
    reward.write_text(TEXT_VARYING_REWARD)
    _, rows = run_cli(tmp_path, f"tis_{dtype}", "optimization.rollout_correction=tis",
                      f"worker.actor.fsdp.mixed_precision_dtype={dtype}", *FAST,
                      f"worker.reward.reward_fn_path={reward}", steps=2)
    train_rows = [r for r in rows if "actor/pg_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    max_mean, max_max, max_kl = BOUNDS
    for r in train_rows:
        logged = {k: v for k, v in r.items() if k.startswith(("rollout/", "rollout_corr/"))}
        print(dtype, logged)
        assert len(logged) == 7 and all(math.isfinite(v) for v in logged.values())
        mean, biggest = r["rollout/logprob_abs_diff_mean"], r["rollout/logprob_abs_diff_max"]
        assert 0 < mean <= biggest and mean < max_mean and biggest < max_max  # never exactly equal engines
        assert 0 <= r["rollout/kl_actor_vs_rollout"] < max_kl
        # pi_old / pi_rollout = 1 - (the suppressed mass): just below 1
        assert 1 - 2 * mean < r["rollout_corr/is_weight_mean"] < 1
        assert r["rollout_corr/ratio_fraction_high"] == 0 and r["rollout_corr/masked_fraction"] == 0
        assert math.isfinite(r["actor/pg_loss"]) and 0 < r["actor/grad_norm"] < math.inf
