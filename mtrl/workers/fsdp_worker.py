"""What every FSDP2 worker (actor / reference / rollout, critic, reward model, preference) shares: the set-up of
its process (`FSDPWorker.setup_process`) and the one model builder (`build_fsdp_model`).

FSDP2 itself is applied in one place, `fsdp_utils.apply_fsdp2`, which the builder calls last.
"""

import importlib
import os
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from mtrl.config.worker import FSDPConfig, ModelConfig, TrainedRoleConfig, WorkerRunConfig
from mtrl.models import lora
from mtrl.models.attention import enable_padding_free_attention
from mtrl.models.dtypes import resolve_dtype
from mtrl.models.loader import (decoder_layers, load_model, load_processor, load_reward_model, vision_blocks,
                                vision_tower)
from mtrl.single_controller.base import Worker
from mtrl.workers.fsdp_utils import PhaseMemory, apply_fsdp2

# "lm": the language model; "value": a fresh scalar head (critic); "score": the folder's trained scalar head
# (reward model); "score_or_new": the folder's scalar head, or a fresh one when it has none (reward-model training).
MODEL_HEADS = ("lm", "value", "score", "score_or_new")


def build_fsdp_model(model_path: str, *, fsdp: FSDPConfig, device_type: str, trainable: bool, head: str = "lm",
                     gradient_checkpointing: bool = False, freeze_vision_tower: bool = False,
                     padding_free: bool = False, adapter: Optional[ModelConfig] = None,
                     attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> nn.Module:
    """Load a model, make its attention padding-free, add a LoRA adapter, freeze it unless `trainable`, shard it.

    Parameter dtype (the one rule): a trainable model keeps fp32 weights (FSDP's mixed precision casts them to
    `fsdp.mixed_precision_dtype` for compute), a frozen one (reference, reward model) is stored in that compute
    dtype, which gives the same numbers at half the memory with bf16. Gradient checkpointing and a frozen vision
    tower apply to trainable models only (a frozen model is frozen whole). `adapter`: the model config whose
    `peft_type` (lora / qlora) and `lora_*` keys add an adapter (mtrl.models.lora); QLoRA loads the base in 4 bit,
    in the FSDP compute dtype, and keeps the packed weights unsharded.

    Sharded loading: every rank builds the model with its parameters on the meta device and shards it; only
    rank 0 reads the checkpoint (one full copy per node, whatever the number of ranks), and its weights are
    broadcast into the shards one tensor at a time (`_load_from_rank0`).
    """
    if head not in MODEL_HEADS:
        raise ValueError(f"head={head!r}; use one of {MODEL_HEADS}")
    peft = lora.peft_type(adapter) if adapter is not None else None
    compute_dtype = resolve_dtype(fsdp.mixed_precision_dtype)
    options = dict(attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                   gradient_checkpointing=trainable and gradient_checkpointing,
                   freeze_vision_tower=trainable and freeze_vision_tower)
    if peft == "qlora":  # bitsandbytes quantizes while loading, on each GPU
        model = lora.load_quantized_model(model_path, compute_dtype=compute_dtype, **options)
        return _adapt_and_shard(model, adapter, trainable, padding_free, fsdp, device_type)
    options["dtype"] = torch.float32 if trainable else compute_dtype
    source = _load_weights(model_path, head, options) if dist.get_rank() == 0 else None
    if source is not None and peft is not None:
        source = lora.apply_lora(source, adapter)  # the adapter's initial weights come from rank 0 too
    with torch.random.fork_rng(devices=[]):  # the empty twin's random init (a value head) must leave no trace
        model = load_model(model_path, for_value=head != "lm", empty=True, **options)
        # By module, not name: the adapter renames them.
        buffers = [(module, name, buf.detach().clone()) for module in model.modules()
                   for name, buf in module.named_buffers(recurse=False)]
        model = _adapt_and_shard(model, adapter, trainable, padding_free, fsdp, device_type)
    _load_from_rank0(model, source, buffers, device_type, offloaded=fsdp.cpu_offload)
    return model


def _load_weights(model_path: str, head: str, options: dict) -> nn.Module:
    """The model with the folder's weights, on the CPU (rank 0 only)."""
    if head in ("score", "score_or_new"):
        return load_reward_model(model_path, require_head=head == "score", **options)
    return load_model(model_path, for_value=head == "value", **options)


def _adapt_and_shard(model: nn.Module, adapter: Optional[ModelConfig], trainable: bool, padding_free: bool,
                     fsdp: FSDPConfig, device_type: str) -> nn.Module:
    if padding_free:
        enable_padding_free_attention(model)
    if adapter is not None and lora.peft_type(adapter) is not None:
        model = lora.apply_lora(model, adapter)
    if not trainable:
        model.requires_grad_(False)
    return apply_fsdp2(model, fsdp, device_type, vision_blocks(model) + decoder_layers(model), vision_tower(model),
                       ignored_params=lora.quantized_params(model))


def _load_from_rank0(model: nn.Module, source: Optional[nn.Module], buffers: List[Tuple[nn.Module, str, torch.Tensor]],
                     device_type: str, offloaded: bool = False) -> None:
    """Give the sharded, meta-device `model` real storage and rank 0's `source` weights (a collective).

    `buffers` are the model's own buffers from before `to_empty` (computed at construction, some not in any
    state dict). `offloaded`: the shards live on the CPU (FSDP2 CPU offload). The global RNG state is rank 0's
    afterwards, as if every rank had loaded the model itself.
    """
    on_gpu = device_type == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu and not offloaded else torch.device("cpu")
    model.to_empty(device=device)
    with torch.no_grad():
        for module, name, value in buffers:
            getattr(module, name).copy_(value)
    full = source.state_dict() if source is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full, source
    states = [torch.get_rng_state(), torch.cuda.get_rng_state() if on_gpu else None]
    dist.broadcast_object_list(states, src=0)
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1])


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-text token, else 0 (the dataset pads prompts the same way)."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    return 0


