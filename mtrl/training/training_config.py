"""The root config: one dataclass per section, merged as defaults < `config=` YAML < dotted overrides.

`load_config(argv)` is the only way the entry point builds a config. Every user mistake it can
detect (unknown key, wrong type, out-of-range value, batch sizes that do not divide) raises
`ConfigError`, whose message names the full dotted key and what is allowed.
"""

import difflib
import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mtrl.utils.errors import UserError
from mtrl.utils.tracking import LOGGER_NAMES
from mtrl.optimization.config import (
    ADVANTAGE_ESTIMATOR_NAMES,
    DEPENDENCY_ESTIMATOR_NAMES,
    DPO_LOSS_TYPE_NAMES,
    CONTROLLER_TYPE_NAMES,
    DIVERGENCE_PENALTY_NAMES,
    FILTER_SCOPE_NAMES,
    POLICY_LOSS_NAMES,
    ROLLOUT_CORRECTION_LEVEL_NAMES,
    ROLLOUT_CORRECTION_NAMES,
    OptimizationConfig,
)
from mtrl.config.worker import (
    LORA_SYNC_MODES,
    LOSS_AGG_MODES,
    LR_SCHEDULER_TYPES,
    MIXED_PRECISION_DTYPES,
    OLD_LOG_PROB_SOURCES,
    PEFT_TYPES,
    REWARD_TYPES,
    ROLLOUT_ENGINE_NAMES,
    SHARDING_STRATEGIES,
    VLLM_ONLY_ROLLOUT_KEYS,
    RolloutConfig,
    WorkerConfig,
)
from mtrl.utils.logger import get_logger

_log = get_logger(__name__)

DEVICE_NAMES = ("auto", "cuda", "cpu")
# What a run (or a stage) trains: RL (PPO family, optionally with CHORD), SFT, DPO, a Bradley-Terry reward model.
TRAINING_MODES = ("rl", "sft", "dpo", "reward_model")
MIX_STRATEGIES = ("concat", "weighted_sampling", "balanced")


class ConfigError(UserError, ValueError):
    """A user error in the configuration; the message is meant to be printed as is."""


@dataclass
class DatasetConfig:
    train_files: Optional[str] = ""
    val_files: Optional[str] = ""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    image_key: str = "images"
    video_key: str = "videos"
    image_dir: Optional[str] = None
    video_fps: float = 2.0
    min_pixels: int = 262144
    max_pixels: int = 4194304
    max_prompt_length: int = 512
    max_response_length: int = 512
    # Prompts (rows) per training step; an epoch's last partial batch is dropped, shuffled or not (every rank
    # must run the same number of optimizer steps).
    rollout_batch_size: int = 256
    val_batch_size: int = 64
    shuffle: bool = True
    seed: int = 42
    filter_overlong_prompts: bool = True
    format_prompt: Optional[str] = None
    system_prompt: Optional[str] = None
    # "shapes" (or "shapes:easy|medium|hard"): generate the built-in perception task into the folder of
    # train_files / val_files when they are missing.
    generate_if_missing: Optional[str] = None
    # Expert / SFT rows (SFT stages and CHORD): prompt/response, messages, question/answer, input/output
    # or prompt/answer rows, recognised automatically (response_key names the response of prompt rows).
    sft_files: Optional[str] = ""
    response_key: str = "response"
    # Preference rows {prompt, chosen, rejected[, images, margin]} for DPO and reward-model training.
    preference_files: Optional[str] = ""
    preference_val_files: Optional[str] = ""
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    # Several training files (the comma-separated entries of the mode's training files: train_files for
    # rl, sft_files for sft, preference_files for dpo / reward_model): concat | weighted_sampling | balanced,
    # with one weight per entry (mtrl/utils/data_mixing.py).
    mix_strategy: str = "concat"
    file_weights: Optional[List[float]] = None


