"""Rollout-vs-training mismatch: the HF engine's sampled-token log-probs (equal to a transformers forward of
the same tokens), the mismatch metrics and the truncated / masked importance weights (hand-computed), the
weights in every registered policy loss and in the actor's update, and their config keys."""

import math

import pytest
import torch
from test_agent import ROWS, make_batch, tiny_model
from test_config import BASE
from test_rollout import prompts, tiny  # noqa: F401  (the engine tests' tiny Qwen2-VL and its two prompts)

from mtrl.agents.parallel_policy_agent import ParallelPolicyAgent
from mtrl.config.worker import ActorConfig
from mtrl.models.multimodal import mm_token_type_ids
from mtrl.models.tiny import make_tiny_model
from mtrl.optimization import policy_optimization as po
from mtrl.optimization.config import POLICY_LOSS_NAMES, OptimizationConfig
from mtrl.training.training_main import main
from mtrl.workers.rollout import SamplingParams
from mtrl.workers.rollout.hf_engine import HFRolloutEngine, SeededSampling

T = torch.tensor


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# ------------------------------------------------------------------ the engine's log-probs


def forward_log_probs(model, out, params, suppressed=()):
    """Each response token's log-prob under the distribution sampling drew it from, by one unpadded
    transformers forward per row: suppressed tokens removed, / T, top-k, top-p (as SeededSampling shapes)."""
    shape = (lambda x: x) if params.greedy else SeededSampling([0], params, torch.device("cpu")).shape
    result = torch.zeros(out["responses"].shape, dtype=torch.float64)
    for i in range(len(out)):
        prompt = out["prompts"][i][out["attention_mask"][i, :out["prompts"].shape[1]].bool()]
        response = out["responses"][i][out["response_mask"][i].bool()]
        ids = torch.cat([prompt, response])[None]
        vision = dict(out["multi_modal_inputs"][i] or {})
        if vision:
            vision["mm_token_type_ids"] = mm_token_type_ids(ids, model.config)
        with torch.no_grad():
            logits = model(input_ids=ids, **vision).logits[0, len(prompt) - 1:-1].double()
        logits[:, list(suppressed)] = float("-inf")
        scores = shape(logits).double()
        result[i, :len(response)] = torch.log_softmax(scores, -1).gather(-1, response[:, None])[:, 0]
    return result


@pytest.mark.parametrize("params", [
    SamplingParams(n=1, temperature=0.0, max_new_tokens=6),                          # greedy: T = 1
    SamplingParams(n=3, temperature=0.7, top_k=5, max_new_tokens=6, seed=3),          # seeded sampling, top-k
    SamplingParams(n=2, temperature=1.3, top_p=0.8, max_new_tokens=6, seed=4),        # top-p
])
def test_engine_log_probs_equal_a_transformers_forward_of_the_same_tokens(tiny, prompts, params):
    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    engine = HFRolloutEngine(lambda: make_tiny_model("qwen2_vl", seed=123).model, tiny.model.config, [eos],
                             tiny.tokenizer.pad_token_id, torch.device("cpu"), micro_batch_size=4)
    engine.load_weights(tiny.model.state_dict().items())
    out = engine.generate(prompts.select(), params)
    log_probs = out["rollout_log_probs"]
    assert log_probs.dtype == torch.float32 and log_probs.shape == out["responses"].shape
    assert torch.all(log_probs[out["response_mask"] == 0] == 0) and torch.all(log_probs <= 0)
    expected = forward_log_probs(tiny.model, out, params, engine.suppress_tokens)
    close(log_probs, expected, atol=1e-5)
    # the tiny model is far from deterministic: real log-probs, not ~0 everywhere
    assert float(log_probs[out["response_mask"].bool()].mean()) < -1.0


# ------------------------------------------------------------------ weights and metrics, by hand