class FSDPWorker(Worker):
    """A worker holding FSDP2 models, configured by the `WorkerRunConfig` the driver filled in."""

    def __init__(self, config: WorkerRunConfig):
        super().__init__()
        self.config = config
        self.tokenizer = self.processor = None
        self.pad_token_id = 0
        self.memory = PhaseMemory(self.device)
        # transformers' processor classes (its processing and image modules, torchvision: seconds of imports) are
        # imported in the actor's constructor, which runs while the driver still sets up, not in `setup_process`
        # (init_model), which the driver waits for.
        importlib.import_module("transformers.models.auto.processing_auto")

    def setup_process(self, tokenizer_path: Optional[str] = None) -> None:
        """Join the process group, seed torch, silence download bars, load the tokenizer / processor (if asked)."""
        self.init_distributed()
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS=1 in actors it gives one CPU: on CPU each worker process takes its share
            # of the machine's cores instead (2 cores, 1 worker: 2 threads, as a plain torch program would).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.local_world_size))
        transformers.utils.logging.disable_progress_bar()
        torch.manual_seed(self.config.seed)
        if tokenizer_path is not None:
            self.tokenizer, self.processor = load_processor(tokenizer_path)
            self.pad_token_id = pad_token_id(self.tokenizer)

    def build_model(self, model_path: str, role: TrainedRoleConfig, trainable: bool, **options) -> nn.Module:
        """`build_fsdp_model` on this worker's device with the model, FSDP and padding-free settings of `role`
        (`options`: `head`, `adapter`)."""
        model = role.model
        # Ulysses attention is the varlen attention's (mtrl.models.ulysses), padded batches included.
        varlen = role.padding_free or self.config.worker.actor.ulysses_size > 1
        return build_fsdp_model(model_path, fsdp=role.fsdp, device_type=self.device.type, trainable=trainable,
                                gradient_checkpointing=model.enable_gradient_checkpointing,
                                freeze_vision_tower=model.freeze_vision_tower, padding_free=varlen,
                                attn_implementation=model.attn_implementation,
                                trust_remote_code=model.trust_remote_code, **options)