@dataclass
class TrainingConfig:
    # rl | sft | dpo | reward_model (a stage's `mode` sets it).
    mode: str = "rl"
    total_epochs: int = 10
    max_steps: Optional[int] = None
    project_name: str = "mtrl_training"
    experiment_name: str = "default"
    logger: List[str] = field(default_factory=lambda: ["console", "file"])
    nnodes: int = 1
    n_gpus_per_node: int = 8
    device: str = "auto"
    seed: int = 1
    save_freq: int = 500
    save_limit: Optional[int] = None
    # None: checkpoints/{project_name}/{experiment_name}. This folder is also the run directory
    # (resolved config, metrics.jsonl, plots).
    save_checkpoint_path: Optional[str] = None
    val_freq: int = 100
    val_before_train: bool = True
    val_only: bool = False
    load_checkpoint_path: Optional[str] = None
    find_last_checkpoint: bool = True
    # On SIGTERM / SIGINT: finish the current step, write a checkpoint, exit 128 + signal (training/signals.py).
    save_on_signal: bool = True
    # Stop the run when this many optimizer steps in a row (of one model) were skipped for a non-finite
    # loss or gradient (mtrl/agents/optimizer_step.py); 0 or null: never stop for that.
    max_skipped_updates: Optional[int] = 5
    val_generations_to_log: int = 0

    @property
    def world_size(self) -> int:
        return self.nnodes * self.n_gpus_per_node

    @property
    def run_dir(self) -> str:
        return self.save_checkpoint_path or os.path.join("checkpoints", self.project_name, self.experiment_name)


@dataclass
class StageConfig:
    """One entry of `stages:` (mtrl/training/stages.py): a name, a mode and overrides of any config section.

    Every stage is the top-level config with its overrides merged on; it runs in `{run_dir}/{name}` and
    starts from the model the previous policy stage exported.
    """

    name: str = ""
    mode: str = "rl"
    dataset: Dict[str, Any] = field(default_factory=dict)
    training: Dict[str, Any] = field(default_factory=dict)
    optimization: Dict[str, Any] = field(default_factory=dict)
    worker: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MTRLConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    # Ordered training stages (e.g. SFT warmup, then RL); empty = one run of `training.mode`.
    stages: List[StageConfig] = field(default_factory=list)
    # Directory of the `config=` YAML; relative paths in the config (reward_fn_path) resolve here first.
    config_dir: Optional[str] = None


# ----------------------------------------------------------------------------- loading


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    for f in fields(node):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        value = getattr(node, f.name)
        if is_dataclass(value):
            keys.extend(_all_keys(value, dotted + "."))
    return keys


def _unknown_key_message(full_key: str) -> str:
    known = [k for k in _all_keys(MTRLConfig()) if k != "config_dir"]
    parts = full_key.split(".")
    # Suggest per path component, so `optimizaton.x` points at `optimization`.
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if not any(k == prefix or k.startswith(prefix + ".") for k in known):
            parent = ".".join(parts[: depth - 1])
            siblings = sorted({k[len(parent) + 1 if parent else 0:].split(".")[0]
                               for k in known if not parent or k.startswith(parent + ".")})
            close = difflib.get_close_matches(parts[depth - 1], siblings, n=3, cutoff=0.6)
            where = f"under `{parent}`" if parent else "at the top level"
            hint = f" Did you mean `{'.'.join(parts[:depth - 1] + [close[0]])}`?" if close else ""
            return (f"Unknown config key `{full_key}`: `{prefix}` does not exist.{hint} "
                    f"Keys {where}: {', '.join(siblings)}.")
    return f"Unknown config key `{full_key}`."


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: {_unknown_key_message(e.full_key)}") from None
    except ValidationError as e:
        reason = (e.msg or str(e)).splitlines()[0]
        if not e.full_key:  # a whole section given a value (`dataset=true`)
            raise ConfigError(f"{source}: {reason} (a section takes keys: section.key=value).") from None
        raise ConfigError(f"{source}: `{e.full_key}` has the wrong type: {reason}.") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_args(argv: Sequence[str]) -> tuple:
    """Split `config=FILE` from dotted `key=value` overrides."""
    config_file, overrides = None, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"Argument `{arg}` is not of the form key=value (for example "
                              f"`config=configs/quickstart.yaml` or `worker.rollout.n=4`).")
        key, value = arg.split("=", 1)
        if key == "config":
            config_file = value
        else:
            overrides.append(arg)
    return config_file, overrides


