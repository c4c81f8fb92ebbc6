"""The verl / EasyR1 -> MTRL config converter: the seeds' verl examples convert to configs MTRL loads, values
land on the right keys, and what cannot be mapped is reported."""

import re
from pathlib import Path

import pytest
import yaml

from mtrl.tools import convert_config as cc
from mtrl.training.training_config import load_config

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "trinity_verl_alignment.md"

PPO_RM = r"""
python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=gae \
    data.train_files="['/d/gsm8k/train.parquet', '/d/math/train.parquet']" \
    data.val_files=/d/gsm8k/test.parquet \
    data.train_batch_size=1024 \
    data.max_prompt_length=1024 \
    data.filter_overlong_prompts=True \
    data.truncation='error' \
    actor_rollout_ref.model.path=/m/Qwen2-7B-Instruct \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.1 \
    actor_rollout_ref.actor.ppo_mini_batch_size=256 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.entropy_coeff=0.001 \
    actor_rollout_ref.rollout.name=vllm \
    critic.optim.lr=1e-5 \
    critic.model.path=/m/Qwen2-7B-Instruct \
    reward_model.enable=True \
    reward_model.model.path=/m/FsfairX-LLaMA3-RM-v0.1 \
    algorithm.use_kl_in_reward=False \
    trainer.critic_warmup=0 \
    trainer.logger='["console","wandb"]' \
    trainer.n_gpus_per_node=8 \
    trainer.test_freq=5 \
    trainer.total_epochs=15 $@
"""


def test_parse_command_line_handles_continuations_quotes_and_lists():
    flat = cc.parse_command_line(PPO_RM)
    assert flat["data.train_files"] == ["/d/gsm8k/train.parquet", "/d/math/train.parquet"]
    assert flat["trainer.logger"] == ["console", "wandb"]
    assert flat["actor_rollout_ref.actor.optim.lr"] == pytest.approx(1e-6)
    assert flat["data.filter_overlong_prompts"] is True and flat["data.truncation"] == "error"
    assert cc.detect_dialect(flat) == "verl"


def test_verl_ppo_with_reward_model_converts_to_a_loadable_config(tmp_path):
    c = cc.convert(cc.parse_command_line(PPO_RM))
    out = c.tree()
    assert out["optimization"]["advantage_estimator"] == "gae"
    assert out["optimization"]["disable_divergence"] is True  # no KL in the reward, no KL loss
    assert out["optimization"]["entropy_bonus_coef"] == pytest.approx(0.001)
    assert out["dataset"]["train_files"] == "/d/gsm8k/train.parquet,/d/math/train.parquet"
    assert out["dataset"]["rollout_batch_size"] == 1024
    assert out["worker"]["actor"]["global_batch_size"] == 256
    assert out["worker"]["actor"]["micro_batch_size_per_device_for_update"] == 16
    assert out["worker"]["critic"]["optim"]["lr"] == pytest.approx(1e-5)
    assert out["worker"]["reward"] == {"reward_type": "model", "reward_model_path": "/m/FsfairX-LLaMA3-RM-v0.1"}
    assert out["training"]["val_freq"] == 5 and out["training"]["logger"] == ["console", "wandb"]
    unmapped = {k for k, _, _ in c.unmapped}
    assert {"actor_rollout_ref.actor.optim.lr_warmup_steps_ratio", "trainer.critic_warmup"} <= unmapped
    path = tmp_path / "ppo.yaml"
    path.write_text(cc.render(c, "ppo.sh", "verl"))
    config = load_config([f"config={path}"])
    assert config.worker.reward.reward_type == "model" and config.worker.actor.model.model_path == "/m/Qwen2-7B-Instruct"


@pytest.mark.skipif(not SEEDS.is_file(), reason="seed documents not available")
def test_the_seed_verl_examples_convert_and_load(tmp_path):
    scripts = re.findall(r"```bash\n(.*?)```", SEEDS.read_text(), re.S)
    scripts = [s for s in scripts if "verl.trainer.main_ppo" in s]
    assert len(scripts) == 2
    for i, script in enumerate(scripts):
        c = cc.convert(cc.parse_command_line(script))
        path = tmp_path / f"seed_{i}.yaml"
        path.write_text(cc.render(c, "seed", "verl"))
        config = load_config([f"config={path}"])
        assert config.worker.rollout.name == "vllm"
    grpo = load_config([f"config={tmp_path / 'seed_1.yaml'}"])
    assert grpo.optimization.advantage_estimator == "grpo" and grpo.worker.rollout.n == 8
    assert grpo.optimization.use_divergence_loss and grpo.optimization.divergence_penalty == "low_var_kl"
    assert grpo.optimization.divergence_coef == pytest.approx(0.001)
    assert grpo.worker.actor.dynamic_batching and grpo.worker.actor.max_token_len_per_device == 24000
    assert grpo.worker.ref.offload_params


