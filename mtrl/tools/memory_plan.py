"""Per-device memory plan of a config: will it fit, and what takes the room.

    python -m mtrl.tools.memory_plan config=configs/quickstart.yaml
    python -m mtrl.tools.memory_plan config=cfg.yaml worker.actor.model.model_path=Qwen/Qwen2.5-VL-7B-Instruct \\
        training.n_gpus_per_node=8 --gpu-memory-gb 80

The config is loaded exactly as the trainer loads it (defaults < `config=` YAML < dotted overrides). The model's
shape comes from its `config.json` (a local folder), or for a Hub id from a built-in table of known configs
(`KNOWN_CONFIGS`: Qwen2.5-VL-7B/32B/72B, Qwen3-VL-8B, Qwen2.5-7B), so the plan works offline. Parameter counts
are exact: the model is built on the meta device (no memory, no weights). A staged config gets one plan per stage.

The plan is per device and per phase of a training step, a column each:
  sync     the hybrid engine's weight sync (the actor's full state dict gathered, in fp32, into the engine)
  generate the rollout engine (hf: its inference copy + KV cache; vllm: its `gpu_memory_utilization` pool)
  logprob  the no-grad passes (old / perception / reference log-probs, critic values)
  update   forward + backward of one update micro-batch, with the gradients of earlier micro-batches
  step     the AdamW step (activations freed, gradients and the optimizer's temporaries live)
The peak is the largest column. What each row counts (P parameters, W = nnodes x n_gpus_per_node FSDP ranks, b the
compute dtype's bytes (`fsdp.mixed_precision_dtype`), T tokens in a micro-batch):

* actor parameters: fp32 shards, 4P/W (FSDP keeps fp32 master weights and casts to b for compute; NO_SHARD: 4P).
  Off the device with `fsdp.cpu_offload`; with `offload.offload_params` only during the actor's own phases.
* gradients: fp32 shards of the trainable parameters, 4P_t/W, update and step only (set to None after the step).
* AdamW state: exp_avg + exp_avg_sq in fp32, 8P_t/W (`offload.offload_optimizer`: only during update and step);
  the step's temporaries: the foreach kernels' sqrt(exp_avg_sq) copy on GPU (4P_t/W), one parameter's on CPU.
* FSDP unsharded units: the all-gathered compute-dtype copies: the root unit (embeddings, LM head, final norm)
  and two decoder blocks (the current and the prefetched one) or the vision tower, whichever is larger;
  SHARD_GRAD_OP / NO_SHARD keep every unit gathered between forward and backward (bP). In the backward pass one
  block's unsharded fp32 gradient waits for its reduce-scatter.
* activations (update): per decoder layer, what autograd saves for T tokens:
      (4 + b)·2h              the two RMSNorms (fp32 input, compute-dtype output)
    + b·(H·d + 2·K·d)        q, k, v after RoPE (flash-attn); the CPU kernel repeats k, v to H heads: b·3·H·d
    + b·H·d                   the attention output (+ b·H·d on CPU: its contiguous copy for o_proj)
    + 4b·I                    gate, up, silu(gate), silu(gate)·up
    [+ (4 + b)·(H·d + K·d)    Qwen3's q/k norms]
  (h hidden, I intermediate, H / K query / kv heads, d head dim). With gradient checkpointing only each layer's
  input (b·h per token) is kept, plus one layer's full set while it is recomputed. Then the final norm, and the
  vocabulary logits of the N response tokens: kept in the compute dtype for the loss's backward, plus their
  gradient, plus fp32 chunks of at most 1024 rows (`mtrl.optimization.log_probs`): 2·N·V·b + 2·4·min(N, 1024)·V.
  The vision tower: the same per-block formula with its width, heads and MLP for the image patches of the
  micro-batch's rows (none when `freeze_vision_tower`), plus its patch merger.
  T: `max_token_len_per_device` with dynamic batching, else micro_batch_size x (max prompt + max response);
  rows = T / (prompt + response), N = rows x response, images = rows x --images-per-sample, each image
  min(max_pixels / patch², max prompt x merge²) patches.
* reference: compute-dtype shards bP/W, frozen (none with LoRA: the actor without its adapter is the reference).
* critic (advantage_estimator=gae): its own parameters, gradients, AdamW state and activations (no vocabulary
  logits: one value per token).
* rollout, hf: an unsharded inference copy (bP) and a KV cache of micro_batch_size_per_device rows x (prompt +
  response) tokens, 2·layers·K·d·b per token, and the prefill's working memory; the sync gathers the full fp32
  state dict (4P) while the copy is filled. vllm: `gpu_memory_utilization` x device memory during generation
  (weights / tensor_parallel_size, the rest KV cache; freed between rollouts, as verl's sleep mode does).
* LoRA: only the adapter (r·(in + out) per target linear layer) is trained; QLoRA's base weights are 4-bit
  (0.5 byte + 1/16 for the block scales) and replicated on every rank.
* GPU only: CUDA context, NCCL and allocator reserve, a constant `CUDA_OVERHEAD_GB`.

On CPU (`--device cpu`, or `training.device=cpu`) the same formulas run with CPU's kernels; the estimate is
checked against memory measured on CPU by tests/test_memory_plan.py and benchmarks/memory_plan_validation.py.
The trainer calls `check_memory_at_startup` before any worker starts: a warning with the table when a GPU run
cannot fit, one informative line on CPU.
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from mtrl.utils.logger import get_logger

logger = get_logger(__name__)

GB = 1024 ** 3
PHASES = ("sync", "generate", "logprob", "update", "step")
CRITIC_PHASES = ("critic-update", "critic-step")
CUDA_OVERHEAD_GB = 2.0  # CUDA context (~0.5-1 GB), NCCL buffers, allocator reserve
LOGIT_CHUNK_ROWS = 1024  # mtrl.optimization.log_probs._VOCAB_CHUNK_TOKENS
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QLORA_BYTES_PER_PARAM = 0.5 + 1 / 16  # 4-bit weights + one fp32 absmax per 64 weights

_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")

# config.json of Hub models (the architecture keys only), so that a plan needs no download.
KNOWN_CONFIGS: Dict[str, dict] = {
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(
        model_type="qwen2_5_vl", tie_word_embeddings=False,
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
        vision_config=dict(_QWEN25_VISION, out_hidden_size=3584)),
    "Qwen/Qwen2.5-VL-32B-Instruct": dict(
        model_type="qwen2_5_vl", tie_word_embeddings=False,
        text_config=dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                         num_key_value_heads=8, vocab_size=152064),
        vision_config=dict(_QWEN25_VISION, out_hidden_size=5120)),
    "Qwen/Qwen2.5-VL-72B-Instruct": dict(
        model_type="qwen2_5_vl", tie_word_embeddings=False,
        text_config=dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=152064),
        vision_config=dict(_QWEN25_VISION, out_hidden_size=8192)),
    "Qwen/Qwen3-VL-8B-Instruct": dict(
        model_type="qwen3_vl", tie_word_embeddings=False,
        text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", tie_word_embeddings=False, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}
# The base models have the instruct models' architecture.
KNOWN_CONFIGS.update({name[:-len("-Instruct")]: cfg for name, cfg in list(KNOWN_CONFIGS.items())})


# ----------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class VisionShape:
    depth: int
    hidden: int
    intermediate: int
    heads: int
    patch_size: int
    merge_size: int
    gated_mlp: bool  # Qwen2.5-VL: gate/up/down (SiLU); Qwen2-VL / Qwen3-VL: fc1 -> GELU -> fc2
    params: int
    block_params: int


@dataclass(frozen=True)
class Architecture:
    """What the plan needs to know of a model, read from its config and its meta-device module tree."""

    name: str
    source: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool  # Qwen3
    params: int
    block_params: int  # the largest decoder layer
    root_params: int  # outside the decoder layers and the vision tower: embeddings, LM head, final norm
    lm_head_params: int  # 0 when tied to the embeddings
    largest_param: int  # elements of the largest single tensor
    vision: Optional[VisionShape]
    # (leaf module name, in_features, out_features) of every linear layer: LoRA targets and QLoRA's 4-bit weights.
    linears: Tuple[Tuple[str, int, int], ...] = field(repr=False)
    decoder_linear_params: int = 0

    def lora_params(self, target_modules: Sequence[str], rank: int) -> int:
        targets = set(target_modules)
        return sum(rank * (fan_in + fan_out) for name, fan_in, fan_out in self.linears if name in targets)


def _hf_config(model_path: str, trust_remote_code: bool = False):
    """(transformers config, where it came from): a local folder's config.json, else the built-in table."""
    from transformers import AutoConfig  # noqa: PLC0415

    if os.path.isfile(os.path.join(model_path, "config.json")):
        return (AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code),
                f"{os.path.join(model_path, 'config.json')}")
    hub_id = model_path.split("@", 1)[0]
    if hub_id in KNOWN_CONFIGS:
        return (AutoConfig.for_model(**KNOWN_CONFIGS[hub_id]),
                f"built-in table of known configs (offline; {hub_id})")
    raise FileNotFoundError(
        f"{model_path}: no config.json there, and not a known Hub id ({', '.join(sorted(KNOWN_CONFIGS))}). "
        f"Point model_path at a local model folder.")


