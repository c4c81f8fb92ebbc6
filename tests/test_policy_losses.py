"""Hand-computed cases for the registered policy losses other than PPO (one sequence, two tokens each),
how each composes with TPRL's token mask, and DAPO's overlong penalty.

Every case writes out the per-token terms in its comments; clip ratios are 0.2 / 0.28 (dual 3, which only
PPO uses) and the aggregation is token-mean unless said otherwise.
"""

import math

import pytest
import torch
from test_config import BASE

from mtrl.optimization import policy_optimization as po
from mtrl.optimization.config import POLICY_LOSS_NAMES, OptimizationConfig
from mtrl.training.training_main import main

T = torch.tensor
LOW, HIGH, DUAL = 0.2, 0.28, 3.0


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def two_tokens(ratios, advantages, probs=(0.3, 0.2)):
    """(old_log_probs, log_probs with grad, advantages, mask) for one sequence whose two tokens have
    probabilities ``probs`` now and the given ratios to the old policy."""
    log_probs = T([[math.log(p) for p in probs]], dtype=torch.float64, requires_grad=True)
    old = log_probs.detach() - T([[math.log(r) for r in ratios]], dtype=torch.float64)
    return old, log_probs, T([advantages], dtype=torch.float64), T([[1.0, 1.0]], dtype=torch.float64)


def loss_and_grad(name, inputs, mode="token-mean", token_mask=None, settings=OptimizationConfig()):
    old, log_probs, advantages, mask = inputs
    loss, metrics = po.get_policy_loss(name)(old, log_probs, advantages, mask, LOW, HIGH, DUAL, mode, token_mask,
                                             settings=settings)
    grad, = torch.autograd.grad(loss, log_probs)
    return loss, metrics, grad


def test_every_configurable_loss_is_registered_with_the_metrics_the_actor_logs():
    assert set(po.POLICY_LOSSES) == set(POLICY_LOSS_NAMES)
    for name in POLICY_LOSS_NAMES:
        _, metrics, _ = loss_and_grad(name, two_tokens((1.5, 0.5), (1.0, -1.0)))
        assert {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"} <= set(metrics), name
        assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values()), name
        close(metrics["ppo_kl"], -math.log(1.5 * 0.5) / 2)  # k1 over the valid tokens, whatever the loss


def test_gspo_sequence_ratio_and_its_gradient_differ_from_gspo_token_with_token_advantages():
    # ratios 1.2, 1.0: s = sqrt(1.2) = 1.0954 inside [0.8, 1.28], nothing clipped;
    # per token -A_t s = -1.0954, +0.5477 -> token-mean -0.27386 for both losses.
    s = math.sqrt(1.2)
    inputs = two_tokens((1.2, 1.0), (1.0, -0.5))
    loss, metrics, grad = loss_and_grad("gspo", inputs)
    close(loss, (-s + 0.5 * s) / 2)
    close(metrics["pg_clipfrac"], 0.0)
    # gspo: L = -(1/2) s sum_t A_t, ds/dlog pi_u = s / 2 -> every token gets -(1/2)(0.5) s / 2
    close(grad, [[-0.125 * s, -0.125 * s]])
    token_loss, _, token_grad = loss_and_grad("gspo_token", inputs)
    close(token_loss, loss)
    # gspo_token: token t's gradient is -(1/2) A_t s
    close(token_grad, [[-0.5 * s, 0.25 * s]])


def test_gspo_clips_the_whole_sequence():
    # ratios 2, 1: s = sqrt(2) = 1.414 > 1.28; A = 1 -> max(-1.414, -1.28) = -1.28 on both tokens, no gradient
    for name in ("gspo", "gspo_token"):
        loss, metrics, grad = loss_and_grad(name, two_tokens((2.0, 1.0), (1.0, 1.0)))
        close(loss, -1.28)
        close(metrics["pg_clipfrac"], 1.0)
        close(metrics["pg_clipfrac_lower"], 0.0)
        close(grad, [[0.0, 0.0]])


def test_gmpo_clips_log_ratios_then_takes_their_geometric_mean():
    # log-ratios ln 2 = 0.693, ln 0.5 = -0.693, A = 1 (> 0): the pessimistic clip min(l, clip(l, -0.2, 0.28))
    # gives 0.28 (clipped) and -0.693 (kept: below the bound); r = exp((0.28 - 0.693) / 2) = 0.8133, L = -r.
    r = math.exp((0.28 + math.log(0.5)) / 2)
    for mode in ("token-mean", "seq-mean-token-mean"):
        loss, metrics, grad = loss_and_grad("gmpo", two_tokens((2.0, 0.5), (1.0, 1.0)), mode)
        close(loss, -r)
        close(metrics["pg_clipfrac"], 1.0)  # both log-ratios differ from their clamp, with A > 0
        close(metrics["pg_clipfrac_lower"], 0.0)
        # token 0 sits on its clip (no gradient); token 1: dL/dl = -r / 2
        close(grad, [[0.0, -r / 2]])
    # A = -1: min(-l, -clip(l)) picks the larger log-ratio: 0.693 and -0.2 -> r = exp((0.693 - 0.2) / 2), L = +r
    loss, metrics, _ = loss_and_grad("gmpo", two_tokens((2.0, 0.5), (-1.0, -1.0)))
    close(loss, math.exp((math.log(2.0) - 0.2) / 2))
    close(metrics["pg_clipfrac_lower"], 1.0)


