"""The quickstart's RL stage (GRPO + TPRL, 2 FSDP2 CPU workers) with the vLLM engine in each worker process
(runs where vLLM is installed: the CI's vLLM job)."""

import math

import pytest

pytest.importorskip("vllm")

from shapes_assets import TEXT_VARYING_REWARD  # noqa: E402
from test_end_to_end import run_cli  # noqa: E402

from mtrl.models.tiny import build_tiny_model  # noqa: E402
from mtrl.utils.shapes_task import task_corpus  # noqa: E402

pytestmark = pytest.mark.vllm

VLLM = ["worker.rollout.name=vllm", "training.val_before_train=false", "dataset.rollout_batch_size=8"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The quickstart's tiny Qwen2-VL, with head_dim 32 (vLLM's CPU attention has no smaller head size)."""
    workdir = tmp_path_factory.mktemp("vllm_e2e")
    build_tiny_model("qwen2_vl", workdir / "outputs" / "quickstart" / "tiny_qwen2_vl", corpus=task_corpus("easy"),
                     hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    # The untrained model scores 0 on every answer: a reward that varies with the text gives non-zero advantages.
    (workdir / "text_reward.py").write_text(TEXT_VARYING_REWARD)
    return workdir


def _train_rows(rows):
    return [r for r in rows if "actor/pg_loss" in r]


@pytest.mark.parametrize("correction", ["none", "tis"])
def test_quickstart_rl_stage_with_vllm_on_two_workers(workdir, correction):
    _, rows = run_cli(workdir, f"vllm_{correction}", *VLLM, f"optimization.rollout_correction={correction}",
                      f"worker.reward.reward_fn_path={workdir / 'text_reward.py'}", steps=2)
    train = _train_rows(rows)
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        print(correction, {k: v for k, v in r.items() if k.startswith(("rollout/", "rollout_corr/", "timing/"))})
        assert math.isfinite(r["actor/pg_loss"]) and 0 < r["actor/grad_norm"] < math.inf
        assert 0 < r["response_length/mean"] <= 8
        # vLLM's log-probs are the behaviour policy's: without the suppressed vision placeholders, which hold
        # ~1.3% of the untrained model's mass (measured: mean |diff| 0.0126, max 0.0154, k3 8e-5), plus vLLM's
        # own CPU kernels vs the actor's padding-free forward.
        mean = r["rollout/logprob_abs_diff_mean"]
        assert 0 < mean <= r["rollout/logprob_abs_diff_max"] < 0.1
        assert 0 <= r["rollout/kl_actor_vs_rollout"] < 1e-3
        if correction == "tis":  # ratios just below 1, never truncated at the cap 2
            assert 1 - 2 * mean < r["rollout_corr/is_weight_mean"] <= 1


@pytest.mark.parametrize("lora_sync", ["merged", "adapter"])
def test_lora_actor_on_two_workers(workdir, lora_sync):
    """A LoRA actor through the real workers, its FSDP2-sharded weights synced merged, or (adapter) the base
    weights once and then the adapter's factors, served by vLLM's LoRA; vLLM's log-probs stay the actor's."""
    _, rows = run_cli(workdir, f"vllm_lora_{lora_sync}", *VLLM, "worker.actor.model.peft_type=lora",
                      "worker.actor.model.lora_rank=4", "worker.actor.optim.lr=1e-2",
                      f"worker.rollout.lora_sync={lora_sync}",
                      "optimization.disable_divergence=false", "optimization.divergence_penalty=kl",
                      f"worker.reward.reward_fn_path={workdir / 'text_reward.py'}", steps=2)
    train = {r["step"]: r for r in _train_rows(rows)}
    assert sorted(train) == [1, 2]
    # Step 2 samples from the trained adapter (the divergence to the base, its reference, is no longer 0) ...
    assert train[2]["actor/reward_divergence"] > 1e-7
    for r in train.values():  # ... and vLLM scores with it as the actor does (bounds of the test above)
        print(lora_sync, {k: v for k, v in r.items() if k.startswith(("rollout/", "actor/reward_div"))})
        assert 0 < r["rollout/logprob_abs_diff_mean"] <= r["rollout/logprob_abs_diff_max"] < 0.1
        assert 0 <= r["rollout/kl_actor_vs_rollout"] < 1e-3
