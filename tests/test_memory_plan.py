"""The memory planner (mtrl/tools/memory_plan.py): exact parameter counts, the hand-computed formulas, how the
plan responds to sharding / LoRA / checkpointing / offload / vLLM, the CLI and the start-up check, and (slow) the
estimate against memory measured on CPU for a real update."""

import logging
import sys
from pathlib import Path

import pytest
import torch

from mtrl.tools import memory_plan as mp
from mtrl.training.training_config import load_config

ROOT = Path(__file__).resolve().parents[1]
QWEN_7B = "Qwen/Qwen2.5-VL-7B-Instruct"


def config(*overrides):
    return load_config(["dataset.train_files=x.jsonl", "optimization.advantage_estimator=grpo",
                        "worker.rollout.n=8", f"worker.actor.model.model_path={QWEN_7B}", *overrides])


@pytest.fixture(scope="module")
def qwen_7b():
    return mp.read_architecture(QWEN_7B)


def row(plan, prefix):
    matches = [r for r in plan.rows if r.component.startswith(prefix)]
    assert len(matches) == 1, [r.component for r in plan.rows]
    return matches[0]


@pytest.mark.parametrize("hub_id, params", [
    ("Qwen/Qwen2.5-VL-7B-Instruct", 8_292_166_656), ("Qwen/Qwen2.5-VL-32B-Instruct", 33_448_292_352),
    ("Qwen/Qwen2.5-VL-72B-Instruct", 73_406_351_360), ("Qwen/Qwen3-VL-8B-Instruct", 8_767_123_696),
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512)])
def test_known_hub_configs_give_the_published_parameter_counts_offline(hub_id, params):
    arch = mp.read_architecture(hub_id)
    assert arch.params == params  # 8.29B, 33.45B, 73.41B, 8.77B, 7.62B as the model cards say
    assert "built-in table" in arch.source


def test_a_local_folder_is_read_from_its_config_json_and_counted_exactly(tmp_path):
    from mtrl.models.tiny import build_tiny_model, make_tiny_model

    folder = build_tiny_model("qwen2_5_vl", tmp_path / "m")
    arch = mp.read_architecture(folder)
    model = make_tiny_model("qwen2_5_vl").model
    assert arch.params == sum(p.numel() for p in model.parameters())
    assert arch.vision.params == sum(p.numel() for p in model.model.visual.parameters())
    assert arch.source.endswith("config.json")
    assert (arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.head_dim) == (64, 2, 4, 2, 16)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a known Hub id"):
        mp.read_architecture("someone/unknown-model")


def test_layer_activation_formula_by_hand():
    # h=8, I=16, H=2, K=1, d=4, T=10, bf16: norms 2*(4+2)*8 = 96; qkv (flash) 2*(8+2*4) = 32; attention out
    # 2*8 = 16; MLP 4*2*16 = 128 -> 272 bytes per token.
    assert mp.layer_activation_bytes(10, 8, 16, 2, 1, 4, b=2, flash=True) == 10 * 272
    # CPU kernel, fp32: norms 2*8*8 = 128; qkv repeated 4*3*8 = 96; attention out + copy 4*2*8 = 64; MLP 4*4*16 = 256.
    assert mp.layer_activation_bytes(10, 8, 16, 2, 1, 4, b=4, flash=False) == 10 * 544
    # Logits: 2 * N * V * b + 2 fp32 chunks of min(N, 1024) rows.
    assert mp.logits_bytes(2048, 100, 2) == 2 * 2048 * 100 * 2 + 8 * 1024 * 100


def test_fsdp_shards_scale_with_the_world_size(qwen_7b):
    one = mp.plan_memory(config("training.n_gpus_per_node=1"), qwen_7b)
    eight = mp.plan_memory(config("training.n_gpus_per_node=8"), qwen_7b)
    for prefix in ("actor parameters", "actor gradients", "actor AdamW exp_avg", "reference parameters"):
        assert row(one, prefix).bytes["update"] == pytest.approx(8 * row(eight, prefix).bytes["update"])
    assert row(eight, "actor parameters").bytes["update"] == pytest.approx(4 * qwen_7b.params / 8)
    assert row(eight, "reference parameters").bytes["update"] == pytest.approx(2 * qwen_7b.params / 8)  # bf16
    assert row(eight, "actor AdamW exp_avg").bytes["update"] == pytest.approx(8 * qwen_7b.params / 8)
    no_shard = mp.plan_memory(config("worker.actor.fsdp.sharding_strategy=NO_SHARD"), qwen_7b)
    assert row(no_shard, "actor parameters").bytes["update"] == pytest.approx(4 * qwen_7b.params)


def test_lora_trains_only_the_adapter_and_needs_no_reference_copy(qwen_7b):
    plan = mp.plan_memory(config("optimization.disable_divergence=false", "worker.actor.model.peft_type=lora",
                                 "worker.actor.model.lora_rank=8"), qwen_7b)
    # q_proj (3584 -> 3584) and v_proj (3584 -> 512) in 28 layers: 8 * (7168 + 4096) * 28.
    adapter = 8 * (3584 + 3584 + 3584 + 512) * 28
    assert row(plan, "actor gradients").bytes["update"] == pytest.approx(4 * adapter / 8)
    assert not [r for r in plan.rows if r.component.startswith("reference")]
    assert any("LoRA" in n for n in plan.notes)