def test_cispo_weights_the_reinforce_term_by_the_clipped_ratio():
    # ratios 1.5, 0.5 clip to weights 1.28, 0.8; L_t = -w_t A_t log pi_t with pi = 0.3, 0.2, A = 1
    loss, metrics, grad = loss_and_grad("cispo", two_tokens((1.5, 0.5), (1.0, 1.0)))
    close(loss, (-1.28 * math.log(0.3) - 0.8 * math.log(0.2)) / 2)
    close(metrics["pg_clipfrac"], 1.0)
    # the weight is a constant: both tokens keep a gradient, -w_t A_t / 2 (PPO would give them none)
    close(grad, [[-0.64, -0.4]])


def test_sapo_gates_each_token_softly_with_its_sign_temperature():
    # ratios 1.5, 0.5, A = 1, -1: tau = 1 (positive) and 1.05 (negative, the default settings);
    # f(r) = (4 / tau) sigmoid(tau (r - 1)); L_t = -A_t f(r_t)
    f0, f1 = 4.0 * sigmoid(0.5), 4.0 / 1.05 * sigmoid(1.05 * -0.5)
    loss, metrics, grad = loss_and_grad("sapo", two_tokens((1.5, 0.5), (1.0, -1.0)))
    close(loss, (-f0 + f1) / 2)
    close(metrics["pg_clipfrac"], 0.0)
    # dL/dlog pi = -A f'(r) r, f'(r) = 4 sigmoid (1 - sigmoid) at tau (r - 1)
    close(grad, [[-4 * sigmoid(0.5) * (1 - sigmoid(0.5)) * 1.5 / 2,
                  4 * sigmoid(-0.525) * (1 - sigmoid(-0.525)) * 0.5 / 2]])
    # the temperatures come from the settings: tau+ = 2 gives f0 = 2 sigmoid(1)
    loss, _, _ = loss_and_grad("sapo", two_tokens((1.5, 0.5), (1.0, -1.0)),
                               settings=OptimizationConfig(sapo_tau_positive=2.0))
    close(loss, (-2.0 * sigmoid(1.0) + f1) / 2)


def test_clip_cov_detaches_a_high_covariance_token_that_is_not_clipped():
    # log pi = ln 0.3, ln 0.2 (mean -1.4067), A = 1, -1 (mean 0): both covariances are
    # (0.5 ln 1.5) = 0.2027. Token 0 (ratio 1.5, A > 0) is already clipped: -1.28; token 1 (ratio 0.9):
    # -A r = 0.9, the only candidate in (0.1, 5) -> detached (loss 0).
    inputs = two_tokens((1.5, 0.9), (1.0, -1.0))
    settings = OptimizationConfig(clip_cov_ratio=0.5, clip_cov_lb=0.1)
    loss, metrics, grad = loss_and_grad("clip_cov", inputs, settings=settings)
    close(loss, -1.28 / 2)
    close(metrics["pg_clipfrac"], 0.5)  # the detached fraction
    close(grad, [[0.0, 0.0]])
    # covariance 0.2027 below clip_cov_lb = 0.3: nothing detached, plain clipped PPO
    loss, metrics, grad = loss_and_grad("clip_cov", inputs, settings=OptimizationConfig(clip_cov_lb=0.3))
    close(loss, (-1.28 + 0.9) / 2)
    close(metrics["pg_clipfrac"], 0.0)
    close(grad, [[0.0, 0.9 / 2]])


def test_kl_cov_adds_the_kl_term_to_the_top_covariance_tokens():
    # ratio 1 of 2 tokens selected -> both: L_t = -A_t r_t + 0.5 |ln r_t| (no clipping)
    inputs = two_tokens((1.5, 0.9), (1.0, -1.0))
    settings = OptimizationConfig(kl_cov_ratio=1.0, kl_cov_coef=0.5)
    loss, metrics, grad = loss_and_grad("kl_cov", inputs, settings=settings)
    close(loss, (-1.5 + 0.5 * math.log(1.5) + 0.9 - 0.5 * math.log(0.9)) / 2)
    close(metrics["pg_clipfrac"], 1.0)  # the penalised fraction
    close(grad, [[(-1.5 + 0.5) / 2, (0.9 - 0.5) / 2]])
    # one of three tokens: the one of largest covariance (A - 0) (log pi - mean): token 2 (A = 2, pi = 0.9)
    log_probs = T([[math.log(0.1), math.log(0.5), math.log(0.9)]], dtype=torch.float64)
    advantages, mask = T([[-1.0, -1.0, 2.0]], dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)
    old = log_probs - math.log(1.1)
    loss, _ = po.compute_kl_cov_loss(old, log_probs, advantages, mask, LOW, HIGH, DUAL,
                                     settings=OptimizationConfig(kl_cov_ratio=0.34, kl_cov_coef=0.5))
    close(loss, (-sum(advantages[0].tolist()) * 1.1 + 0.5 * math.log(1.1)) / 3)