# one sequence of three valid tokens and a padding position; log r = old - rollout = (0.9, -0.2, 0.1, *)
OLD = T([[-1.0, -2.0, -0.5, 0.0]], dtype=torch.float64)
ROLLOUT = T([[-1.9, -1.8, -0.6, -7.0]], dtype=torch.float64)
MASK = T([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)


def test_token_level_weights_truncate_or_mask_each_token_ratio():
    e = math.exp
    # ratios e^0.9 = 2.46 (above the cap 2), e^-0.2 = 0.82, e^0.1 = 1.105
    close(po.compute_rollout_is_weights(OLD, ROLLOUT, MASK, "tis", "token", 2.0), [[2.0, e(-0.2), e(0.1), 0]])
    close(po.compute_rollout_is_weights(OLD, ROLLOUT, MASK, "mis", "token", 2.0), [[0.0, e(-0.2), e(0.1), 0]])
    # cap 1.2: MIS keeps [1/1.2, 1.2] = [0.833, 1.2]: 0.82 is below
    close(po.compute_rollout_is_weights(OLD, ROLLOUT, MASK, "mis", "token", 1.2), [[0.0, 0.0, e(0.1), 0]])


def test_sequence_level_weight_is_the_capped_product_of_the_token_ratios():
    # product e^(0.9 - 0.2 + 0.1) = e^0.8 = 2.2255: tis caps it at 3 -> itself, at 2 -> 2; mis at 2 -> 0
    product = math.exp(0.8)
    close(po.compute_rollout_is_weights(OLD, ROLLOUT, MASK, "tis", "sequence", 3.0), [[product] * 3 + [0]])
    close(po.compute_rollout_is_weights(OLD, ROLLOUT, MASK, "tis", "sequence", 2.0), [[2.0] * 3 + [0]])
    close(po.compute_rollout_is_weights(OLD, ROLLOUT, MASK, "mis", "sequence", 2.0), [[0.0] * 4])
    close(po.compute_rollout_is_weights(OLD, ROLLOUT, MASK, "mis", "sequence", 3.0), [[product] * 3 + [0]])


def test_mismatch_metrics_over_the_response_tokens():
    m = po.rollout_mismatch_metrics(OLD, ROLLOUT, MASK)
    close(m["logprob_abs_diff_mean"], (0.9 + 0.2 + 0.1) / 3)
    close(m["logprob_abs_diff_max"], 0.9)  # the padding position's 7.0 does not count
    k3 = sum(math.exp(x) - x - 1 for x in (0.9, -0.2, 0.1)) / 3
    close(m["kl_actor_vs_rollout"], k3)
    same = po.rollout_mismatch_metrics(OLD, OLD, MASK)
    assert all(float(v) == 0 for v in same.values())


def test_weight_metrics():
    weights = po.compute_rollout_is_weights(OLD, ROLLOUT, MASK, "mis", "token", 1.2)
    m = po.rollout_is_weight_metrics(weights, OLD, ROLLOUT, MASK, "token", 1.2)
    close(m["is_weight_mean"], math.exp(0.1) / 3)
    close(m["ratio_fraction_high"], 1 / 3)   # 2.46 > 1.2
    close(m["ratio_fraction_low"], 1 / 3)    # 0.82 < 1 / 1.2
    close(m["masked_fraction"], 2 / 3)


def test_apply_rollout_correction_adds_the_weights_and_the_logged_metrics():
    tensors = {"old_log_probs": OLD.float(), "rollout_log_probs": ROLLOUT.float(), "response_mask": MASK.long()}
    metrics = po.apply_rollout_correction(tensors, OptimizationConfig())
    assert set(metrics) == {"rollout/logprob_abs_diff_mean", "rollout/logprob_abs_diff_max",
                            "rollout/kl_actor_vs_rollout"} and "rollout_is_weights" not in tensors
    metrics = po.apply_rollout_correction(tensors, OptimizationConfig(rollout_correction="tis"))
    close(tensors["rollout_is_weights"], [[2.0, math.exp(-0.2), math.exp(0.1), 0]])
    assert {"rollout_corr/is_weight_mean", "rollout_corr/masked_fraction", "rollout_corr/ratio_fraction_high",
            "rollout_corr/ratio_fraction_low"} <= set(metrics)
    assert metrics["rollout_corr/masked_fraction"] == 0  # tis truncates, never masks
    del tensors["rollout_log_probs"]
    with pytest.raises(RuntimeError, match="rollout_log_probs"):
        po.apply_rollout_correction(tensors, OptimizationConfig(rollout_correction="mis"))
    assert po.apply_rollout_correction(tensors, OptimizationConfig()) == {}


# ------------------------------------------------------------------ the weights in the policy losses

def random_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(3, 6, generator=g, dtype=torch.float64) - 2
    log_probs = (old + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    advantages = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = (torch.arange(6) < T([[6], [4], [2]])).double()
    return old, log_probs, advantages, mask


# clip_cov / kl_cov select several tokens (lb below 0 so that candidates exist)
SETTINGS = OptimizationConfig(clip_cov_ratio=0.3, clip_cov_lb=-5.0, kl_cov_ratio=0.3)


def loss_and_grad(name, inputs, mode="token-mean", weights=None):
    old, log_probs, advantages, mask = inputs
    torch.manual_seed(0)  # clip_cov's draw
    loss, _ = po.get_policy_loss(name)(old, log_probs, advantages, mask, 0.2, 0.28, 3.0, mode,
                                       settings=SETTINGS, rollout_is_weights=weights)
    grad, = torch.autograd.grad(loss, log_probs)
    return loss, grad


@pytest.mark.parametrize("mode", po.LOSS_AGG_MODES)
@pytest.mark.parametrize("name", POLICY_LOSS_NAMES)
def test_every_policy_loss_scales_each_sequence_by_its_weight(name, mode):
    inputs = random_inputs()
    plain, plain_grad = loss_and_grad(name, inputs, mode)
    mask = inputs[3]
    ones, ones_grad = loss_and_grad(name, inputs, mode, weights=mask.clone())
    close(ones, plain, atol=1e-12)
    close(ones_grad, plain_grad, atol=1e-12)
    # a sequence-level weight c_i (every token of row i) multiplies row i's loss and gradient by c_i
    c = T([[0.5], [2.0], [0.25]], dtype=torch.float64)
    weighted, weighted_grad = loss_and_grad(name, inputs, mode, weights=c * mask)
    close(weighted_grad, c * plain_grad, atol=1e-10)
    # the loss is linear in the per-row terms, so it is the weighted sum of the single-row losses (gmpo's
    # geometric mean floors a zero weight at 1e-10, as verl's does: hence not exactly)
    rows = [loss_and_grad(name, inputs, mode, weights=(torch.arange(3)[:, None] == i).double() * mask)[0]
            for i in range(3)]
    close(weighted, sum(float(ci) * r for ci, r in zip(c[:, 0], rows)), atol=1e-8)
    assert torch.count_nonzero(weighted_grad) > 0


# gspo / gmpo: the other tokens' losses still reach a masked token through the sequence ratio
@pytest.mark.parametrize("name", [n for n in POLICY_LOSS_NAMES if n not in ("gspo", "gmpo")])
def test_a_masked_token_gets_no_gradient(name):
    inputs = random_inputs()
    weights = inputs[3].clone()
    weights[0, 1] = 0.0  # masked importance sampling dropped this token
    masked, grad = loss_and_grad(name, inputs, weights=weights)
    assert grad[0, 1] == 0 and torch.count_nonzero(grad[0]) > 0
    if name in ("ppo", "cispo", "sapo"):
        # per-token losses: a 0/1 weight is TPRL's token mask (the token stays in the denominator)
        filtered, _ = po.get_policy_loss(name)(*inputs, 0.2, 0.28, 3.0, token_mask=weights, settings=SETTINGS)
        close(masked, filtered, atol=1e-12)


def test_gmpo_weights_a_sequence_by_the_geometric_mean_of_its_token_weights():
    inputs = random_inputs()
    mask = inputs[3]
    weights = mask * T([[0.5, 2.0, 1.0, 1.0, 4.0, 1.0]], dtype=torch.float64)
    weighted, _ = loss_and_grad("gmpo", inputs, "seq-mean-token-mean", weights)
    geometric = T([[(0.5 * 2 * 4) ** (1 / 6)], [1.0], [(0.5 * 2) ** 0.5]], dtype=torch.float64)
    expected, _ = loss_and_grad("gmpo", inputs, "seq-mean-token-mean", geometric * mask)
    close(weighted, expected, atol=1e-12)


# ------------------------------------------------------------------ the actor's update


def agent_update(weights=None):
    model = tiny_model()
    agent = ParallelPolicyAgent(ActorConfig(micro_batch_size_per_device_for_update=3, max_grad_norm=1e9,
                                            dynamic_batching=False), model, torch.device("cpu"),
                                torch.optim.SGD(model.parameters(), lr=1.0))
    batch = make_batch()
    old = agent.compute_log_probs(batch, temperature=1.0)["log_probs"]
    batch.tensors["old_log_probs"] = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))
    if weights is not None:
        batch.tensors["rollout_is_weights"] = weights * batch.tensors["response_mask"]
    metrics = agent.update_policy(batch, temperature=1.0, opt=OptimizationConfig(), mini_batch_size=ROWS)
    return model, metrics