def test_easyr1_yaml_converts(tmp_path):
    easyr1 = {
        "data": {"train_files": "hiyouga/geometry3k@train", "val_files": "hiyouga/geometry3k@test",
                 "prompt_key": "problem", "answer_key": "answer", "image_key": "images", "max_prompt_length": 2048,
                 "rollout_batch_size": 512, "format_prompt": "./r1v.jinja", "min_pixels": 262144},
        "algorithm": {"adv_estimator": "grpo", "disable_kl": False, "use_kl_loss": True, "kl_penalty": "low_var_kl",
                      "kl_coef": 0.01, "online_filtering": False},
        "worker": {"actor": {"global_batch_size": 128, "micro_batch_size_per_device_for_update": 4,
                             "padding_free": True, "clip_ratio_high": 0.3,
                             "model": {"model_path": "Qwen/Qwen2.5-VL-7B-Instruct", "freeze_vision_tower": False},
                             "optim": {"lr": 1.0e-6, "weight_decay": 0.01, "strategy": "adamw"},
                             "fsdp": {"enable_full_shard": True, "enable_cpu_offload": False},
                             "offload": {"offload_params": True}},
                   "rollout": {"n": 5, "temperature": 1.0, "gpu_memory_utilization": 0.6,
                               "val_override_config": {"temperature": 0.5, "n": 1}},
                   "reward": {"reward_type": "batch",
                              "reward_function": "./examples/reward_function/math.py:compute_score",
                              "reward_function_kwargs": {"format_weight": 0.1}, "skip_special_tokens": True}},
        "trainer": {"total_epochs": 15, "max_steps": None, "project_name": "easy_r1", "experiment_name": "qwen2_5_7b",
                    "logger": ["console", "wandb"], "n_gpus_per_node": 8, "val_freq": 5, "save_freq": 5},
    }
    src = tmp_path / "easyr1.yaml"
    src.write_text(yaml.safe_dump(easyr1))
    flat, kind = cc.load_input(str(src))
    assert kind == "yaml" and cc.detect_dialect(flat) == "easyr1"
    c = cc.convert(flat)
    out = c.tree()
    assert out["optimization"]["divergence_coef"] == pytest.approx(0.01)
    assert out["optimization"]["use_divergence_loss"] is True
    assert out["dataset"]["prompt_key"] == "problem"
    assert out["worker"]["actor"]["fsdp"]["sharding_strategy"] == "FULL_SHARD"
    assert out["worker"]["rollout"]["val_override"] == {"temperature": 0.5, "n": 1}
    assert out["worker"]["reward"] == {"reward_type": "batch", "reward_fn_kwargs": {"format_weight": 0.1},
                                       "reward_fn_path": "./examples/reward_function/math.py:compute_score"}
    assert [k for k, _, _ in c.unmapped] == ["worker.actor.optim.strategy"]
    dst = tmp_path / "mtrl.yaml"
    assert cc.main([str(src), "-o", str(dst)]) == 1  # something was unmapped
    config = load_config([f"config={dst}"])
    assert config.worker.rollout.n == 5 and config.worker.actor.offload.offload_params


def test_easyr1_reward_keys():
    """EasyR1's reward_type is the function's form (batch by default); what MTRL cannot take is listed."""
    c = cc.convert({"worker.reward.reward_function": "math.py:compute_score"}, "easyr1")
    assert c.tree()["worker"]["reward"] == {"reward_type": "batch", "reward_fn_path": "math.py:compute_score"}
    assert c.unmapped == [] and any("EasyR1's default" in n for n in c.notes)
    c = cc.convert(cc.flatten({"worker": {"reward": {
        "reward_type": "sequential", "skip_special_tokens": True,
        "reward_function_kwargs": {"format_weight": 0.1, "weights": {"bleu": 0.5}}}}}), "easyr1")
    assert c.tree()["worker"]["reward"] == {"reward_type": "sequential",
                                            "reward_fn_kwargs": {"format_weight": 0.1, "weights": {"bleu": 0.5}}}
    assert c.unmapped == []
    c = cc.convert({"worker.reward.reward_type": "function", "worker.reward.skip_special_tokens": False,
                    "worker.reward.score_function": "math"}, "easyr1")
    assert "reward" not in c.tree().get("worker", {})
    assert sorted(k for k, _, _ in c.unmapped) == ["worker.reward.reward_type", "worker.reward.score_function",
                                                   "worker.reward.skip_special_tokens"]


