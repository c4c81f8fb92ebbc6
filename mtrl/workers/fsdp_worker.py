"""What every FSDP2 worker (actor / reference / rollout, critic, reward model, preference) shares: the set-up of
its process (`FSDPWorker.setup_process`) and the one model builder (`build_fsdp_model`).

FSDP2 itself is applied in one place, `fsdp_utils.apply_fsdp2`, which the builder calls last.
"""

import os
from typing import Optional

import torch
import transformers
from torch import nn

from mtrl.config.worker import FSDPConfig, ModelConfig, TrainedRoleConfig, WorkerRunConfig
from mtrl.models import lora
from mtrl.models.attention import enable_padding_free_attention
from mtrl.models.dtypes import resolve_dtype
from mtrl.models.loader import decoder_layers, load_model, load_processor, load_reward_model, vision_tower
from mtrl.single_controller.base import Worker
from mtrl.workers.fsdp_utils import apply_fsdp2

# "lm": the language model; "value": a fresh scalar head (critic); "score": the folder's trained scalar head
# (reward model); "score_or_new": the folder's scalar head, or a fresh one when it has none (reward-model training).
MODEL_HEADS = ("lm", "value", "score", "score_or_new")


def build_fsdp_model(model_path: str, *, fsdp: FSDPConfig, device_type: str, trainable: bool, head: str = "lm",
                     dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                     freeze_vision_tower: bool = False, padding_free: bool = False,
                     adapter: Optional[ModelConfig] = None, attn_implementation: str = "sdpa",
                     trust_remote_code: bool = False) -> nn.Module:
    """Load a model, make its attention padding-free, add a LoRA adapter, freeze it unless `trainable`, shard it.

    Weights load in `dtype` (fp32: FSDP's mixed precision casts for compute). Gradient checkpointing and a
    frozen vision tower apply to trainable models only (a frozen model is frozen whole). `adapter`: the model
    config whose `peft_type` (lora / qlora) and `lora_*` keys add an adapter (mtrl.models.lora); QLoRA loads the
    base in 4 bit, in the FSDP compute dtype, and keeps the packed weights unsharded.
    """
    if head not in MODEL_HEADS:
        raise ValueError(f"head={head!r}; use one of {MODEL_HEADS}")
    peft = lora.peft_type(adapter) if adapter is not None else None
    options = dict(attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                   gradient_checkpointing=trainable and gradient_checkpointing,
                   freeze_vision_tower=trainable and freeze_vision_tower)
    if peft == "qlora":
        model = lora.load_quantized_model(model_path, compute_dtype=resolve_dtype(fsdp.mixed_precision_dtype),
                                          **options)
    elif head in ("score", "score_or_new"):
        model = load_reward_model(model_path, require_head=head == "score", dtype=dtype, **options)
    else:
        model = load_model(model_path, dtype=dtype, for_value=head == "value", **options)
    if padding_free:
        enable_padding_free_attention(model)
    if peft is not None:
        model = lora.apply_lora(model, adapter)
    if not trainable:
        model.requires_grad_(False)
    return apply_fsdp2(model, fsdp, device_type, decoder_layers(model), vision_tower(model),
                       ignored_params=lora.quantized_params(model))


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