def load_config(argv: Sequence[str] = ()) -> MTRLConfig:
    """Build and validate the config from command-line style arguments."""
    config_file, overrides = parse_args(argv)
    merged = OmegaConf.structured(MTRLConfig)
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config={config_file}: no such file.")
        try:
            yaml_cfg = OmegaConf.load(config_file)
        except Exception as e:  # the YAML parser's own message says where
            raise ConfigError(f"config={config_file}: not valid YAML: {e}") from None
        if not isinstance(yaml_cfg, DictConfig):
            raise ConfigError(f"config={config_file}: the top level must be a mapping of sections.")
        merged = _merge(merged, yaml_cfg, config_file)
        merged.config_dir = os.path.dirname(os.path.abspath(config_file))
    # `stages[i].section.key=value` edits one stage; a dotlist cannot address list items, so apply these last.
    stage_overrides = [o for o in overrides if o.startswith("stages[")]
    overrides = [o for o in overrides if not o.startswith("stages[")]
    if overrides:
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except Exception as e:
            raise ConfigError(f"command line: could not parse overrides {list(overrides)}: {e}") from None
        merged = _merge(merged, dotlist, "command line")
    for override in stage_overrides:
        key, value = override.split("=", 1)
        index = key[len("stages["):].split("]", 1)[0]
        if not index.isdigit() or int(index) >= len(merged.stages):
            raise ConfigError(f"command line: `{override}`: there is no stage {index} (the config has "
                              f"{len(merged.stages)} stages, numbered from 0).")
        try:
            OmegaConf.update(merged, key, yaml.safe_load(value) if value else None, merge=True)
        except Exception as e:  # a missing stage index, an unknown stage field, a bad value
            raise ConfigError(f"command line: cannot apply `{override}` (stages: {len(merged.stages)}): "
                              f"{str(e).splitlines()[0]}") from None
    try:
        config: MTRLConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e)) from None
    if config.worker.critic.global_batch_size is None:
        config.worker.critic.global_batch_size = config.worker.actor.global_batch_size
    validate_config(config)
    return config


def config_to_yaml(config: MTRLConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


# ----------------------------------------------------------------------------- validation


def _choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed if a is not None], n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise ConfigError(f"`{key}` = {value!r} is not allowed. Allowed values: {shown}.{hint}")


def _range(key: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"`{key}` = {value} is out of range; allowed: {lo}{low}, {high}{hi}.")


def _positive(key: str, value: Any) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"`{key}` = {value} must be > 0.")