def read_architecture(model_path: str, trust_remote_code: bool = False) -> Architecture:
    """The model's shape and exact parameter counts (built on the meta device: no memory, no weights)."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    config, source = _hf_config(model_path, trust_remote_code)
    text = getattr(config, "text_config", None) or config
    vision_config = getattr(config, "vision_config", None)
    auto = transformers.AutoModelForImageTextToText if vision_config is not None else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    from mtrl.models.loader import decoder_layers, vision_tower  # noqa: PLC0415

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    params = count(model)
    blocks = decoder_layers(model)
    tower = vision_tower(model)
    block_params = max(count(b) for b in blocks)
    tower_params = count(tower) if tower is not None else 0
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is model.get_input_embeddings().weight
    linears = tuple((name.rsplit(".", 1)[-1], m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not lm_head)
    decoder_linear_params = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    vision = None
    if tower is not None:
        v = vision_config
        width = getattr(v, "hidden_size", None) if getattr(v, "embed_dim", None) is None else v.embed_dim
        inter = getattr(v, "intermediate_size", None) or int(width * getattr(v, "mlp_ratio", 4))
        vision = VisionShape(depth=v.depth, hidden=width, intermediate=inter, heads=v.num_heads,
                             patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                             gated_mlp=config.model_type == "qwen2_5_vl", params=tower_params,
                             block_params=max(count(b) for b in tower.blocks))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Architecture(
        name=os.path.basename(model_path.rstrip("/")) or model_path, source=source, hidden=text.hidden_size,
        intermediate=text.intermediate_size, layers=text.num_hidden_layers, heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads, head_dim=head_dim, vocab=text.vocab_size,
        qk_norm="qwen3" in config.model_type, params=params, block_params=block_params,
        root_params=params - sum(count(b) for b in blocks) - tower_params,
        lm_head_params=0 if tied or lm_head is None else lm_head.weight.numel(),
        largest_param=max(p.numel() for p in model.parameters()), vision=vision, linears=linears,
        decoder_linear_params=decoder_linear_params)


# ----------------------------------------------------------------------------- activation formulas


def layer_activation_bytes(tokens: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                           b: int, flash: bool, gated_mlp: bool = True, qk_norm: bool = False) -> float:
    """Bytes autograd keeps for one transformer block over `tokens` tokens (the formula in the module docstring)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    norms = 2 * (4 + b) * hidden
    qkv = b * (q + 2 * kv) if flash else b * 3 * q
    attention_out = b * q * (1 if flash else 2)
    mlp = b * intermediate * (4 if gated_mlp else 3)
    extra = (4 + b) * (q + kv) if qk_norm else 0
    return tokens * (norms + qkv + attention_out + mlp + extra)


