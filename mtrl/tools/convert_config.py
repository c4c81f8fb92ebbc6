"""Convert a verl or EasyR1 configuration to an MTRL YAML config.

    python -m mtrl.tools.convert_config run_qwen2-7b_rm.sh -o mtrl.yaml          # a verl launch script
    python -m mtrl.tools.convert_config easyr1_config.yaml                       # a YAML (verl or EasyR1)
    python -m mtrl.tools.convert_config -- algorithm.adv_estimator=grpo data.train_batch_size=1024 ...

Input: a shell script or command line with `key=value` overrides (`python3 -m verl.trainer.main_ppo \\
...`, continuation lines, quotes, list values like "['a.parquet', 'b.parquet']"), a YAML file, or the
overrides themselves after `--`. The dialect is detected: EasyR1 configs have a top-level `worker:`
section, verl ones `actor_rollout_ref:`. The MTRL YAML goes to stdout (or `-o FILE`); every key that
has no MTRL counterpart, or whose value cannot be carried over, is listed on stderr with the reason,
as `# unmapped:` comments at the end of the YAML, and in the exit status (0 = all mapped, 1 = some not).

Only keys that were given are converted: MTRL's defaults fill the rest, and MTRL's defaults are not
always verl's (the table in docs/convert_config.md lists the differences worth knowing). Shell variables
(`$HOME/data/x`) are kept as written: expand them before training.
"""

import argparse
import ast
import os
import re
import shlex
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

Value = Any
Setter = Callable[[Value, "Converter"], None]

# ----------------------------------------------------------------------------- value helpers


def _parse_scalar(text: str) -> Value:
    """A command-line value as Hydra would read it: numbers, booleans, null, lists, else the string."""
    if not isinstance(text, str):
        return text
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    if t.startswith("[") and t.endswith("]"):
        try:
            return ast.literal_eval(t)
        except (ValueError, SyntaxError):
            inner = t[1:-1].strip()
            return [s.strip().strip("'\"") for s in inner.split(",") if s.strip()] if inner else []
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t.strip("'\"")


def _files(value: Value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def flatten(tree: Any, prefix: str = "") -> Dict[str, Value]:
    """Nested mapping -> {dotted key: leaf value} (lists are leaves)."""
    out: Dict[str, Value] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    return out


# ----------------------------------------------------------------------------- command-line parsing


def parse_command_line(text: str) -> Dict[str, Value]:
    """`key=value` arguments of a shell script / command line (the last value of a key wins)."""
    text = re.sub(r"\\\r?\n", " ", text)  # line continuations
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith("#")]
    out: Dict[str, Value] = {}
    for line in lines:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            tokens = line.split()
        for tok in tokens:
            if "=" not in tok or tok.startswith("-"):
                continue
            key, value = tok.split("=", 1)
            key = key.lstrip("+~")
            if not re.fullmatch(r"[A-Za-z_][\w.]*", key) or "." not in key:
                continue  # shell assignments (train_files=...) and the like
            out[key] = _parse_scalar(value)
    return out


def detect_dialect(flat: Dict[str, Value]) -> str:
    if any(k.startswith(("actor_rollout_ref.", "reward_model.", "custom_reward_function.")) for k in flat):
        return "verl"
    if any(k.startswith("worker.") for k in flat):
        return "easyr1"
    return "verl"


# ----------------------------------------------------------------------------- the converter


class Converter:
    def __init__(self) -> None:
        self.out: Dict[str, Value] = {}
        self.unmapped: List[Tuple[str, Value, str]] = []
        self.notes: List[str] = []

    def set(self, key: str, value: Value) -> None:
        self.out[key] = value

    def skip(self, key: str, value: Value, reason: str) -> None:
        self.unmapped.append((key, value, reason))

    def tree(self) -> Dict[str, Any]:
        root: Dict[str, Any] = {}
        for dotted, value in self.out.items():
            node = root
            parts = dotted.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        return root


def to(key: str, transform: Callable[[Value], Value] = lambda v: v) -> Setter:
    return lambda v, c: c.set(key, transform(v))


def _choice(key: str, mapping: Dict[Any, Any]) -> Callable[[str, Value, Converter], None]:
    def setter(source_key: str, value: Value, c: Converter) -> None:
        if value in mapping:
            c.set(key, mapping[value])
        else:
            c.skip(source_key, value, f"no MTRL value for it (MTRL `{key}` takes {sorted(set(map(str, mapping.values())))})")
    return setter