def validate_config(config: MTRLConfig) -> None:
    if config.stages:
        # Each stage is validated as the config it runs with (base + its overrides).
        from mtrl.training.stages import resolve_stages

        resolve_stages(config)
        return
    d, t, o, w = config.dataset, config.training, config.optimization, config.worker
    a, c, r = w.actor, w.critic, w.rollout
    _choice("training.mode", t.mode, TRAINING_MODES)
    _validate_training_modes(config)

    _choice("optimization.advantage_estimator", o.advantage_estimator, ADVANTAGE_ESTIMATOR_NAMES)
    _choice("optimization.policy_loss", o.policy_loss, POLICY_LOSS_NAMES)
    _choice("optimization.divergence_penalty", o.divergence_penalty, DIVERGENCE_PENALTY_NAMES)
    _choice("optimization.divergence_type", o.divergence_type, CONTROLLER_TYPE_NAMES)
    _choice("optimization.entropy_bonus_type", o.entropy_bonus_type, CONTROLLER_TYPE_NAMES)
    _choice("optimization.dependency_estimator", o.dependency_estimator, DEPENDENCY_ESTIMATOR_NAMES)
    _choice("optimization.filter_scope", o.filter_scope, FILTER_SCOPE_NAMES)
    _choice("worker.rollout.name", r.name, ROLLOUT_ENGINE_NAMES)
    _choice("worker.reward.reward_type", w.reward.reward_type, REWARD_TYPES)
    _choice("training.device", t.device, DEVICE_NAMES)
    for name in t.logger:
        _choice("training.logger", name, LOGGER_NAMES)
    for section, cfg in (("worker.actor", a), ("worker.critic", c)):
        _choice(f"{section}.loss_agg_mode", cfg.loss_agg_mode, LOSS_AGG_MODES)
        _choice(f"{section}.fsdp.sharding_strategy", cfg.fsdp.sharding_strategy, SHARDING_STRATEGIES)
        _choice(f"{section}.fsdp.mixed_precision_dtype", cfg.fsdp.mixed_precision_dtype, MIXED_PRECISION_DTYPES)
        _choice(f"{section}.model.peft_type", cfg.model.peft_type, PEFT_TYPES)
        _choice(f"{section}.optim.lr_scheduler_type", cfg.optim.lr_scheduler_type, LR_SCHEDULER_TYPES)
        _positive(f"{section}.optim.lr", cfg.optim.lr)
        _positive(f"{section}.max_grad_norm", cfg.max_grad_norm)
        _positive(f"{section}.ppo_epochs", cfg.ppo_epochs)
        _positive(f"{section}.max_token_len_per_device", cfg.max_token_len_per_device)
        if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
            raise ConfigError(f"`{section}.optim.betas` = {cfg.optim.betas} must be two numbers in [0, 1).")

    for key in ("top_p_entropy_tokens", "top_p_perception_tokens", "trajectory_scaling_min"):
        _range(f"optimization.{key}", getattr(o, key), 0, 1, low_open=True)
    _range("optimization.perception_mask_prob", o.perception_mask_prob, 0, 1, low_open=True, high_open=True)
    if o.perception_patch_size is not None:
        _positive("optimization.perception_patch_size", o.perception_patch_size)
    if o.trajectory_scaling_max is not None and o.trajectory_scaling_max < o.trajectory_scaling_min:
        raise ConfigError(f"`optimization.trajectory_scaling_max` = {o.trajectory_scaling_max} must be >= "
                          f"`optimization.trajectory_scaling_min` = {o.trajectory_scaling_min} (or null).")
    _range("optimization.gamma", o.gamma, 0, 1)
    _range("optimization.lam", o.lam, 0, 1)
    _range("optimization.filter_low", o.filter_low, 0, 1)
    _range("optimization.filter_high", o.filter_high, 0, 1)
    if o.filter_low > o.filter_high:
        raise ConfigError("`optimization.filter_low` must be <= `optimization.filter_high`.")
    _positive("optimization.max_filter_tries", o.max_filter_tries)
    if o.divergence_coef < 0:
        raise ConfigError(f"`optimization.divergence_coef` = {o.divergence_coef} must be >= 0.")
    _positive("optimization.divergence_horizon", o.divergence_horizon)
    if o.entropy_penalty_coef < 0:
        raise ConfigError(f"`optimization.entropy_penalty_coef` = {o.entropy_penalty_coef} must be >= 0.")
    if o.entropy_bonus_coef < 0:
        raise ConfigError(f"`optimization.entropy_bonus_coef` = {o.entropy_bonus_coef} must be >= 0 (0 turns the "
                          f"bonus off; to lower entropy use `use_entropy_penalty`).")
    if o.entropy_bonus_type == "adaptive":
        _positive("optimization.entropy_target", o.entropy_target)
        _positive("optimization.entropy_bonus_step", o.entropy_bonus_step)
    _validate_policy_loss_settings(config)
    _validate_rollout_engine(config)

    _validate_ulysses(config)
    if a.use_torch_compile:
        raise ConfigError("`worker.actor.use_torch_compile` = true is not supported in this version of MTRL "
                          "(FSDP2 + varlen attention are not compiled yet); use false.")
    _positive("worker.actor.clip_ratio_low", a.clip_ratio_low)
    _positive("worker.actor.clip_ratio_high", a.clip_ratio_high)
    if a.clip_ratio_dual <= 1:
        raise ConfigError(f"`worker.actor.clip_ratio_dual` = {a.clip_ratio_dual} must be > 1.")
    _positive("worker.critic.cliprange_value", c.cliprange_value)

    _positive("worker.reward.num_cpus", w.reward.num_cpus)
    _positive("worker.reward.timeout_s", w.reward.timeout_s)
    _positive("worker.rollout.n", r.n)
    _range("worker.rollout.temperature", r.temperature, 0, 100)
    _range("worker.rollout.top_p", r.top_p, 0, 1, low_open=True)
    _range("worker.rollout.gpu_memory_utilization", r.gpu_memory_utilization, 0, 1, low_open=True)
    _positive("worker.rollout.val_override.n", r.val_override.n)
    _range("worker.rollout.val_override.top_p", r.val_override.top_p, 0, 1, low_open=True)
    _range("worker.rollout.val_override.temperature", r.val_override.temperature, 0, 100)
    if r.max_new_tokens is not None:
        _positive("worker.rollout.max_new_tokens", r.max_new_tokens)
    if o.advantage_estimator in ("grpo", "rloo") and r.n < 2 and not t.val_only and t.mode == "rl":
        raise ConfigError(f"`optimization.advantage_estimator` = {o.advantage_estimator} compares responses to "
                          f"the same prompt and needs `worker.rollout.n` >= 2 (got {r.n}).")

    for key in ("max_prompt_length", "max_response_length", "min_pixels", "max_pixels"):
        _positive(f"dataset.{key}", getattr(d, key))
    if d.min_pixels > d.max_pixels:
        raise ConfigError("`dataset.min_pixels` must be <= `dataset.max_pixels`.")
    _positive("dataset.rollout_batch_size", d.rollout_batch_size)
    if d.val_batch_size != -1:
        _positive("dataset.val_batch_size (or -1 for all)", d.val_batch_size)
    _positive("training.nnodes", t.nnodes)
    _positive("training.n_gpus_per_node", t.n_gpus_per_node)
    _positive("training.total_epochs", t.total_epochs)
    if t.max_steps is not None:
        _positive("training.max_steps", t.max_steps)
    _positive("training.save_freq (or -1 to save only at the end)", t.save_freq if t.save_freq != -1 else 1)
    _positive("training.val_freq (or -1 to validate only at the end)", t.val_freq if t.val_freq != -1 else 1)
    if t.save_limit is not None:
        _positive("training.save_limit", t.save_limit)

    if t.val_only:
        if not d.val_files:
            raise ConfigError("`training.val_only` = true needs `dataset.val_files`.")
        return
    if not d.train_files and t.mode == "rl":
        raise ConfigError("`dataset.train_files` is empty: give one or more comma-separated files.")
    _validate_batch_sizes(config)