def test_cli_overrides_after_double_dash(capsys):
    rc = cc.main(["--", "algorithm.adv_estimator=rloo", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.foo=1"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "advantage_estimator: rloo" in captured.out and "unmapped: actor_rollout_ref.foo" in captured.err


DAPO_GSPO = r"""
python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    data.train_files=/d/dapo.parquet \
    data.max_response_length=2048 \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.actor.policy_loss.loss_mode=gspo \
    actor_rollout_ref.actor.clip_ratio_low=0.0003 \
    actor_rollout_ref.actor.clip_ratio_high=0.0004 \
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean \
    reward_model.reward_manager=dapo \
    reward_model.overlong_buffer.enable=True \
    reward_model.overlong_buffer.len=512 \
    reward_model.overlong_buffer.penalty_factor=0.5 \
    reward_model.overlong_buffer.log=False
"""


def test_verl_policy_loss_modes_and_the_overlong_buffer_convert(tmp_path):
    c = cc.convert(cc.parse_command_line(DAPO_GSPO))
    out = c.tree()
    # verl's "gspo" computes the GSPO-token form
    assert out["optimization"]["policy_loss"] == "gspo_token"
    assert out["optimization"]["overlong_buffer_length"] == 512
    assert out["optimization"]["overlong_penalty_factor"] == pytest.approx(0.5)
    assert out["worker"]["actor"]["clip_ratio_low"] == pytest.approx(0.0003)
    assert not c.unmapped
    path = tmp_path / "gspo.yaml"
    path.write_text(cc.render(c, "gspo.sh", "verl"))
    config = load_config([f"config={path}"])
    assert config.optimization.policy_loss == "gspo_token" and config.optimization.overlong_buffer_length == 512


@pytest.mark.parametrize("mode, ours", [("vanilla", "ppo"), ("gspo", "gspo_token"), ("cispo", "cispo"),
                                        ("sapo", "sapo"), ("geo_mean", "gmpo"), ("clip_cov", "clip_cov"),
                                        ("kl_cov", "kl_cov")])
def test_every_verl_loss_mode_with_a_counterpart_maps(mode, ours):
    c = cc.convert({"actor_rollout_ref.actor.policy_loss.loss_mode": mode})
    assert c.tree()["optimization"]["policy_loss"] == ours and not c.unmapped


def test_verl_loss_settings_map_and_modes_without_a_counterpart_are_reported():
    a = "actor_rollout_ref.actor"
    c = cc.convert({f"{a}.policy_loss.loss_mode": "clip_cov", f"{a}.policy_loss.clip_cov_ratio": 0.001,
                    f"{a}.policy_loss.clip_cov_lb": 0.5, f"{a}.policy_loss.clip_cov_ub": 4.0,
                    f"{a}.policy_loss.kl_cov_ratio": 0.002, f"{a}.policy_loss.ppo_kl_coef": 1.0,
                    f"{a}.tau_pos": 1.5, f"{a}.tau_neg": 2.0})
    assert c.tree()["optimization"] == {"policy_loss": "clip_cov", "clip_cov_ratio": 0.001, "clip_cov_lb": 0.5,
                                        "clip_cov_ub": 4.0, "kl_cov_ratio": 0.002, "kl_cov_coef": 1.0,
                                        "sapo_tau_positive": 1.5, "sapo_tau_negative": 2.0}
    c = cc.convert({f"{a}.policy_loss.loss_mode": "dppo_tv", f"{a}.policy_loss.dro_beta": 0.1})
    assert {k for k, _, _ in c.unmapped} == {f"{a}.policy_loss.loss_mode", f"{a}.policy_loss.dro_beta"}
    assert "optimization" not in c.tree()


def test_verl_sapo_and_geo_mean_take_their_forced_aggregation():
    a = "actor_rollout_ref.actor"
    c = cc.convert({f"{a}.policy_loss.loss_mode": "geo_mean", f"{a}.loss_agg_mode": "token-mean"})
    assert c.tree()["worker"]["actor"]["loss_agg_mode"] == "seq-mean-token-mean"
    assert any("ignores loss_agg_mode" in n for n in c.notes)
    c = cc.convert({f"{a}.policy_loss.loss_mode": "sapo"})
    assert c.tree()["worker"]["actor"]["loss_agg_mode"] == "seq-mean-token-mean"


def test_verl_overlong_buffer_in_reward_kwargs_and_disabled_buffers():
    c = cc.convert(cc.parse_command_line("+reward_model.reward_kwargs.overlong_buffer_cfg.enable=True "
                                         "+reward_model.reward_kwargs.overlong_buffer_cfg.len=128 "
                                         "+reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0"))
    assert c.tree()["optimization"] == {"overlong_buffer_length": 128, "overlong_penalty_factor": 1.0}
    c = cc.convert({"reward_model.overlong_buffer.enable": False, "reward_model.overlong_buffer.len": 128})
    assert "optimization" not in c.tree() and not c.unmapped  # off in verl, off (the default) here


def test_easyr1_loss_type_and_sapo_temperatures():
    c = cc.convert({"worker.actor.loss_type": "gspo", "worker.actor.tau_positive": 1.2,
                    "worker.actor.tau_negative": 1.4})
    assert c.tree()["optimization"] == {"policy_loss": "gspo", "sapo_tau_positive": 1.2, "sapo_tau_negative": 1.4}
    c = cc.convert({"worker.actor.loss_type": "default",
                    "worker.reward.reward_function_kwargs": {"max_response_length": 20480,
                                                             "overlong_buffer_length": 4096,
                                                             "overlong_penalty_factor": 1.0}})
    assert c.tree()["optimization"] == {"policy_loss": "ppo"}
    assert any("applies the overlong penalty itself" in n for n in c.notes)
