"""How the rollout engine gets the actor's weights: `RolloutWeightSync`.

Every training step the hybrid-engine worker pushes the current policy into its rollout engine; the
engine holds a plain (non-FSDP, non-peft) copy of the model, so the weights it receives are the full,
unsharded tensors under the base model's parameter names:

* no adapter: the gathered full state dict;
* LoRA: the gathered peft state dict with every adapter merged in (`lora.merge_lora_state_dict`);
* QLoRA: only the (small, unquantized) adapter weights are gathered and merged into a CPU copy of the
  base weights in the compute dtype, read once from `load_base()`.

The same weights are what the actor's Hugging Face export writes. They are handed out as an iterator of
(name, tensor) pairs, which `RolloutEngine.load_weights` consumes, so that a streamed sync (one tensor or
bucket at a time, as vLLM takes them) can replace today's gather-everything-then-yield without changing
the callers. Gathering is a collective: every rank must consume the iterator to the end.
"""

from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mtrl.config.worker import ModelConfig
from mtrl.models import lora
from mtrl.workers.rollout.base import RolloutEngine


def gather_full_state_dict(model: nn.Module, trainable_only: bool = False) -> Dict[str, torch.Tensor]:
    """The unsharded weights of an FSDP2 model on every rank (a collective); only trainable ones on request."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=False, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


class RolloutWeightSync:
    """The weights of `model` (the FSDP2 actor) as the rollout engine and the export need them.

    `adapter`: the actor's model config (its `peft_type`, `lora_alpha`, `lora_rank`); `load_base()` returns
    the plain base model (QLoRA only: the frozen base weights are not in the sharded model).
    """

    def __init__(self, model: nn.Module, adapter: ModelConfig, load_base: Optional[Callable[[], nn.Module]] = None):
        self.model = model
        self.kind = lora.peft_type(adapter)
        self.scaling = float(adapter.lora_alpha) / float(adapter.lora_rank) if self.kind else 1.0
        self.load_base = load_base
        self._base: Optional[Dict[str, torch.Tensor]] = None

    def weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, full tensor) pairs under the base model's names, LoRA merged in (a collective)."""
        if self.kind is None:
            merged = gather_full_state_dict(self.model)
        elif self.kind == "lora":
            merged = lora.merge_lora_state_dict(gather_full_state_dict(self.model), self.scaling)
        else:
            merged = lora.merge_lora_state_dict(gather_full_state_dict(self.model, trainable_only=True),
                                                self.scaling, base_state_dict=self._base_weights())
        yield from merged.items()

    def sync_to(self, engine: RolloutEngine) -> None:
        """Load the current weights into the rollout engine."""
        engine.load_weights(self.weights())

    def _base_weights(self) -> Dict[str, torch.Tensor]:
        if self._base is None:
            base_model = self.load_base()
            self._base = {k: v.detach().cpu() for k, v in base_model.state_dict().items()}
            del base_model
        return self._base