def _validate_rollout_engine(config: MTRLConfig) -> None:
    """The rollout engine's settings fit together (whether vLLM is installed is checked when a run starts:
    `missing_rollout_engine`, so that configs can be printed and planned where it is not)."""
    w, t = config.worker, config.training
    r = w.rollout
    if not w.hybrid_engine:
        raise ConfigError("`worker.hybrid_engine` = false (a separate rollout server) is not implemented in this "
                          "version of MTRL: the rollout engine runs in the actor's worker processes; use true.")
    _choice("worker.actor.old_log_probs", w.actor.old_log_probs, OLD_LOG_PROB_SOURCES)
    if w.actor.old_log_probs == "rollout" and (r.name != "hf" or w.actor.model.peft_type is not None):
        # The hf engine computes with the actor's weights in its compute dtype; a merged LoRA adapter rounds them.
        raise ConfigError(f"`worker.actor.old_log_probs` = rollout needs `worker.rollout.name` = hf and no LoRA "
                          f"(got {r.name}, peft_type {w.actor.model.peft_type}): only then are the engine's "
                          f"log-probs the actor's; use auto or recompute.")
    _positive("worker.rollout.tensor_parallel_size", r.tensor_parallel_size)
    for key in ("max_num_batched_tokens", "max_model_len"):
        if getattr(r, key) is not None:
            _positive(f"worker.rollout.{key}", getattr(r, key))
    for modality, count in r.limit_mm_per_prompt.items():
        _choice("worker.rollout.limit_mm_per_prompt key", modality, ("image", "video"))
        if not isinstance(count, int) or count < 0:
            raise ConfigError(f"`worker.rollout.limit_mm_per_prompt.{modality}` = {count!r} must be an integer >= 0.")
    _validate_lora_sync(config)
    if r.name == "hf":
        defaults = RolloutConfig()
        ignored = [k for k in VLLM_ONLY_ROLLOUT_KEYS if getattr(r, k) != getattr(defaults, k)]
        if ignored:
            _log.warning("worker.rollout.name=hf ignores the vLLM-only settings %s (set worker.rollout.name=vllm "
                           "to use them)", ", ".join(f"worker.rollout.{k}" for k in ignored))
        return
    if t.n_gpus_per_node % r.tensor_parallel_size:
        raise ConfigError(f"`worker.rollout.tensor_parallel_size` = {r.tensor_parallel_size} must divide the workers "
                          f"per node (`training.n_gpus_per_node` = {t.n_gpus_per_node}): a tensor-parallel engine "
                          f"cannot span nodes.")