def test_the_actor_update_applies_the_batch_weights():
    initial = tiny_model()
    plain, plain_metrics = agent_update()
    halved, halved_metrics = agent_update(torch.full((ROWS, 1), 0.5))
    assert halved_metrics["actor/pg_loss"] == pytest.approx(0.5 * plain_metrics["actor/pg_loss"], abs=1e-7)
    # one SGD step of lr 1 without clipping: the parameter change is linear in the loss
    for p0, p, q in zip(initial.parameters(), plain.parameters(), halved.parameters()):
        torch.testing.assert_close(q - p0, 0.5 * (p - p0), atol=1e-6, rtol=0)
    zero, zero_metrics = agent_update(torch.zeros(ROWS, 1))
    assert zero_metrics["actor/pg_loss"] == 0
    assert all(torch.equal(p0, q) for p0, q in zip(initial.parameters(), zero.parameters()))


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("override, message", [
    ("optimization.rollout_correction=is", "`optimization.rollout_correction` = 'is' is not allowed. "
                                           "Allowed values: none, tis, mis. Did you mean `tis`?"),
    ("optimization.rollout_correction_level=seq", "`optimization.rollout_correction_level` = 'seq' is not allowed"),
    ("optimization.rollout_is_cap=1.0", "`optimization.rollout_is_cap` = 1.0 must be > 1"),
])
def test_bad_rollout_correction_settings_exit_2(capsys, override, message):
    assert main([*BASE, "optimization.rollout_correction=tis", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