# ------------------------------------------------------------------------ TPRL composes with every loss


def random_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(3, 6, generator=g, dtype=torch.float64) - 2
    log_probs = (old + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    advantages = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = (torch.arange(6) < T([[6], [4], [2]])).double()
    return old, log_probs, advantages, mask


# clip_cov / kl_cov with ratios that select several tokens (the defaults select one), lb below 0 so
# candidates exist
COVARIANCE_SETTINGS = OptimizationConfig(clip_cov_ratio=0.3, clip_cov_lb=-5.0, kl_cov_ratio=0.3)


@pytest.mark.parametrize("name", POLICY_LOSS_NAMES)
def test_a_filtered_token_gets_no_gradient_and_stays_in_the_denominator(name):
    old, log_probs, advantages, mask = random_inputs()
    token_mask = T([[1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.float64)
    torch.manual_seed(0)
    loss, _, grad = loss_and_grad(name, (old, log_probs, advantages, mask), token_mask=token_mask,
                                  settings=COVARIANCE_SETTINGS)
    assert torch.all(grad[(token_mask == 0) | (mask == 0)] == 0), name
    assert torch.count_nonzero(grad) > 0, name
    # an all-ones token mask is no mask at all
    for mode in po.LOSS_AGG_MODES:
        torch.manual_seed(0)
        plain, _, plain_grad = loss_and_grad(name, (old, log_probs, advantages, mask), mode,
                                             settings=COVARIANCE_SETTINGS)
        torch.manual_seed(0)
        ones, _, ones_grad = loss_and_grad(name, (old, log_probs, advantages, mask), mode, token_mask=mask.clone(),
                                           settings=COVARIANCE_SETTINGS)
        close(ones, plain, atol=1e-12)
        close(ones_grad, plain_grad, atol=1e-12)


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_ratio_is_over_the_kept_tokens_and_the_normaliser_over_all(name):
    # three tokens, ratios 1.1, 1.2 and a filtered 50 that would push s far outside the clip range:
    # s = sqrt(1.1 * 1.2) = 1.1489; A = 1 -> loss (-s - s + 0) / 3 (the filtered token still counts)
    ratios = T([[1.1, 1.2, 50.0]], dtype=torch.float64)
    log_probs = torch.full((1, 3), -1.0, dtype=torch.float64, requires_grad=True)
    old = log_probs.detach() - ratios.log()
    mask, token_mask = torch.ones(1, 3, dtype=torch.float64), T([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, metrics = po.get_policy_loss(name)(old, log_probs, torch.ones(1, 3, dtype=torch.float64), mask,
                                             LOW, HIGH, DUAL, "token-mean", token_mask)
    s = math.sqrt(1.1 * 1.2)
    close(loss, -2 * s / 3)
    close(metrics["pg_clipfrac"], 0.0)
    grad, = torch.autograd.grad(loss, log_probs)
    close(grad, [[-s / 3, -s / 3, 0.0]])


# ------------------------------------------------------------------------ DAPO overlong shaping


def test_overlong_penalty_is_linear_over_the_buffer():
    # L = 10, B = 4: no penalty up to 6 tokens, then -(l - 6) / 4 * factor, -factor at 10
    penalty = po.overlong_penalty(T([3, 6, 7, 8, 10]), 10, 4, 0.5)
    close(penalty, [0.0, 0.0, -0.125, -0.25, -0.5])
    close(po.overlong_penalty(T([3, 10]), 10, 0, 0.5), [0.0, 0.0])  # buffer 0: off
    close(po.overlong_penalty(T([10]), 10, 10, 1.0), [-1.0])  # the whole length as the buffer
    with pytest.raises(ValueError, match="overlong buffer"):
        po.overlong_penalty(T([3]), 10, 11, 1.0)


# ------------------------------------------------------------------------ their config keys


@pytest.mark.parametrize("override, message", [
    ("optimization.sapo_tau_negative=0", "`optimization.sapo_tau_negative` = 0.0 must be > 0."),
    ("optimization.clip_cov_ratio=0", "`optimization.clip_cov_ratio` = 0.0 is out of range; allowed: (0, 1]."),
    ("optimization.kl_cov_ratio=1.5", "`optimization.kl_cov_ratio` = 1.5 is out of range; allowed: (0, 1]."),
    ("optimization.clip_cov_lb=5", "`optimization.clip_cov_lb` = 5.0 must be < `optimization.clip_cov_ub` = 5.0."),
    ("optimization.kl_cov_coef=-1", "`optimization.kl_cov_coef` = -1.0 must be >= 0."),
    ("optimization.overlong_buffer_length=600", "`optimization.overlong_buffer_length (0 = off; at most the max "
                                                "response length)` = 600 is out of range; allowed: [0, 512]."),
    ("optimization.overlong_penalty_factor=-0.5", "`optimization.overlong_penalty_factor` = -0.5 must be >= 0."),
])
def test_loss_settings_out_of_range_exit_2_naming_the_key(capsys, override, message):
    assert main([*BASE, override]) == 2
    assert message in capsys.readouterr().err