def _validate_lora_sync(config: MTRLConfig) -> None:
    """`worker.rollout.lora_sync=adapter` only where vLLM's LoRA can serve the actor's adapter (whether the
    adapter leaves the vision tower alone is checked when the workers build the actor: RolloutWeightSync)."""
    r, model = config.worker.rollout, config.worker.actor.model
    _choice("worker.rollout.lora_sync", r.lora_sync, LORA_SYNC_MODES)
    if r.lora_sync != "adapter":
        return
    if model.peft_type is None:
        _log.warning("worker.rollout.lora_sync=adapter has no effect: the actor has no adapter "
                     "(worker.actor.model.peft_type is not set), so its full weights are synced")
        return
    if r.name != "vllm":
        raise ConfigError(f"`worker.rollout.lora_sync` = adapter needs `worker.rollout.name` = vllm (vLLM's LoRA); the "
                          f"{r.name} engine takes the merged weights: use lora_sync=merged.")
    if model.peft_type != "lora":
        raise ConfigError(f"`worker.rollout.lora_sync` = adapter supports `worker.actor.model.peft_type` = lora only "
                          f"(got {model.peft_type}): use lora_sync=merged.")
    from mtrl.workers.rollout.vllm_engine import VLLM_LORA_RANKS

    if model.lora_rank > VLLM_LORA_RANKS[-1]:
        raise ConfigError(f"`worker.rollout.lora_sync` = adapter: vLLM's LoRA takes ranks up to {VLLM_LORA_RANKS[-1]}, "
                          f"`worker.actor.model.lora_rank` is {model.lora_rank}: use lora_sync=merged.")


def missing_rollout_engine(config: MTRLConfig) -> Optional[str]:
    """What is wrong with the installed vLLM when the run (or one of its RL stages) uses it, else None."""
    from mtrl.training.stages import resolve_stages

    configs = [stage.config for stage in resolve_stages(config)] or [config]
    if not any(c.training.mode == "rl" and c.worker.rollout.name == "vllm" for c in configs):
        return None
    from mtrl.workers.rollout.vllm_engine import vllm_version_problem

    return vllm_version_problem()


def _validate_policy_loss_settings(config: MTRLConfig) -> None:
    """The settings of the policy losses (mtrl/optimization/*_losses.py), of the overlong reward shaping and
    of the rollout correction."""
    o = config.optimization
    _positive("optimization.sapo_tau_positive", o.sapo_tau_positive)
    _positive("optimization.sapo_tau_negative", o.sapo_tau_negative)
    _range("optimization.clip_cov_ratio", o.clip_cov_ratio, 0, 1, low_open=True)
    _range("optimization.kl_cov_ratio", o.kl_cov_ratio, 0, 1, low_open=True)
    if o.clip_cov_lb >= o.clip_cov_ub:
        raise ConfigError(f"`optimization.clip_cov_lb` = {o.clip_cov_lb} must be < `optimization.clip_cov_ub` = "
                          f"{o.clip_cov_ub}.")
    if o.kl_cov_coef < 0:
        raise ConfigError(f"`optimization.kl_cov_coef` = {o.kl_cov_coef} must be >= 0.")
    max_length = config.worker.rollout.max_new_tokens or config.dataset.max_response_length
    _range("optimization.overlong_buffer_length (0 = off; at most the max response length)",
           o.overlong_buffer_length, 0, max_length)
    if o.overlong_penalty_factor < 0:
        raise ConfigError(f"`optimization.overlong_penalty_factor` = {o.overlong_penalty_factor} must be >= 0.")
    # Rollout correction applies to every registered policy loss (each multiplies its per-token loss by
    # the weights), and both engines return the sampled-token log-probs it needs.
    _choice("optimization.rollout_correction", o.rollout_correction, ROLLOUT_CORRECTION_NAMES)
    _choice("optimization.rollout_correction_level", o.rollout_correction_level, ROLLOUT_CORRECTION_LEVEL_NAMES)
    if not o.rollout_is_cap > 1.0:
        raise ConfigError(f"`optimization.rollout_is_cap` = {o.rollout_is_cap} must be > 1 (tis: weights "
                          f"min(r, cap); mis: weights kept for r in [1 / cap, cap]).")


