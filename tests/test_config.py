"""Config: defaults match the SPEC, precedence defaults < YAML < CLI, and every validation rule."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from mtrl.training.training_config import (
    ConfigError,
    MTRLConfig,
    config_reference_markdown,
    load_config,
)
from mtrl.training.training_main import main

REPO = Path(__file__).resolve().parents[1]
BASE = ["dataset.train_files=train.jsonl", "optimization.advantage_estimator=grpo", "worker.rollout.n=2",
        "dataset.rollout_batch_size=8", "worker.actor.global_batch_size=4", "training.n_gpus_per_node=2"]

# SPEC section 3, key by key.
SPEC_DEFAULTS = {
    "dataset.prompt_key": "prompt", "dataset.answer_key": "answer", "dataset.image_key": "images",
    "dataset.video_key": "videos", "dataset.video_fps": 2.0, "dataset.min_pixels": 262144,
    "dataset.max_pixels": 4194304, "dataset.max_prompt_length": 512, "dataset.max_response_length": 512,
    "dataset.rollout_batch_size": 256, "dataset.val_batch_size": 64, "dataset.shuffle": True,
    "dataset.seed": 42, "dataset.filter_overlong_prompts": True,
    "training.total_epochs": 10, "training.nnodes": 1, "training.n_gpus_per_node": 8, "training.save_freq": 500,
    "training.val_freq": 100, "training.val_only": False, "training.find_last_checkpoint": True,
    "training.device": "auto",
    "optimization.gamma": 1.0, "optimization.lam": 0.95, "optimization.advantage_estimator": "gae",
    "optimization.disable_divergence": False, "optimization.use_divergence_loss": False,
    "optimization.divergence_penalty": "kl", "optimization.divergence_coef": 0.01,
    "optimization.divergence_type": "fixed", "optimization.divergence_target": 6.0,
    "optimization.divergence_horizon": 10000.0, "optimization.online_filtering": False,
    "optimization.filter_key": "overall", "optimization.filter_low": 0.01, "optimization.filter_high": 0.99,
    "optimization.top_p_entropy_tokens": 0.2, "optimization.top_p_perception_tokens": 0.2,
    "optimization.trajectory_scaling_min": 0.8, "optimization.trajectory_scaling_max": None,
    "optimization.use_entropy_penalty": False, "optimization.entropy_penalty_coef": 0.06,
    "optimization.entropy_bonus_coef": 0.0,
    "optimization.dependency_estimator": "sampled_k3", "optimization.perception_patch_size": None,
    "optimization.perception_mask_prob": 0.5, "optimization.filter_scope": "sequence",
    "worker.hybrid_engine": True, "worker.actor.model.trust_remote_code": False,
    "worker.actor.model.peft_type": None, "worker.actor.fsdp.sharding_strategy": "FULL_SHARD",
    "worker.actor.fsdp.mixed_precision_dtype": "bf16", "worker.actor.fsdp.cpu_offload": False,
    "worker.actor.offload.offload_params": False, "worker.actor.offload.offload_optimizer": False,
    "worker.actor.clip_ratio_low": 0.2, "worker.actor.clip_ratio_high": 0.3, "worker.actor.clip_ratio_dual": 3.0,
    "worker.actor.max_grad_norm": 1.0, "worker.actor.padding_free": True, "worker.actor.dynamic_batching": True,
    "worker.actor.ulysses_size": 1, "worker.actor.loss_agg_mode": "token-mean",
    "worker.rollout.name": "hf", "worker.reward.reward_type": "function",
}


def _get(config, dotted):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("key,expected", sorted(SPEC_DEFAULTS.items()))
def test_defaults_match_spec(key, expected):
    assert _get(MTRLConfig(), key) == expected


def test_yaml_then_cli_overrides(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("optimization:\n  top_p_perception_tokens: 0.5\n  enable_perception_filtering: true\n"
                   "worker:\n  rollout:\n    n: 2\n    temperature: 0.7\n")
    config = load_config([f"config={cfg}", *BASE, "optimization.top_p_perception_tokens=0.3", "worker.rollout.n=4"])
    assert config.optimization.top_p_perception_tokens == 0.3  # CLI beats YAML
    assert config.optimization.enable_perception_filtering is True  # YAML beats default
    assert config.worker.rollout.n == 4
    assert config.worker.rollout.temperature == 0.7
    assert config.worker.actor.clip_ratio_low == 0.2  # default kept
    assert config.config_dir == str(tmp_path)


def test_unknown_key_exits_2_with_suggestion(capsys):
    assert main(["optimizaton.x=1"]) == 2
    err = capsys.readouterr().err
    assert "optimizaton" in err and "Did you mean `optimization`?" in err
    assert "Traceback" not in err


def test_unknown_nested_key_suggests_sibling():
    with pytest.raises(ConfigError, match=r"Did you mean `worker.actor.clip_ratio_low`"):
        load_config([*BASE, "worker.actor.clip_ratio_lo=0.1"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("training:\n  totl_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*training.totl_epochs.*Did you mean `training.total_epochs`"):
        load_config([f"config={cfg}"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"`worker.rollout.n` has the wrong type"):
        load_config([*BASE, "worker.rollout.n=many"])


@pytest.mark.parametrize("override,pattern", [
    ("optimization.top_p_perception_tokens=0", r"optimization.top_p_perception_tokens.*\(0, 1\]"),
    ("optimization.top_p_entropy_tokens=1.5", r"optimization.top_p_entropy_tokens.*\(0, 1\]"),
    ("optimization.trajectory_scaling_min=0", r"optimization.trajectory_scaling_min"),
    ("worker.actor.clip_ratio_low=0", r"worker.actor.clip_ratio_low.*> 0"),
    ("worker.actor.clip_ratio_high=-0.1", r"worker.actor.clip_ratio_high.*> 0"),
    ("worker.actor.clip_ratio_dual=1.0", r"worker.actor.clip_ratio_dual.*> 1"),
    ("optimization.advantage_estimator=grp", r"Allowed values: gae, grpo.*Did you mean `grpo`"),
    ("optimization.divergence_penalty=kl2", r"optimization.divergence_penalty"),
    ("worker.rollout.name=sglang", r"worker.rollout.name.*hf, vllm"),
    ("worker.rollout.top_p=0", r"worker.rollout.top_p"),
    ("dataset.rollout_batch_size=6", r"dataset.rollout_batch_size.*multiple of `worker.actor.global_batch_size`"),
    ("worker.actor.global_batch_size=1 worker.rollout.n=3", r"must divide evenly over 2 workers"),
    ("training.logger=[console,slack]", r"training.logger.*console, file, wandb"),
    ("optimization.filter_low=0.9", r"filter_low"),
    ("optimization.entropy_bonus_coef=-0.1", r"optimization.entropy_bonus_coef.*>= 0"),
])
def test_out_of_range_values_rejected(override, pattern):
    args = [*BASE, *override.split()]
    if override.startswith("optimization.filter_low"):
        args.append("optimization.filter_high=0.5")
    with pytest.raises(ConfigError, match=pattern):
        load_config(args)


def test_micro_batch_must_divide_without_dynamic_batching():
    with pytest.raises(ConfigError, match="micro_batch_size_per_device_for_update"):
        load_config([*BASE, "worker.actor.dynamic_batching=false",
                     "worker.actor.micro_batch_size_per_device_for_update=3"])


def test_grpo_needs_several_samples():
    with pytest.raises(ConfigError, match=r"worker.rollout.n` >= 2"):
        load_config([*BASE, "worker.rollout.n=1"])


def test_val_only_needs_no_train_files():
    config = load_config(["training.val_only=true", "dataset.val_files=val.jsonl"])
    assert config.training.val_only


def test_config_reference_doc_is_current():
    assert (REPO / "docs" / "CONFIG.md").read_text() == config_reference_markdown(), \
        "regenerate with: python -m mtrl.training.training_config > docs/CONFIG.md"


def test_cli_help_and_print_config():
    out = subprocess.run([sys.executable, "-m", "mtrl.training.training_main", "--help"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "config=FILE" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mtrl.training.training_main", *BASE, "worker.rollout.n=4",
                          "print_config=true"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "'n': 4" in out.stdout and "advantage_estimator: grpo" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mtrl.training.training_main", "optimizaton.x=1"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr


@pytest.mark.parametrize("overrides,pattern", [
    (["worker.hybrid_engine=false"], r"hybrid_engine` = false .* not implemented"),
    (["worker.rollout.name=vllm", "training.n_gpus_per_node=4", "worker.rollout.tensor_parallel_size=3"],
     r"tensor_parallel_size` = 3 must divide the workers per node"),
    (["worker.rollout.limit_mm_per_prompt={audio: 1}"], r"limit_mm_per_prompt key"),
    (["worker.rollout.max_model_len=0"], r"max_model_len"),
])
def test_rollout_engine_settings_checked_at_start(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config([*BASE, *overrides])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_stops_the_run_before_it_starts(capsys):
    # The config itself is valid (it can be printed and planned); running it is not.
    assert main([*BASE, "worker.rollout.name=vllm", "print_config=true"]) == 0
    assert main([*BASE, "worker.rollout.name=vllm"]) == 2
    assert "rollout.name=vllm but vLLM is not installed" in capsys.readouterr().err


LORA_ACTOR = ["worker.actor.model.peft_type=lora", "worker.rollout.lora_sync=adapter"]


@pytest.mark.parametrize("overrides,pattern", [
    (["worker.rollout.lora_sync=adaptor"], r"worker.rollout.lora_sync.*merged, adapter"),
    (LORA_ACTOR, r"lora_sync` = adapter needs `worker.rollout.name` = vllm .* the hf engine takes the merged"),
    (["worker.rollout.name=vllm", *LORA_ACTOR, "worker.actor.model.peft_type=qlora"],
     r"lora_sync` = adapter supports `worker.actor.model.peft_type` = lora only \(got qlora\)"),
    (["worker.rollout.name=vllm", *LORA_ACTOR, "worker.actor.model.lora_rank=1024"],
     r"vLLM's LoRA takes ranks up to 512, `worker.actor.model.lora_rank` is 1024"),
])
def test_lora_adapter_sync_only_where_vllm_serves_the_adapter(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config([*BASE, *overrides])


def test_lora_sync_defaults_to_merged_and_adapter_needs_an_adapter(capfd):
    assert load_config(BASE).worker.rollout.lora_sync == "merged"
    config = load_config([*BASE, "worker.rollout.name=vllm", *LORA_ACTOR])
    assert config.worker.rollout.lora_sync == "adapter"
    assert "lora_sync=adapter has no effect" not in capfd.readouterr().err
    load_config([*BASE, "worker.rollout.lora_sync=adapter"])
    assert ("worker.rollout.lora_sync=adapter has no effect: the actor has no adapter "
            "(worker.actor.model.peft_type is not set)") in capfd.readouterr().err


def test_vllm_only_settings_with_the_hf_engine_warn(capfd):
    load_config([*BASE, "worker.rollout.enable_prefix_caching=true", "worker.rollout.tensor_parallel_size=2"])
    assert ("worker.rollout.name=hf ignores the vLLM-only settings worker.rollout.tensor_parallel_size, "
            "worker.rollout.enable_prefix_caching") in capfd.readouterr().err