def logits_bytes(response_tokens: int, vocab: int, b: int) -> float:
    """The loss's vocabulary logits: kept in the compute dtype + their gradient + the fp32 chunks."""
    return 2 * response_tokens * vocab * b + 2 * 4 * min(response_tokens, LOGIT_CHUNK_ROWS) * vocab


@dataclass(frozen=True)
class MicroBatch:
    tokens: int
    rows: int
    response_tokens: int
    image_patches: int


def micro_batch(tokens_budget: Optional[int], rows: Optional[int], prompt_len: int, response_len: int,
                images_per_sample: float, arch: Architecture, max_pixels: int) -> MicroBatch:
    """The largest micro-batch: a token budget (dynamic batching) or a row count, of full-length rows."""
    seq = prompt_len + response_len
    tokens = max(tokens_budget, seq) if tokens_budget is not None else rows * seq
    rows = max(1, tokens // seq)
    patches = 0
    if arch.vision is not None:
        per_image = min(max_pixels // arch.vision.patch_size ** 2, prompt_len * arch.vision.merge_size ** 2)
        patches = int(rows * images_per_sample * per_image)
    return MicroBatch(tokens=tokens, rows=rows, response_tokens=rows * response_len, image_patches=patches)


def text_activations(arch: Architecture, tokens: int, b: int, flash: bool, checkpointing: bool) -> float:
    one = layer_activation_bytes(tokens, arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.head_dim,
                                 b, flash, qk_norm=arch.qk_norm)
    final_norm = (4 + b) * arch.hidden * tokens
    if checkpointing:
        return arch.layers * b * arch.hidden * tokens + one + final_norm
    return arch.layers * one + final_norm


def vision_activations(arch: Architecture, patches: int, b: int, flash: bool, checkpointing: bool) -> float:
    v = arch.vision
    if v is None or patches == 0:
        return 0.0
    one = layer_activation_bytes(patches, v.hidden, v.intermediate, v.heads, v.heads, v.hidden // v.heads, b,
                                 flash, gated_mlp=v.gated_mlp)
    merger = (4 + b) * v.hidden * patches + 2 * b * v.hidden * patches
    if checkpointing:
        return v.depth * b * v.hidden * patches + one + merger
    return v.depth * one + merger


# ----------------------------------------------------------------------------- the plan


@dataclass
class Row:
    component: str
    bytes: Dict[str, float]  # phase -> bytes
    note: str = ""


@dataclass
class MemoryPlan:
    title: str
    device: str  # "gpu" | "cpu"
    device_memory_gb: float
    arch: Architecture
    rows: List[Row]
    notes: List[str]

    phases: Tuple[str, ...] = PHASES

    def total(self, phase: str) -> float:
        return sum(r.bytes.get(phase, 0.0) for r in self.rows)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak_gb(self) -> float:
        return self.total(self.peak_phase) / GB

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.device_memory_gb

    def verdict(self) -> str:
        where = f"{self.device_memory_gb:g} GB per {'GPU' if self.device == 'gpu' else 'worker'}"
        if not self.fits:
            return (f"DOES NOT FIT: peak {self.peak_gb:.1f} GB in phase `{self.peak_phase}` > {where}. "
                    f"Try: more GPUs (FSDP shards scale 1/W), worker.actor.model.enable_gradient_checkpointing=true, "
                    f"a smaller worker.actor.max_token_len_per_device, offload (worker.actor.offload.*, "
                    f"worker.ref.offload_params), LoRA, or a lower worker.rollout.gpu_memory_utilization.")
        headroom = self.device_memory_gb - self.peak_gb
        tight = " (tight: keep ~10% for allocator fragmentation)" if headroom < 0.1 * self.device_memory_gb else ""
        return f"fits: peak {self.peak_gb:.1f} GB in phase `{self.peak_phase}` of {where}{tight}"

    def table(self) -> str:
        width = max(len(r.component) for r in self.rows) + 2
        cells = [max(9, len(p) + 2) for p in self.phases]
        head = f"{'component':<{width}}" + "".join(f"{p:>{c}}" for p, c in zip(self.phases, cells)) + "  note"
        lines = [self.title, f"model: {self.arch.name}: {self.arch.params / 1e9:.3f}B parameters "
                 f"({self.arch.source})", head, "-" * len(head)]
        for r in self.rows:
            shown = "".join(f"{r.bytes[p] / GB:>{c}.2f}" if r.bytes.get(p) else f"{'-':>{c}}"
                            for p, c in zip(self.phases, cells))
            lines.append(f"{r.component:<{width}}{shown}  {r.note}")
        lines.append("-" * len(head))
        lines.append(f"{'total (GB)':<{width}}" + "".join(f"{self.total(p) / GB:>{c}.2f}"
                                                            for p, c in zip(self.phases, cells)))
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(self.verdict())
        return "\n".join(lines)


def _phases(value: float, phases: Sequence[str]) -> Dict[str, float]:
    return {p: value for p in phases}


def _trained_role_rows(label: str, role, arch: Architecture, params: int, trainable: int, world: int, b: int,
                       device: str, phases: Sequence[str], active: Sequence[str], training: Tuple[str, str],
                       mb: MicroBatch, exp_mb: MicroBatch, with_logits: bool) -> List[Row]:
    """Parameters, gradients, AdamW state, FSDP buffers and activations of a model trained with FSDP2.

    `phases`: all of the plan's; `active`: those in which the model is used (offloaded otherwise, if asked);
    `training`: the names of its (update, step) phases."""
    update, step = training
    active = [p for p in active if p in phases]
    fsdp, offload = role.fsdp, role.offload
    shards = 1 if fsdp.sharding_strategy == "NO_SHARD" else world
    on_device = not fsdp.cpu_offload
    flash = device == "gpu"
    qlora = role.model.peft_type == "qlora"
    rows: List[Row] = []
    if qlora:
        quantized = arch.decoder_linear_params
        weights = quantized * QLORA_BYTES_PER_PARAM + (params - quantized) * b / shards
        rows.append(Row(f"{label} parameters (QLoRA 4-bit base, replicated)", _phases(weights, phases)))
    else:
        resident = active if offload.offload_params else phases
        rows.append(Row(f"{label} parameters (fp32 shards)",
                        _phases(4 * params / shards if on_device else 0, resident),
                        "fsdp.cpu_offload: on the host" if not on_device else
                        ("offload_params: only in its phases" if offload.offload_params else "")))
    rows.append(Row(f"{label} gradients (fp32 shards)",
                    _phases(4 * trainable / shards if on_device else 0, training)))
    adam = 8 * trainable / shards if on_device else 0
    rows.append(Row(f"{label} AdamW exp_avg + exp_avg_sq (fp32)",
                    _phases(adam, training if offload.offload_optimizer else phases),
                    "offload_optimizer: only in update/step" if offload.offload_optimizer else ""))
    step_tmp = 4 * trainable / shards if device == "gpu" else 2 * 4 * min(trainable, arch.largest_param) / shards
    rows.append(Row(f"{label} AdamW step temporaries", {step: step_tmp if on_device else 0},
                    "foreach sqrt copy" if device == "gpu" else "per-parameter"))
    vision_unit = arch.vision.params if arch.vision is not None else 0
    if fsdp.sharding_strategy == "FULL_SHARD":
        gathered = b * (arch.root_params + max(2 * arch.block_params, vision_unit))
    else:
        gathered = b * params
    rows.append(Row(f"{label} FSDP unsharded units (compute dtype)",
                    {**_phases(gathered, ("logprob",) if "logprob" in active else ()),
                     update: gathered + 4 * arch.block_params},
                    "root + 2 blocks, + 1 block's fp32 grads" if fsdp.sharding_strategy == "FULL_SHARD" else
                    "all units gathered"))
    ckpt = role.model.enable_gradient_checkpointing
    frozen_tower = role.model.freeze_vision_tower
    text = text_activations(arch, mb.tokens, b, flash, ckpt)
    vision = 0.0 if frozen_tower else vision_activations(arch, mb.image_patches, b, flash, ckpt)
    rows.append(Row(f"{label} activations: decoder ({mb.tokens} tokens)", {update: text},
                    "gradient checkpointing" if ckpt else "no checkpointing"))
    if arch.vision is not None:
        rows.append(Row(f"{label} activations: vision ({mb.image_patches} patches)", {update: vision},
                        "frozen tower" if frozen_tower else ""))
    if with_logits:
        rows.append(Row(f"{label} vocabulary logits ({mb.response_tokens} tokens)",
                        {update: logits_bytes(mb.response_tokens, arch.vocab, b),
                         "logprob": _no_grad_bytes(arch, exp_mb, b)}, "+ no-grad passes' logits"))
    else:
        rows.append(Row(f"{label} no-grad pass working memory", {"logprob": _no_grad_bytes(arch, exp_mb, b, False)}))
    return rows


def _no_grad_bytes(arch: Architecture, mb: MicroBatch, b: int, with_logits: bool = True) -> float:
    """A no-grad forward: one layer's temporaries (the MLP's gate, up, product) and the response logits."""
    layer = 3 * b * arch.intermediate * mb.tokens + 2 * b * arch.hidden * mb.tokens
    if not with_logits:
        return layer
    return layer + 2 * mb.response_tokens * arch.vocab * b + 3 * 4 * min(mb.response_tokens, LOGIT_CHUNK_ROWS) * arch.vocab


def plan_memory(config, arch: Architecture, device: str = "gpu", device_memory_gb: float = 80.0,
                images_per_sample: float = 1.0, title: str = "", sync_bucket_gb: Optional[float] = None) -> MemoryPlan:
    """The per-device memory plan of an (un-staged) `MTRLConfig` for `arch`, on `device` ("gpu" or "cpu").

    `sync_bucket_gb`: the weight sync's extra memory when it streams bounded buckets; None: today's
    `gather_full_state_dict`, the whole model in fp32 at once."""
    d, t, o, w = config.dataset, config.training, config.optimization, config.worker
    actor, rollout = w.actor, w.rollout
    world = t.nnodes * t.n_gpus_per_node
    b = DTYPE_BYTES[actor.fsdp.mixed_precision_dtype]
    mode = t.mode
    rl = mode == "rl"
    prompt, response = d.max_prompt_length, (rollout.max_new_tokens or d.max_response_length)
    if mode in ("sft", "dpo", "reward_model"):
        response = d.max_response_length
    peft = actor.model.peft_type
    P = arch.params
    if mode == "reward_model":
        P = P - arch.lm_head_params + arch.hidden + 1
    trainable = arch.lora_params(actor.model.lora_target_modules, actor.model.lora_rank) if peft else P
    # A frozen tower has no gradients; neither does one that never sees an image (text-only rows).
    if (actor.model.freeze_vision_tower or images_per_sample == 0) and not peft and arch.vision is not None:
        trainable -= arch.vision.params
    if peft:
        P += trainable

    def mb_for(role, update: bool) -> MicroBatch:
        rows = role.micro_batch_size_per_device_for_update if update else role.micro_batch_size_per_device_for_experience
        budget = role.max_token_len_per_device if role.dynamic_batching else None
        return micro_batch(budget, rows, prompt, response, images_per_sample, arch, d.max_pixels)

    notes: List[str] = []
    update_mb, exp_mb = mb_for(actor, True), mb_for(actor, False)
    critic = rl and o.advantage_estimator == "gae"
    phases = PHASES + CRITIC_PHASES if critic else PHASES
    if not rl:
        phases = ("logprob", "update", "step")
    rows = _trained_role_rows("actor", actor, arch, P, trainable, world, b, device, phases,
                              ("sync", "logprob", "update", "step"), ("update", "step"), update_mb, exp_mb,
                              with_logits=mode != "reward_model")
    needs_ref = (rl and not o.disable_divergence) or mode == "dpo"
    if needs_ref and not peft:
        ref_phases = ("logprob",) if w.ref.offload_params else phases
        rows.append(Row("reference parameters (compute dtype shards)", _phases(b * arch.params / world, ref_phases),
                        "ref.offload_params: only in logprob" if w.ref.offload_params else "frozen, no grads"))
    elif needs_ref:
        notes.append("LoRA: the reference policy is the actor with its adapter disabled (no second copy)")
    if critic:
        critic_params = arch.params - arch.lm_head_params + arch.hidden + 1
        rows += _trained_role_rows("critic", w.critic, arch, critic_params, critic_params, world, b, device, phases,
                                   ("logprob",) + CRITIC_PHASES, CRITIC_PHASES, mb_for(w.critic, True),
                                   mb_for(w.critic, False), with_logits=False)
        notes.append("critic (advantage_estimator=gae): colocated with the actor, updated in its own phases")
    if rl:
        rows += _rollout_rows(config, arch, P, b, device_memory_gb, prompt, response, notes, sync_bucket_gb)
    if device == "gpu":
        rows.append(Row("CUDA context, NCCL, allocator reserve", _phases(CUDA_OVERHEAD_GB * GB, phases)))
    if arch.vision is not None:
        notes.append(f"vision: {images_per_sample:g} image(s) per sample of at most dataset.max_pixels="
                     f"{d.max_pixels} pixels ({update_mb.image_patches} patches per update micro-batch)")
    shown = ", ".join(f"{k}={v}" for k, v in (
        ("mode", mode), ("W", world), ("dtype", actor.fsdp.mixed_precision_dtype),
        ("fsdp", actor.fsdp.sharding_strategy), ("peft", peft), ("rollout", rollout.name if rl else None),
        ("device", device)) if v is not None)
    return MemoryPlan(title=title or f"memory plan ({shown})", device=device, device_memory_gb=device_memory_gb,
                      arch=arch, rows=rows, notes=notes, phases=phases)


def _rollout_rows(config, arch: Architecture, params: int, b: int, device_memory_gb: float, prompt: int,
                  response: int, notes: List[str], sync_bucket_gb: Optional[float]) -> List[Row]:
    rollout = config.worker.rollout
    rows_per_call = rollout.micro_batch_size_per_device
    kv_per_token = 2 * arch.layers * arch.kv_heads * arch.head_dim * b
    kv_needed = rows_per_call * (prompt + response) * kv_per_token
    out: List[Row] = []
    # The sync streams one full tensor at a time in the rollout dtype (mtrl/workers/rollout/weight_sync.py).
    sync_row = (Row("weight sync: the largest tensor", {"sync": b * arch.largest_param}, "streamed, one at a time")
                if sync_bucket_gb is None else
                Row("weight sync: one bucket", {"sync": sync_bucket_gb * GB}, "streamed sync"))
    if rollout.name == "vllm":
        pool = rollout.gpu_memory_utilization * device_memory_gb * GB
        weights = b * params / rollout.tensor_parallel_size
        out.append(sync_row)
        out.append(Row(f"vLLM pool ({rollout.gpu_memory_utilization:g} x device)", {"sync": pool, "generate": pool},
                       "weights + KV cache; freed between rollouts"))
        room = pool - weights
        notes.append(f"vLLM: weights {weights / GB:.1f} GB (tp={rollout.tensor_parallel_size}), KV cache room "
                     f"{room / GB:.1f} GB = {max(0, room) / kv_per_token:,.0f} tokens; "
                     f"{rows_per_call} rows x {prompt + response} tokens need {kv_needed / GB:.1f} GB")
        if room < kv_needed:
            notes.append("vLLM: the KV cache cannot hold a whole rollout micro-batch at once (it will queue "
                         "requests or fail to start if not even one sequence fits)")
        return out
    out.append(sync_row)
    out.append(Row("hf engine: inference copy (compute dtype)", _phases(b * params, ("sync", "generate")),
                   "released after generation"))
    out.append(Row(f"hf engine: KV cache ({rows_per_call} x {prompt + response} tokens)", {"generate": kv_needed}))
    prefill = rows_per_call * prompt * (3 * arch.intermediate + 2 * arch.hidden) * b + rows_per_call * arch.vocab * 4 * 2
    out.append(Row("hf engine: prefill + sampling working memory", {"generate": prefill}))
    return out


# ----------------------------------------------------------------------------- entry points


def plans_for_config(config, device: str, device_memory_gb: float, images_per_sample: float = 1.0,
                     arch: Optional[Architecture] = None, sync_bucket_gb: Optional[float] = None) -> List[MemoryPlan]:
    """One plan per stage (or one for an un-staged config); the architecture is the top-level actor model's."""
    model = config.worker.actor.model
    arch = arch or read_architecture(model.model_path, model.trust_remote_code)
    if not config.stages:
        return [plan_memory(config, arch, device, device_memory_gb, images_per_sample, sync_bucket_gb=sync_bucket_gb)]
    from mtrl.training.stages import resolve_stages  # noqa: PLC0415

    return [plan_memory(stage.config, arch, device, device_memory_gb, images_per_sample,
                        title=f"stage {stage.name} ({stage.mode})", sync_bucket_gb=sync_bucket_gb)
            for stage in resolve_stages(config)]


def check_memory_at_startup(config, on_gpu: bool) -> Optional[MemoryPlan]:
    """The trainer's start-up check: on GPU a warning with the plan when it cannot fit (device memory read from
    CUDA when the driver sees a GPU, else 80 GB assumed); on CPU one informative line. Never stops the run.
    Validation-only runs are not planned: the plan is of training steps (update, optimizer, critic)."""
    if config.training.val_only:
        return None
    try:
        memory_gb = 80.0
        if on_gpu:
            import torch  # noqa: PLC0415

            if torch.cuda.is_available():
                memory_gb = torch.cuda.get_device_properties(0).total_memory / GB
        plan = plan_memory(config, read_architecture(config.worker.actor.model.model_path,
                                                     config.worker.actor.model.trust_remote_code),
                           "gpu" if on_gpu else "cpu", memory_gb)
    except Exception as e:  # a diagnostic: an unreadable model is reported by the trainer itself, more clearly
        logger.info("memory plan skipped: %s", e)
        return None
    if not on_gpu:
        logger.info("memory plan: about %.2f GB per worker process at the peak (%s; CPU run, not checked)",
                    plan.peak_gb, plan.peak_phase)
    elif not plan.fits:
        logger.warning("this config is not expected to fit in GPU memory:\n%s\n(python -m mtrl.tools.memory_plan "
                       "config=... prints this table)", plan.table())
    else:
        logger.info("memory plan: %s", plan.verdict())
    return plan


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtrl.tools.memory_plan",
        description="Per-device memory estimate of a config (see the module docstring for the formulas).",
        epilog="Other arguments are the trainer's: config=FILE.yaml and dotted section.key=value overrides.")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per device (default 80)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default=None,
                        help="the kernels and overheads to plan for (default: cpu when training.device=cpu)")
    parser.add_argument("--images-per-sample", type=float, default=1.0)
    parser.add_argument("--sync-bucket-gb", type=float, default=None,
                        help="plan a streamed weight sync of this bucket size (default: the whole fp32 model at once)")
    args, rest = parser.parse_known_args(argv)
    from mtrl.training.training_config import ConfigError, load_config  # noqa: PLC0415

    try:
        config = load_config(rest)
    except ConfigError as e:
        print(f"mtrl: config error: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cpu" if config.training.device == "cpu" else "gpu")
    try:
        plans = plans_for_config(config, device, args.gpu_memory_gb, args.images_per_sample,
                                 sync_bucket_gb=args.sync_bucket_gb)
    except FileNotFoundError as e:
        print(f"mtrl: error: {e}", file=sys.stderr)
        return 2
    print("\n\n".join(p.table() for p in plans))
    return 0 if all(p.fits for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