def _validate_training_modes(config: MTRLConfig) -> None:
    """Keys of SFT, CHORD, DPO, reward models and data mixing (SPEC section 6)."""
    d, t, o, w = config.dataset, config.training, config.optimization, config.worker
    ch = o.chord
    _range("optimization.chord.expert_data_ratio", ch.expert_data_ratio, 0, 1, low_open=True, high_open=True)
    for key in ("mu_peak", "mu_valley"):
        _range(f"optimization.chord.{key}", getattr(ch, key), 0, 1)
    for key in ("mu_warmup_steps", "mu_decay_steps"):
        if getattr(ch, key) < 0:
            raise ConfigError(f"`optimization.chord.{key}` = {getattr(ch, key)} must be >= 0.")
    _choice("optimization.chord.sft_loss_agg_mode", ch.sft_loss_agg_mode, LOSS_AGG_MODES)
    _positive("optimization.dpo.beta", o.dpo.beta)
    _choice("optimization.dpo.loss_type", o.dpo.loss_type, DPO_LOSS_TYPE_NAMES)
    _range("optimization.dpo.label_smoothing", o.dpo.label_smoothing, 0, 0.5)
    _choice("dataset.mix_strategy", d.mix_strategy, MIX_STRATEGIES)
    _positive("worker.reward.micro_batch_size_per_device", w.reward.micro_batch_size_per_device)
    if t.val_only:
        return
    files_key = {"rl": "train_files", "sft": "sft_files", "dpo": "preference_files",
                 "reward_model": "preference_files"}[t.mode]
    if t.mode != "rl" and not getattr(d, files_key):
        raise ConfigError(f"`training.mode` = {t.mode} trains on `dataset.{files_key}`, which is empty.")
    if ch.enable and t.mode == "rl" and not d.sft_files:
        raise ConfigError("`optimization.chord.enable` = true needs expert rows in `dataset.sft_files`.")
    if d.file_weights is not None:
        entries = [e for e in (getattr(d, files_key) or "").split(",") if e.strip()]
        if len(d.file_weights) != len(entries):
            raise ConfigError(f"`dataset.file_weights` has {len(d.file_weights)} weights but `dataset.{files_key}` "
                              f"has {len(entries)} entries (one weight per entry).")
        if any(x < 0 for x in d.file_weights) or sum(d.file_weights) <= 0:
            raise ConfigError(f"`dataset.file_weights` = {list(d.file_weights)} must be >= 0 with a positive sum.")
    if t.mode == "rl" and w.reward.reward_type == "model" and not w.reward.reward_model_path:
        raise ConfigError("`worker.reward.reward_type` = model needs `worker.reward.reward_model_path` (a folder "
                          "written by a reward_model stage or run).")


def _attention_heads(model_path: Optional[str]) -> Optional[tuple]:
    """(query heads, key-value heads) of the text decoder in a local model folder's config.json, else None."""
    path = os.path.join(model_path or "", "config.json")
    if not model_path or not os.path.isfile(path):
        return None  # a Hub id, or a built-in model generated at start-up
    with open(path) as f:
        text = json.load(f)
    text = text.get("text_config") or text
    heads = text.get("num_attention_heads")
    return None if heads is None else (heads, text.get("num_key_value_heads") or heads)


def _validate_ulysses(config: MTRLConfig) -> None:
    """Ulysses groups are consecutive blocks of `ulysses_size` workers, each rank attending with heads / sp heads."""
    size, world = config.worker.actor.ulysses_size, config.training.world_size
    _positive("worker.actor.ulysses_size", size)
    if size > 1 and config.training.mode in ("dpo", "reward_model"):
        raise ConfigError(f"`worker.actor.ulysses_size` = {size}: sequence parallelism runs in the actor, reference "
                          f"and critic (modes rl and sft), not in training.mode = {config.training.mode}; use 1.")
    if world % size:
        raise ConfigError(f"`worker.actor.ulysses_size` = {size} must divide the {world} workers "
                          f"(`training.nnodes` x `training.n_gpus_per_node`).")
    heads = _attention_heads(config.worker.actor.model.model_path) if size > 1 else None
    if heads is not None and (heads[0] % size or heads[1] % size):
        raise ConfigError(f"`worker.actor.ulysses_size` = {size} must divide the model's attention heads "
                          f"({heads[0]} query, {heads[1]} key-value heads in "
                          f"{config.worker.actor.model.model_path}/config.json).")