ESTIMATORS = {"gae": "gae", "grpo": "grpo", "rloo": "rloo", "remax": "remax", "reinforce_plus_plus": "reinforce_plus_plus"}
PENALTIES = {"kl": "kl", "k1": "kl", "abs": "abs", "mse": "mse", "k2": "mse", "low_var_kl": "low_var_kl", "k3": "low_var_kl"}
SCHEDULERS = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
LOSS_AGG = {m: m for m in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")}
ROLLOUT_NAMES = {"vllm": "vllm", "hf": "hf"}
# verl's actor.policy_loss.loss_mode -> optimization.policy_loss. verl's "gspo" computes GSPO-token (the
# per-token ratio whose value is the sequence ratio); with one advantage per sequence it equals "gspo".
VERL_POLICY_LOSSES = {"vanilla": "ppo", "gspo": "gspo_token", "cispo": "cispo", "sapo": "sapo", "geo_mean": "gmpo",
                      "clip_cov": "clip_cov", "kl_cov": "kl_cov"}
# EasyR1's worker.actor.loss_type (its "gspo" is the sequence-level form).
EASYR1_POLICY_LOSSES = {"default": "ppo", "gspo": "gspo", "gspo_token": "gspo_token", "cispo": "cispo",
                        "sapo": "sapo"}
# Losses verl aggregates with seq-mean-token-mean whatever its loss_agg_mode says.
VERL_SEQ_MEAN_LOSSES = ("sapo", "geo_mean")
# Where verl versions put the DAPO overlong buffer (enable / len / penalty_factor / log).
VERL_OVERLONG_BUFFERS = ("reward_model.overlong_buffer", "reward_model.reward_kwargs.overlong_buffer_cfg",
                         "reward.reward_kwargs.overlong_buffer_cfg")


def _model_section(prefix: str, target: str) -> Dict[str, Any]:
    """verl model keys under `prefix` (actor_rollout_ref.model / critic.model) -> MTRL `target`.model."""
    return {
        f"{prefix}.path": to(f"{target}.model.model_path"),
        f"{prefix}.tokenizer_path": to(f"{target}.model.tokenizer_path"),
        f"{prefix}.trust_remote_code": to(f"{target}.model.trust_remote_code"),
        f"{prefix}.enable_gradient_checkpointing": to(f"{target}.model.enable_gradient_checkpointing"),
        f"{prefix}.use_remove_padding": to(f"{target}.padding_free"),
        f"{prefix}.lora_alpha": to(f"{target}.model.lora_alpha"),
        f"{prefix}.target_modules": to(f"{target}.model.lora_target_modules",
                                       lambda v: [v] if isinstance(v, str) and v != "all-linear" else v),
        f"{prefix}.fsdp_config.param_offload": to(f"{target}.offload.offload_params"),
        f"{prefix}.fsdp_config.optimizer_offload": to(f"{target}.offload.offload_optimizer"),
    }


def _lora_rank(target: str) -> Setter:
    def setter(value: Value, c: Converter) -> None:
        if value and int(value) > 0:
            c.set(f"{target}.model.peft_type", "lora")
            c.set(f"{target}.model.lora_rank", int(value))
    return setter


def _optim(prefix: str, target: str) -> Dict[str, Any]:
    return {
        f"{prefix}.lr": to(f"{target}.optim.lr"),
        f"{prefix}.weight_decay": to(f"{target}.optim.weight_decay"),
        f"{prefix}.lr_warmup_steps": lambda v, c: c.set(f"{target}.optim.warmup_steps", int(v)) if v is not None and int(v) >= 0
        else None,
        f"{prefix}.betas": to(f"{target}.optim.betas", list),
    }


def verl_table() -> Dict[str, Any]:
    a, r, ref = "actor_rollout_ref.actor", "actor_rollout_ref.rollout", "actor_rollout_ref.ref"
    table: Dict[str, Any] = {
        "algorithm.adv_estimator": ("choice", "optimization.advantage_estimator", ESTIMATORS),
        "algorithm.gamma": to("optimization.gamma"),
        "algorithm.lam": to("optimization.lam"),
        "algorithm.norm_adv_by_std_in_grpo": to("optimization.norm_adv_by_std_in_grpo"),
        "algorithm.kl_penalty": ("choice", "optimization.divergence_penalty", PENALTIES),
        "algorithm.kl_ctrl.type": ("choice", "optimization.divergence_type", {"fixed": "fixed", "adaptive": "adaptive"}),
        "algorithm.kl_ctrl.kl_coef": to("optimization.divergence_coef"),
        "algorithm.kl_ctrl.target_kl": to("optimization.divergence_target"),
        "algorithm.kl_ctrl.horizon": to("optimization.divergence_horizon"),
        "data.train_files": to("dataset.train_files", _files),
        "data.val_files": to("dataset.val_files", _files),
        "data.prompt_key": to("dataset.prompt_key"),
        "data.response_key": to("dataset.response_key"),
        "data.image_key": to("dataset.image_key"),
        "data.video_key": to("dataset.video_key"),
        "data.max_prompt_length": to("dataset.max_prompt_length"),
        "data.max_response_length": to("dataset.max_response_length"),
        "data.train_batch_size": to("dataset.rollout_batch_size"),
        "data.val_batch_size": to("dataset.val_batch_size", lambda v: -1 if v is None else v),
        "data.shuffle": to("dataset.shuffle"),
        "data.seed": to("dataset.seed"),
        "data.filter_overlong_prompts": to("dataset.filter_overlong_prompts"),
        "data.min_pixels": to("dataset.min_pixels"),
        "data.max_pixels": to("dataset.max_pixels"),
        f"{a}.ppo_mini_batch_size": to("worker.actor.global_batch_size"),
        f"{a}.ppo_micro_batch_size_per_gpu": to("worker.actor.micro_batch_size_per_device_for_update"),
        f"{a}.use_dynamic_bsz": to("worker.actor.dynamic_batching"),
        f"{a}.ppo_max_token_len_per_gpu": to("worker.actor.max_token_len_per_device"),
        f"{a}.ulysses_sequence_parallel_size": to("worker.actor.ulysses_size"),
        f"{a}.grad_clip": to("worker.actor.max_grad_norm"),
        f"{a}.clip_ratio": lambda v, c: (c.set("worker.actor.clip_ratio_low", v), c.set("worker.actor.clip_ratio_high", v)),
        f"{a}.clip_ratio_low": to("worker.actor.clip_ratio_low"),
        f"{a}.clip_ratio_high": to("worker.actor.clip_ratio_high"),
        f"{a}.entropy_coeff": to("optimization.entropy_bonus_coef"),
        f"{a}.clip_ratio_c": to("worker.actor.clip_ratio_dual"),
        f"{a}.policy_loss.clip_cov_ratio": to("optimization.clip_cov_ratio"),
        f"{a}.policy_loss.clip_cov_lb": to("optimization.clip_cov_lb"),
        f"{a}.policy_loss.clip_cov_ub": to("optimization.clip_cov_ub"),
        f"{a}.policy_loss.kl_cov_ratio": to("optimization.kl_cov_ratio"),
        f"{a}.policy_loss.ppo_kl_coef": to("optimization.kl_cov_coef"),
        f"{a}.tau_pos": to("optimization.sapo_tau_positive"),
        f"{a}.tau_neg": to("optimization.sapo_tau_negative"),
        f"{a}.ppo_epochs": to("worker.actor.ppo_epochs"),
        f"{a}.loss_agg_mode": ("choice", "worker.actor.loss_agg_mode", LOSS_AGG),
        f"{a}.use_kl_loss": to("optimization.use_divergence_loss"),
        f"{a}.kl_loss_coef": to("optimization.divergence_coef"),
        f"{a}.kl_loss_type": ("choice", "optimization.divergence_penalty", PENALTIES),
        f"{a}.use_torch_compile": to("worker.actor.use_torch_compile"),
        f"{a}.fsdp_config.param_offload": to("worker.actor.offload.offload_params"),
        f"{a}.fsdp_config.optimizer_offload": to("worker.actor.offload.offload_optimizer"),
        f"{a}.optim.warmup_style": ("choice", "worker.actor.optim.lr_scheduler_type", SCHEDULERS),
        f"{a}.optim.lr_scheduler_type": ("choice", "worker.actor.optim.lr_scheduler_type", SCHEDULERS),
        f"{ref}.fsdp_config.param_offload": to("worker.ref.offload_params"),
        f"{ref}.log_prob_micro_batch_size_per_gpu": to("worker.ref.micro_batch_size_per_device_for_experience"),
        f"{r}.log_prob_micro_batch_size_per_gpu": to("worker.actor.micro_batch_size_per_device_for_experience"),
        f"{r}.name": ("choice", "worker.rollout.name", ROLLOUT_NAMES),
        f"{r}.n": to("worker.rollout.n"),
        f"{r}.temperature": to("worker.rollout.temperature"),
        f"{r}.top_p": to("worker.rollout.top_p"),
        f"{r}.top_k": to("worker.rollout.top_k"),
        f"{r}.response_length": to("worker.rollout.max_new_tokens"),
        f"{r}.gpu_memory_utilization": to("worker.rollout.gpu_memory_utilization"),
        f"{r}.tensor_model_parallel_size": to("worker.rollout.tensor_parallel_size"),
        f"{r}.enable_prefix_caching": to("worker.rollout.enable_prefix_caching"),
        f"{r}.val_kwargs.temperature": to("worker.rollout.val_override.temperature"),
        f"{r}.val_kwargs.top_p": to("worker.rollout.val_override.top_p"),
        f"{r}.val_kwargs.top_k": to("worker.rollout.val_override.top_k"),
        f"{r}.val_kwargs.n": to("worker.rollout.val_override.n"),
        "critic.ppo_mini_batch_size": to("worker.critic.global_batch_size"),
        "critic.ppo_micro_batch_size_per_gpu": to("worker.critic.micro_batch_size_per_device_for_update"),
        "critic.forward_micro_batch_size_per_gpu": to("worker.critic.micro_batch_size_per_device_for_experience"),
        "critic.cliprange_value": to("worker.critic.cliprange_value"),
        "critic.grad_clip": to("worker.critic.max_grad_norm"),
        "critic.ppo_epochs": to("worker.critic.ppo_epochs"),
        "critic.use_dynamic_bsz": to("worker.critic.dynamic_batching"),
        "critic.ppo_max_token_len_per_gpu": to("worker.critic.max_token_len_per_device"),
        "critic.loss_agg_mode": ("choice", "worker.critic.loss_agg_mode", LOSS_AGG),
        "reward_model.model.path": to("worker.reward.reward_model_path"),
        "reward_model.micro_batch_size_per_gpu": to("worker.reward.micro_batch_size_per_device"),
        "reward_model.reward_manager": lambda v, c: None,  # naive / prime / dapo: the function does the work
        "trainer.total_epochs": to("training.total_epochs"),
        "trainer.total_training_steps": to("training.max_steps"),
        "trainer.project_name": to("training.project_name"),
        "trainer.experiment_name": to("training.experiment_name"),
        "trainer.nnodes": to("training.nnodes"),
        "trainer.n_gpus_per_node": to("training.n_gpus_per_node"),
        "trainer.save_freq": to("training.save_freq"),
        "trainer.test_freq": to("training.val_freq"),
        "trainer.val_before_train": to("training.val_before_train"),
        "trainer.val_only": to("training.val_only"),
        "trainer.default_local_dir": to("training.save_checkpoint_path"),
        "trainer.max_actor_ckpt_to_keep": to("training.save_limit"),
        "trainer.resume_from_path": to("training.load_checkpoint_path"),
        "trainer.log_val_generations": to("training.val_generations_to_log"),
        "trainer.device": ("choice", "training.device", {"cuda": "cuda", "cpu": "cpu", "auto": "auto"}),
    }
    table.update(_model_section("actor_rollout_ref.model", "worker.actor"))
    table.update(_model_section("critic.model", "worker.critic"))
    table.update(_optim(f"{a}.optim", "worker.actor"))
    table.update(_optim("critic.optim", "worker.critic"))
    table["actor_rollout_ref.model.lora_rank"] = _lora_rank("worker.actor")
    table["critic.model.lora_rank"] = _lora_rank("worker.critic")
    return table


def easyr1_table() -> Dict[str, Any]:
    """EasyR1's schema is MTRL's ancestor: most keys keep their place; KL keys are renamed to divergence."""
    table: Dict[str, Any] = {}
    same = ["data.train_files", "data.val_files", "data.prompt_key", "data.answer_key", "data.image_key",
            "data.video_key", "data.image_dir", "data.video_fps", "data.max_prompt_length",
            "data.max_response_length", "data.rollout_batch_size", "data.val_batch_size", "data.format_prompt",
            "data.shuffle", "data.seed", "data.min_pixels", "data.max_pixels", "data.filter_overlong_prompts",
            "data.system_prompt"]
    for key in same:
        table[key] = to("dataset." + key.split(".", 1)[1], _files if key.endswith("_files") else (lambda v: v))
    for key in ("gamma", "lam", "online_filtering", "filter_key", "filter_low", "filter_high"):
        table[f"algorithm.{key}"] = to(f"optimization.{key}")
    table["algorithm.adv_estimator"] = ("choice", "optimization.advantage_estimator", ESTIMATORS)
    table["algorithm.disable_kl"] = to("optimization.disable_divergence")
    table["algorithm.use_kl_loss"] = to("optimization.use_divergence_loss")
    table["algorithm.kl_penalty"] = ("choice", "optimization.divergence_penalty", PENALTIES)
    table["algorithm.kl_coef"] = to("optimization.divergence_coef")
    table["algorithm.kl_type"] = ("choice", "optimization.divergence_type", {"fixed": "fixed", "adaptive": "adaptive"})
    table["algorithm.kl_target"] = to("optimization.divergence_target")
    table["algorithm.kl_horizon"] = to("optimization.divergence_horizon")
    for role in ("actor", "critic"):
        w = f"worker.{role}"
        for key in ("global_batch_size", "micro_batch_size_per_device_for_update",
                    "micro_batch_size_per_device_for_experience", "max_grad_norm", "ppo_epochs", "padding_free",
                    "dynamic_batching", "ulysses_size", "use_torch_compile", "clip_ratio_low", "clip_ratio_high",
                    "clip_ratio_dual", "cliprange_value", "max_token_len_per_device"):
            table[f"{w}.{key}"] = to(f"{w}.{key}")
        table[f"{w}.loss_avg_mode"] = ("choice", f"{w}.loss_agg_mode", {"token": "token-mean", "seq": "seq-mean-token-mean"})
        for key in ("model_path", "tokenizer_path", "trust_remote_code", "enable_gradient_checkpointing",
                    "freeze_vision_tower", "lora_alpha", "lora_target_modules"):
            table[f"{w}.model.{key}"] = to(f"{w}.model.{key}")
        table[f"{w}.model.lora.rank"] = _lora_rank(w)
        table[f"{w}.model.lora.alpha"] = to(f"{w}.model.lora_alpha")
        for key in ("lr", "weight_decay", "betas"):
            table[f"{w}.optim.{key}"] = to(f"{w}.optim.{key}")
        table[f"{w}.optim.lr_warmup_steps"] = lambda v, c, w=w: c.set(f"{w}.optim.warmup_steps", int(v)) \
            if v is not None else None
        table[f"{w}.optim.lr_scheduler_type"] = ("choice", f"{w}.optim.lr_scheduler_type", SCHEDULERS)
        for key in ("enable_full_shard",):
            table[f"{w}.fsdp.{key}"] = lambda v, c, w=w: c.set(f"{w}.fsdp.sharding_strategy",
                                                              "FULL_SHARD" if v else "SHARD_GRAD_OP")
        table[f"{w}.fsdp.enable_cpu_offload"] = to(f"{w}.fsdp.cpu_offload")
        table[f"{w}.fsdp.mp_param_dtype"] = ("choice", f"{w}.fsdp.mixed_precision_dtype",
                                             {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"})
        for key in ("offload_params", "offload_optimizer"):
            table[f"{w}.offload.{key}"] = to(f"{w}.offload.{key}")
    table["worker.actor.loss_type"] = ("choice", "optimization.policy_loss", EASYR1_POLICY_LOSSES)
    table["worker.actor.tau_positive"] = to("optimization.sapo_tau_positive")
    table["worker.actor.tau_negative"] = to("optimization.sapo_tau_negative")
    table["worker.ref.offload.offload_params"] = to("worker.ref.offload_params")
    for key in ("name", "n", "temperature", "top_p", "top_k", "gpu_memory_utilization", "tensor_parallel_size",
                "enable_prefix_caching"):
        table[f"worker.rollout.{key}"] = to(f"worker.rollout.{key}")
    for key in ("temperature", "n", "top_p", "top_k"):
        table[f"worker.rollout.val_override_config.{key}"] = to(f"worker.rollout.val_override.{key}")
    table["worker.rollout.name"] = ("choice", "worker.rollout.name", ROLLOUT_NAMES)
    table["worker.hybrid_engine"] = to("worker.hybrid_engine")
    table["worker.reward.reward_function"] = to("worker.reward.reward_fn_path")
    table["worker.reward.reward_function_kwargs"] = to("worker.reward.reward_fn_kwargs")
    table["worker.reward.num_cpus"] = to("worker.reward.num_cpus")
    for key in ("total_epochs", "max_steps", "project_name", "experiment_name", "logger", "nnodes",
                "n_gpus_per_node", "save_freq", "save_limit", "save_checkpoint_path", "val_freq", "val_before_train",
                "val_only", "val_generations_to_log", "load_checkpoint_path", "find_last_checkpoint"):
        table[f"trainer.{key}"] = to(f"training.{key}")
    return table


LOGGERS = {"console", "wandb", "mlflow", "tensorboard", "file"}


def _special_verl(flat: Dict[str, Value], c: Converter) -> set:
    """verl keys that combine or need a judgement; returns the keys handled."""
    done = set()
    a = "actor_rollout_ref.actor"
    use_kl_loss = flat.get(f"{a}.use_kl_loss")
    use_kl_in_reward = flat.get("algorithm.use_kl_in_reward")
    if use_kl_in_reward is not None or use_kl_loss is not None:
        done |= {"algorithm.use_kl_in_reward"}
        if use_kl_loss:
            c.set("optimization.disable_divergence", False)
            if use_kl_in_reward:
                c.skip("algorithm.use_kl_in_reward", True, "MTRL applies the divergence either in the reward or as a "
                       "loss, not both; converted as a loss (use_kl_loss)")
        elif use_kl_in_reward:
            c.set("optimization.disable_divergence", False)
            c.set("optimization.use_divergence_loss", False)
        else:
            c.set("optimization.disable_divergence", True)
    if "trainer.logger" in flat:
        done.add("trainer.logger")
        names = flat["trainer.logger"]
        names = [names] if isinstance(names, str) else list(names or [])
        kept = [n for n in names if n in LOGGERS]
        c.set("training.logger", kept or ["console"])
        for n in names:
            if n not in LOGGERS:
                c.skip("trainer.logger", n, f"MTRL loggers are {sorted(LOGGERS)}")
    if "trainer.resume_mode" in flat:
        done.add("trainer.resume_mode")
        mode = flat["trainer.resume_mode"]
        if mode in ("auto", "resume_path"):
            c.set("training.find_last_checkpoint", mode == "auto")
        elif mode == "disable":
            c.set("training.find_last_checkpoint", False)
        else:
            c.skip("trainer.resume_mode", mode, "expected auto / disable / resume_path")
    if flat.get("reward_model.enable") is not None:
        done.add("reward_model.enable")
        if flat["reward_model.enable"]:
            c.set("worker.reward.reward_type", "model")
    if "custom_reward_function.path" in flat:
        done |= {"custom_reward_function.path", "custom_reward_function.name"}
        name = flat.get("custom_reward_function.name")
        path = str(flat["custom_reward_function.path"])
        c.set("worker.reward.reward_fn_path", f"{path}:{name}" if name else path)
    elif not flat.get("reward_model.enable"):
        c.notes.append("verl picks a built-in reward function by data_source; set worker.reward.reward_fn_path "
                       "(e.g. reward_fns/math_answer.py)")
    ratio_key = f"{a}.optim.lr_warmup_steps_ratio"
    if ratio_key in flat:
        done.add(ratio_key)
        steps = flat.get("trainer.total_training_steps")
        if steps and flat[ratio_key]:
            c.set("worker.actor.optim.warmup_steps", int(float(flat[ratio_key]) * int(steps)))
        elif flat[ratio_key]:
            c.skip(ratio_key, flat[ratio_key], "MTRL takes warmup_steps; set worker.actor.optim.warmup_steps = "
                   "ratio x total steps")
    done |= _verl_policy_loss(flat, c)
    if "data.truncation" in flat:
        done.add("data.truncation")
        if flat["data.truncation"] != "error":
            c.skip("data.truncation", flat["data.truncation"], "MTRL never truncates prompts: over-long prompts are "
                   "dropped (filter_overlong_prompts=true) or an error")
    return done


def _verl_policy_loss(flat: Dict[str, Value], c: Converter) -> set:
    """verl's policy_loss.loss_mode (with the aggregation it implies) and DAPO's overlong buffer."""
    a = "actor_rollout_ref.actor"
    done = set()
    mode_key = f"{a}.policy_loss.loss_mode"
    if mode_key in flat:
        done.add(mode_key)
        mode = flat[mode_key]
        _choice("optimization.policy_loss", VERL_POLICY_LOSSES)(mode_key, mode, c)
        if mode in VERL_SEQ_MEAN_LOSSES:
            done.add(f"{a}.loss_agg_mode")
            c.set("worker.actor.loss_agg_mode", "seq-mean-token-mean")
            given = flat.get(f"{a}.loss_agg_mode", "token-mean")
            if given != "seq-mean-token-mean":
                c.notes.append(f"verl's {mode} loss ignores loss_agg_mode = {given} and takes seq-mean-token-mean; "
                               f"so does the converted config (MTRL's {VERL_POLICY_LOSSES[mode]} follows "
                               f"worker.actor.loss_agg_mode)")
    for prefix in VERL_OVERLONG_BUFFERS:
        keys = {k for k in flat if k.startswith(prefix + ".")}
        if not keys:
            continue
        done |= keys
        if flat.get(f"{prefix}.enable"):
            c.set("optimization.overlong_buffer_length", int(flat.get(f"{prefix}.len", 0)))
            c.set("optimization.overlong_penalty_factor", float(flat.get(f"{prefix}.penalty_factor", 1.0)))
        for key in sorted(keys - {f"{prefix}.{k}" for k in ("enable", "len", "penalty_factor", "log")}):
            c.skip(key, flat[key], "no MTRL counterpart")
    return done


def _special_easyr1(flat: Dict[str, Value], c: Converter) -> set:
    done = set()
    if any("overlong_buffer_length" in f"{k}={v}" for k, v in flat.items()
           if k.startswith("worker.reward.reward_function_kwargs")):
        c.notes.append("EasyR1's reward function applies the overlong penalty itself (reward_function_kwargs "
                       "overlong_buffer_length / overlong_penalty_factor): kept there, so "
                       "optimization.overlong_buffer_length stays 0 (setting it too would apply it twice)")
    ratio_key = "worker.actor.optim.lr_warmup_ratio"
    if ratio_key in flat:
        done.add(ratio_key)
        steps = flat.get("trainer.max_steps")
        if flat[ratio_key] and steps:
            c.set("worker.actor.optim.warmup_steps", int(float(flat[ratio_key]) * int(steps)))
        elif flat[ratio_key]:
            c.skip(ratio_key, flat[ratio_key], "MTRL takes warmup_steps; set worker.actor.optim.warmup_steps")
    return done | _easyr1_reward(flat, c)


def _easyr1_reward(flat: Dict[str, Value], c: Converter) -> set:
    """EasyR1's `reward_type` names the reward function's form (batch, its default, or sequential), as MTRL's does."""
    key, done = "worker.reward.reward_type", set()
    if key in flat or "worker.reward.reward_function" in flat:
        done.add(key)
        form = flat.get(key, "batch")
        if form in ("batch", "sequential"):
            c.set(key, form)
            if key not in flat:
                c.notes.append("worker.reward.reward_type: batch is EasyR1's default form of the reward function")
        else:
            c.skip(key, form, "MTRL's EasyR1 reward-function forms are `batch` and `sequential`")
    for old in ("worker.reward.score_function", "worker.reward.score_function_kwargs", "worker.reward.compute_score"):
        if old in flat:
            done.add(old)
            c.skip(old, flat[old], "older EasyR1 reward API; give a file with compute_score(reward_inputs) as "
                                   "worker.reward.reward_function (worker.reward.reward_fn_path in MTRL)")
    prefix = "worker.reward.reward_function_kwargs."  # a YAML mapping arrives flattened: nest it again
    kwargs: Dict[str, Any] = {}
    for k in [k for k in flat if k.startswith(prefix)]:
        done.add(k)
        *parents, leaf = k[len(prefix):].split(".")
        node = kwargs
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = flat[k]
    if kwargs:
        c.set("worker.reward.reward_fn_kwargs", kwargs)
    skip = "worker.reward.skip_special_tokens"
    if skip in flat:
        done.add(skip)
        if not flat[skip]:
            c.skip(skip, flat[skip], "MTRL's reward functions always see responses decoded without special tokens")
    return done


# Keys that are fine to drop: they configure things MTRL does by itself or not at all.
IGNORED = {
    "data.return_raw_chat": "MTRL always keeps the raw prompt",
    "actor_rollout_ref.hybrid_engine": "MTRL's actor is always a hybrid engine",
    "actor_rollout_ref.rollout.mode": "MTRL's rollout is synchronous",
    "actor_rollout_ref.rollout.enforce_eager": "vLLM detail",
    "actor_rollout_ref.rollout.free_cache_engine": "vLLM detail",
    "actor_rollout_ref.rollout.load_format": "vLLM detail",
    "critic.model.use_remove_padding": "set worker.critic.padding_free",
}


def convert(flat: Dict[str, Value], dialect: Optional[str] = None) -> Converter:
    """Convert flat `{dotted key: value}` settings; returns the converter (`.tree()`, `.unmapped`, `.notes`)."""
    dialect = dialect or detect_dialect(flat)
    c = Converter()
    done = _special_verl(flat, c) if dialect == "verl" else _special_easyr1(flat, c)
    table = verl_table() if dialect == "verl" else easyr1_table()
    for key, value in flat.items():
        if key in done:
            continue
        rule = table.get(key)
        if rule is None:
            if key == "critic.model.use_remove_padding":
                c.set("worker.critic.padding_free", value)
                continue
            reason = IGNORED.get(key)
            c.skip(key, value, f"ignored: {reason}" if reason else "no MTRL counterpart")
            continue
        if isinstance(rule, tuple):
            _choice(rule[1], rule[2])(key, value, c)
        else:
            try:
                rule(value, c)
            except (TypeError, ValueError) as e:
                c.skip(key, value, f"could not convert the value: {e}")
    if dialect == "verl" and "critic.model.path" not in flat and flat.get("algorithm.adv_estimator") == "gae":
        c.notes.append("the critic starts from the actor's model (worker.critic.model.model_path unset)")
    return c


def load_input(source: str) -> Tuple[Dict[str, Value], str]:
    """Flat settings from a YAML file or a shell script / command line; and what it was."""
    if os.path.isfile(source) and source.endswith((".yaml", ".yml")):
        with open(source, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"{source}: the top level must be a mapping")
        return flatten(data), "yaml"
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            return parse_command_line(f.read()), "command line"
    if "=" not in source:
        raise SystemExit(f"convert_config: {source!r} is neither a file nor key=value settings")
    return parse_command_line(source), "command line"


def render(c: Converter, source: str, dialect: str) -> str:
    text = f"# Converted from {source} ({dialect}) by python -m mtrl.tools.convert_config\n"
    text += yaml.safe_dump(c.tree(), sort_keys=False, default_flow_style=False)
    if c.notes:
        text += "".join(f"# note: {n}\n" for n in c.notes)
    if c.unmapped:
        text += "# unmapped (not converted):\n"
        text += "".join(f"#   {k} = {v!r}: {why}\n" for k, v, why in c.unmapped)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m mtrl.tools.convert_config",
                                     description="Convert a verl / EasyR1 config (script, command line or YAML) "
                                                 "to an MTRL YAML.")
    parser.add_argument("input", nargs="?", help="verl launch script, command-line text or YAML file")
    parser.add_argument("-o", "--output", help="write the YAML here (default: stdout)")
    parser.add_argument("--dialect", choices=("verl", "easyr1"), help="default: detected")
    args = parser.parse_args(argv)
    if not args.input and not overrides:
        parser.error("give a file, or key=value overrides after --")
    flat: Dict[str, Value] = {}
    source = "the command line"
    if args.input:
        flat, _ = load_input(args.input)
        source = args.input
    if overrides:
        flat.update(parse_command_line(" ".join(shlex.quote(o) for o in overrides)))
    dialect = args.dialect or detect_dialect(flat)
    c = convert(flat, dialect)
    text = render(c, source, dialect)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output} ({len(c.out)} keys)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    for note in c.notes:
        print(f"note: {note}", file=sys.stderr)
    for key, value, why in c.unmapped:
        print(f"unmapped: {key} = {value!r}: {why}", file=sys.stderr)
    return 1 if c.unmapped else 0


if __name__ == "__main__":
    sys.exit(main())
