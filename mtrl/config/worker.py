"""The `worker` config section (actor, critic, reference policy, rollout engine, reward), and `WorkerRunConfig`,
what a worker process receives instead of the root config."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mtrl.optimization.config import OptimizationConfig

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
MIXED_PRECISION_DTYPES = ("bf16", "fp16", "fp32")
PEFT_TYPES = (None, "lora", "qlora")
LR_SCHEDULER_TYPES = ("constant", "constant_with_warmup", "linear", "cosine")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ROLLOUT_ENGINE_NAMES = ("hf", "vllm")
LORA_SYNC_MODES = ("merged", "adapter")
OLD_LOG_PROB_SOURCES = ("auto", "recompute", "rollout")
VLLM_ONLY_ROLLOUT_KEYS = ("gpu_memory_utilization", "tensor_parallel_size", "enable_prefix_caching",
                          "max_num_batched_tokens", "enforce_eager", "limit_mm_per_prompt")
# A reward function (`function`: its form as the file declares it; `sequential` / `batch`: EasyR1's names, forcing
# the per-sample / batch form) or a reward model.
REWARD_TYPES = ("function", "sequential", "batch", "model")


@dataclass
class ModelConfig:
    model_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    trust_remote_code: bool = False
    enable_gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    freeze_vision_tower: bool = False
    peft_type: Optional[str] = None
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # An architecture (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen2): build a tiny random model at model_path
    # when the folder is missing (quickstart and tests; nothing is downloaded).
    build_tiny_if_missing: Optional[str] = None


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant_with_warmup"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class FSDPConfig:
    sharding_strategy: str = "FULL_SHARD"
    mixed_precision_dtype: str = "bf16"
    cpu_offload: bool = False


@dataclass
class OffloadConfig:
    offload_params: bool = False
    offload_optimizer: bool = False


@dataclass
class TrainedRoleConfig:
    """What the actor and the critic share: a model trained with FSDP2 in micro-batches."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    micro_batch_size_per_device_for_update: int = 2
    micro_batch_size_per_device_for_experience: int = 8
    ppo_epochs: int = 1
    max_grad_norm: float = 1.0
    loss_agg_mode: str = "token-mean"
    padding_free: bool = True
    dynamic_batching: bool = True
    max_token_len_per_device: int = 16384


@dataclass
class ActorConfig(TrainedRoleConfig):
    # Prompts per PPO mini-batch (each brings `rollout.n` responses), as in verl and EasyR1.
    global_batch_size: int = 256
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.3
    clip_ratio_dual: float = 3.0
    ulysses_size: int = 1
    use_torch_compile: bool = False
    # Where pi_old (the PPO ratio's old log-probs) and the token entropies come from. recompute: the actor's
    # own forward pass before the update (always exact). auto: no pass when the step is one optimizer step
    # (ppo_epochs 1, one mini-batch) and nothing needs them before the update (no TPRL entropy filtering or
    # sampled_k3 perception pass, KL-in-reward penalty, adaptive entropy bonus, CHORD): pi_old is then the
    # policy being updated, so the update's own forward, detached, is exact (verl's `on_policy`, TRL); else
    # recompute. rollout: the hf engine records log_softmax(logits / T) of each sampled token and the entropy
    # during generation (same weights and compute dtype; within 1e-5 of the actor's in fp32; no LoRA), and
    # the pass never runs: verl's "bypass mode", but with the policy's own distribution, not the sampling one.
    old_log_probs: str = "auto"
    # Each distinct prompt of a micro-batch (a GRPO group's rows share theirs) runs once through the model,
    # images included, and its key/value cache is copied to its responses (mtrl.models.shared_prompts; same
    # numbers and gradients). Taken per micro-batch when it computes under 80% of the tokens; not with
    # Ulysses, nor on sliding-window / linear-attention models.
    share_prompts: bool = True


@dataclass
class CriticConfig(TrainedRoleConfig):
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    # None: the actor's global_batch_size.
    global_batch_size: Optional[int] = None
    cliprange_value: float = 0.5


@dataclass
class RefConfig:
    # Keep the frozen reference weights on CPU between reference passes.
    offload_params: bool = False
    micro_batch_size_per_device_for_experience: int = 8


@dataclass
class ValOverrideConfig:
    temperature: float = 0.0
    n: int = 1
    top_p: float = 1.0
    top_k: int = -1


@dataclass
class RolloutConfig:
    name: str = "hf"
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    # None: dataset.max_response_length.
    max_new_tokens: Optional[int] = None
    # vllm only (a warning when set with hf): the fraction of device memory vLLM may take (weights + KV
    # cache), the ranks per tensor-parallel engine, vLLM's prefix cache, its token budget per forward step,
    # no CUDA graphs, the longest prompt + response (None: dataset.max_prompt_length + max_new_tokens),
    # and the images / videos per prompt it reserves room for (empty: the most any row of the data has).
    gpu_memory_utilization: float = 0.4
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = False
    max_num_batched_tokens: Optional[int] = None
    enforce_eager: bool = False
    max_model_len: Optional[int] = None
    limit_mm_per_prompt: Dict[str, int] = field(default_factory=dict)
    # With a LoRA actor (worker.actor.model.peft_type=lora), what each step's sync sends the engine: `merged`,
    # the full weights with the adapter merged in; `adapter` (vllm only), the base weights once and then only
    # the adapter's factors, served by vLLM's LoRA (language-model modules only, no QLoRA).
    lora_sync: str = "merged"
    # Generated rows per generate call on each worker, i.e. prompts x n (16 with n = 8 is two prompts): what
    # sets the call's memory. The HF engine pads within a call.
    micro_batch_size_per_device: int = 16
    val_override: ValOverrideConfig = field(default_factory=ValOverrideConfig)


@dataclass
class RewardConfig:
    reward_type: str = "function"
    reward_fn_path: Optional[str] = None
    reward_fn_kwargs: Dict[str, Any] = field(default_factory=dict)
    num_cpus: int = 1
    reward_model_path: Optional[str] = None
    timeout_s: float = 300.0
    # raise: a failing reward (exception, non-number, NaN, wrong count, timeout, dead actor) stops the run
    # naming the sample; zero: that sample scores 0, counted as reward/errors, and the run goes on.
    on_error: str = "raise"
    # reward_type=model: rows per forward pass of the reward model on each worker.
    micro_batch_size_per_device: int = 8


@dataclass
class WorkerConfig:
    hybrid_engine: bool = True
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class WorkerRunConfig:
    """Everything a worker process is given: never the root config, so workers cannot depend on the controller.

    Filled in on the driver (`mtrl.training.worker_run_config.build_worker_run_config`) from the root config:
    `worker` is a copy of the `worker` section with the values the driver resolves set
    (`rollout.max_new_tokens`, `critic.model.model_path`), `optimization` is the `optimization` section
    (the actor's losses and TPRL settings) and `seed` is `training.seed`.
    """

    worker: WorkerConfig = field(default_factory=WorkerConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    seed: int = 1