def _validate_batch_sizes(config: MTRLConfig) -> None:
    d, t, w = config.dataset, config.training, config.worker
    # Outside RL a row is one SFT example or one preference pair: no n samples per prompt.
    world, n = t.world_size, (w.rollout.n if t.mode == "rl" else 1)
    roles = [("worker.actor", w.actor)]
    if config.optimization.advantage_estimator == "gae" and t.mode == "rl":
        roles.append(("worker.critic", w.critic))
    for section, cfg in roles:
        _positive(f"{section}.global_batch_size", cfg.global_batch_size)
        _positive(f"{section}.micro_batch_size_per_device_for_update", cfg.micro_batch_size_per_device_for_update)
        _positive(f"{section}.micro_batch_size_per_device_for_experience",
                  cfg.micro_batch_size_per_device_for_experience)
        if d.rollout_batch_size % cfg.global_batch_size != 0:
            raise ConfigError(f"`dataset.rollout_batch_size` = {d.rollout_batch_size} must be a multiple of "
                              f"`{section}.global_batch_size` = {cfg.global_batch_size}.")
        samples = cfg.global_batch_size * n
        if samples % world != 0:
            raise ConfigError(f"`{section}.global_batch_size` x `worker.rollout.n` = {samples} samples per "
                              f"mini-batch must divide evenly over {world} workers "
                              f"(`training.nnodes` x `training.n_gpus_per_node`).")
        per_device = samples // world
        if not cfg.dynamic_batching and per_device % cfg.micro_batch_size_per_device_for_update != 0:
            raise ConfigError(f"{per_device} samples per worker per mini-batch is not a multiple of "
                              f"`{section}.micro_batch_size_per_device_for_update` = "
                              f"{cfg.micro_batch_size_per_device_for_update}.")
    if d.rollout_batch_size * n < world:
        raise ConfigError(f"`dataset.rollout_batch_size` x `worker.rollout.n` = {d.rollout_batch_size * n} is "
                          f"smaller than the {world} workers.")


def to_plain_dict(node: Any) -> Any:
    """Config -> plain Python containers (for trackers and hashing)."""
    if is_dataclass(node):
        return {f.name: to_plain_dict(getattr(node, f.name)) for f in fields(node)}
    if isinstance(node, (list, tuple, ListConfig)):
        return [to_plain_dict(v) for v in node]
    if isinstance(node, (dict, DictConfig)):
        return {k: to_plain_dict(v) for k, v in node.items()}
    return node


def config_reference_markdown() -> str:
    """docs/CONFIG.md: every key with its type and default, generated from the dataclasses."""
    lines = ["# Config reference", "",
             "Generated from the dataclasses by `python -m mtrl.training.training_config > docs/CONFIG.md`.",
             "Precedence: defaults < `config=` YAML < dotted command-line overrides.", ""]

    def walk(node: Any, prefix: str) -> None:
        rows = []
        for f in fields(node):
            value = getattr(node, f.name)
            if is_dataclass(value):
                continue
            if f.name == "config_dir":
                continue
            type_name = str(f.type).replace("typing.", "") if hasattr(f.type, "__args__") else f.type.__name__
            type_name = type_name.replace("__main__.", "").replace(f"{__name__}.", "")
            shown = json.dumps(to_plain_dict(value))
            rows.append(f"| `{prefix}{f.name}` | {type_name} | `{shown}` |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", "| key | type | default |", "|---|---|---|", *rows, ""])
        for f in fields(node):
            value = getattr(node, f.name)
            if is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")

    walk(MTRLConfig(), "")
    lines.extend(["## `stages[]`", "",
                  "Each entry of `stages` (mtrl/training/stages.py); the four sections hold overrides of the "
                  "top-level keys.", "", "| key | type | default |", "|---|---|---|"])
    for f in fields(StageConfig):
        type_name = str(f.type).replace("typing.", "") if hasattr(f.type, "__args__") else f.type.__name__
        lines.append(f"| `stages[].{f.name}` | {type_name} | `{json.dumps(to_plain_dict(getattr(StageConfig(), f.name)))}` |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