def test_gradient_checkpointing_keeps_one_hidden_state_per_layer(qwen_7b):
    on = row(mp.plan_memory(config(), qwen_7b), "actor activations: decoder").bytes["update"]
    off = row(mp.plan_memory(config("worker.actor.model.enable_gradient_checkpointing=false"), qwen_7b),
              "actor activations: decoder").bytes["update"]
    tokens = 16384  # max_token_len_per_device
    per_layer = mp.layer_activation_bytes(tokens, 3584, 18944, 28, 4, 128, b=2, flash=True)
    final_norm = 6 * 3584 * tokens
    assert off == pytest.approx(28 * per_layer + final_norm)
    assert on == pytest.approx(28 * 2 * 3584 * tokens + per_layer + final_norm)


def test_offload_and_vllm_pool(qwen_7b):
    plan = mp.plan_memory(config("worker.actor.offload.offload_optimizer=true", "worker.ref.offload_params=true",
                                 "worker.rollout.name=vllm", "worker.rollout.gpu_memory_utilization=0.5"),
                          qwen_7b, device_memory_gb=80)
    adam = row(plan, "actor AdamW exp_avg")
    assert "generate" not in adam.bytes and adam.bytes["update"] > 0
    assert set(row(plan, "reference parameters").bytes) == {"logprob"}
    assert row(plan, "vLLM pool").bytes["generate"] == 40 * mp.GB
    assert "hf engine" not in " ".join(r.component for r in plan.rows)
    hf = mp.plan_memory(config(), qwen_7b)
    # KV cache: 16 rows x 1024 tokens x 2 (k, v) x 28 layers x 4 kv heads x 128 x 2 bytes.
    assert row(hf, "hf engine: KV cache").bytes["generate"] == 16 * 1024 * 2 * 28 * 4 * 128 * 2
    # The streamed sync holds one full tensor at a time in bf16: the 152064 x 3584 embedding is the largest.
    assert qwen_7b.largest_param == 152064 * 3584
    assert row(hf, "weight sync").bytes["sync"] == 2 * 152064 * 3584
    bucketed = mp.plan_memory(config(), qwen_7b, sync_bucket_gb=1.0)
    assert row(bucketed, "weight sync").bytes["sync"] == mp.GB


def test_the_cli_prints_the_table_and_says_whether_it_fits(capsys):
    args = ["dataset.train_files=x.jsonl", "optimization.advantage_estimator=grpo", "worker.rollout.n=8",
            "worker.actor.model.model_path=Qwen/Qwen2.5-VL-72B-Instruct", "training.n_gpus_per_node=8"]
    assert mp.main(args) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "73.406B parameters" in out and "actor AdamW" in out
    assert mp.main(args[:3] + ["worker.actor.model.model_path=Qwen/Qwen2.5-7B-Instruct",
                               "--gpu-memory-gb", "1000"]) == 0
    assert "fits: peak" in capsys.readouterr().out
    assert mp.main(args[:3] + ["worker.actor.model.model_path=/nonexistent/model"]) == 2
    assert mp.main(["worker.actor.bogus=1"]) == 2


def test_staged_configs_get_one_plan_per_stage():
    cfg = load_config([f"config={ROOT / 'configs/quickstart.yaml'}"])
    plans = mp.plans_for_config(cfg, "cpu", 80, arch=mp.read_architecture(QWEN_7B))
    assert [p.title for p in plans] == ["stage sft_warmup (sft)", "stage rl (rl)"]
    assert "generate" not in plans[0].phases and "generate" in plans[1].phases


def test_startup_check_warns_on_gpu_and_informs_on_cpu(caplog):
    big = config("worker.actor.model.model_path=Qwen/Qwen2.5-VL-72B-Instruct", "training.n_gpus_per_node=1")
    with caplog.at_level(logging.INFO, logger="mtrl"):
        plan = mp.check_memory_at_startup(big, on_gpu=True)
    assert not plan.fits
    if not torch.cuda.is_available():
        assert any(r.levelno == logging.WARNING and "not expected to fit" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtrl"):
        mp.check_memory_at_startup(big, on_gpu=False)
    assert any("CPU run, not checked" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtrl"):
        assert mp.check_memory_at_startup(config("worker.actor.model.model_path=/nonexistent"), on_gpu=True) is None
    assert any("memory plan skipped" in r.getMessage() for r in caplog.records)


def test_validation_only_runs_are_not_planned(caplog):
    with caplog.at_level(logging.INFO, logger="mtrl"):
        assert mp.check_memory_at_startup(config("training.val_only=true", "dataset.val_files=v.jsonl"),
                                          on_gpu=False) is None
    assert not any("memory plan" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_estimate_within_20_percent_of_memory_measured_on_cpu(tmp_path):
    """One real update (FSDP2, AdamW, two micro-batches) of a ~22M-parameter tiny Qwen2.5-VL in a fresh process:
    text rows, and rows with an image each (the vision tower's share). benchmarks/memory_plan_validation.py also
    runs gradient checkpointing and an 85M model."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_plan_validation as validation

    model_dir = validation.build_model("20M", tmp_path)
    for checkpointing, images in ((False, False), (False, True)):
        result = validation.run_case(model_dir, checkpointing, images)
        assert 0.8 <= result["ratio"] <= 1.2, result
        assert result["update_rise_gb"] > 0.1  # activations and gradients were part of what was measured
