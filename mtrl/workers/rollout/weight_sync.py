"""How the rollout engine gets the actor's weights: `RolloutWeightSync`.

Every training step the hybrid-engine worker pushes the current policy into its rollout engine; the
engine holds a plain (non-FSDP, non-peft) copy of the model, so the weights it receives are the full,
unsharded tensors under the base model's parameter names:

* no adapter: every entry of the state dict, gathered;
* LoRA: the same with every adapter merged into its base weight (`lora.merge_lora_weight`);
* QLoRA: only the (small, unquantized) adapter weights are gathered and merged into a CPU copy of the
  base weights in the compute dtype, read once from `load_base()`;
* LoRA with `worker.rollout.lora_sync=adapter` (the vllm engine's LoRA): the base weights once, at the
  first sync, then each step only the adapter's factors (`adapter_weights`, `RolloutEngine.load_adapter`).

The weights are streamed: one (name, full tensor) pair at a time, each gathered (`DTensor.full_tensor`)
when the consumer asks for it, cast to the rollout dtype before the gather. The extra memory of a sync is
then one tensor (for LoRA: one adapted weight and its two factors), not a second copy of the model.
Gathering is a collective: every rank must consume the iterator to the end, in the same order.
The same weights (in the actor's dtype) are what the actor's Hugging Face export writes.
"""

from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mtrl.config.worker import ModelConfig
from mtrl.models import lora
from mtrl.models.loader import vision_tower
from mtrl.utils.errors import UserError
from mtrl.workers.rollout.base import RolloutEngine


def full_tensor(tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The unsharded value of an FSDP2 shard (a collective), or the tensor itself; in `dtype` if given."""
    if dtype is not None:
        tensor = tensor.to(dtype)  # elementwise: casting the shards before the gather moves half the bytes
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class RolloutWeightSync:
    """The weights of `model` (the FSDP2 actor) as the rollout engine and the export need them.

    `adapter`: the actor's model config (its `peft_type`, `lora_alpha`, `lora_rank`); `load_base()` returns
    the plain base model (QLoRA only: the frozen base weights are not in the sharded model). `dtype`: the
    rollout engine's parameter dtype, what `sync_to` sends. `lora_sync`: `worker.rollout.lora_sync`.
    """

    def __init__(self, model: nn.Module, adapter: ModelConfig, load_base: Optional[Callable[[], nn.Module]] = None,
                 dtype: Optional[torch.dtype] = None, lora_sync: str = "merged"):
        self.model = model
        self.kind = lora.peft_type(adapter)
        self.scaling = float(adapter.lora_alpha) / float(adapter.lora_rank) if self.kind else 1.0
        self.load_base = load_base
        self.dtype = dtype
        self._base: Optional[Dict[str, torch.Tensor]] = None
        self.sends_adapter = self.kind == "lora" and lora_sync == "adapter"
        # peft's adapter_config.json of the adapter (what vLLM reads next to the tensors).
        self.adapter_config = {"peft_type": "LORA", "r": int(adapter.lora_rank), "lora_alpha": adapter.lora_alpha,
                               "target_modules": list(adapter.lora_target_modules or []), "bias": "none"}
        self._base_sent = False
        if self.sends_adapter:
            _check_adapter_outside_vision_tower(model)

    def weights(self, dtype: Optional[torch.dtype] = None,
                merge_lora: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, full tensor) pairs under the base model's names, LoRA merged in (`merge_lora=False`: the base
        weights alone), in `dtype` (None: as the model holds them), one tensor gathered at a time (a collective)."""
        state = self.model.state_dict()  # the shards themselves: no copy, no communication
        adapters = lora.lora_adapters(state) if self.kind else {}
        if self.kind == "qlora":  # the base weights are not in the sharded model
            entries = self._base_weights().items()
        else:
            lora_keys = {key for pair in adapters.values() for key in pair.values()}
            entries = ((key, value) for key, value in state.items() if key not in lora_keys)
        for key, value in entries:
            name = lora.base_name(key)
            module, _, leaf = name.rpartition(".")
            pair = adapters.get(module) if leaf == "weight" and merge_lora else None
            if pair is None:
                yield name, full_tensor(value, dtype)
                continue
            merged = lora.merge_lora_weight(module, full_tensor(value), full_tensor(state[pair["A"]]),
                                            full_tensor(state[pair["B"]]), self.scaling)
            yield name, merged if dtype is None else merged.to(dtype)

    def adapter_weights(self, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """The LoRA factors, gathered (a collective), in `dtype`, under the names peft saves them with
        (`base_model.model.<module>.lora_A.weight`)."""
        state = self.model.state_dict()
        return {f"{lora.PEFT_PREFIX}{module}.lora_{which}.weight": full_tensor(state[key], dtype)
                for module, pair in lora.lora_adapters(state).items() for which, key in sorted(pair.items())}

    def sync_to(self, engine: RolloutEngine) -> None:
        """Load the current weights into the rollout engine, in its dtype (with `lora_sync=adapter`: the
        base weights at the first sync only, and the adapter)."""
        if not self.sends_adapter:
            engine.load_weights(self.weights(self.dtype))
            return
        if not self._base_sent:  # frozen under LoRA: the engine keeps them
            engine.load_weights(self.weights(self.dtype, merge_lora=False))
            self._base_sent = True
        engine.load_adapter(self.adapter_weights(self.dtype), self.adapter_config)

    def _base_weights(self) -> Dict[str, torch.Tensor]:
        if self._base is None:
            base_model = self.load_base()
            self._base = {k: v.detach().cpu() for k, v in base_model.state_dict().items()}
            del base_model
        return self._base


def _check_adapter_outside_vision_tower(model: nn.Module) -> None:
    """vLLM's LoRA serves language-model modules only here: its tower LoRA (`enable_tower_connector_lora`) is
    experimental and off, and vLLM 0.32 then loads an adapter with vision-tower factors without an error and
    without applying them. Stop at start-up rather than serve a policy without the vision tower's adapter."""
    tower = vision_tower(model)
    if tower is None:
        return
    prefix = next(lora.strip_peft_prefix(name) for name, module in model.named_modules() if module is tower) + "."
    inside = sorted(m for m in lora.lora_adapters(model.state_dict()) if m.startswith(prefix))
    if inside:
        raise UserError(f"worker.rollout.lora_sync=adapter: the LoRA adapter covers {len(inside)} vision-tower "
                        f"modules ({inside[0]}, ...) and vLLM's LoRA serves language-model modules only; use "
                        f"worker.rollout.lora_sync=merged, or worker.actor.model.lora_target_modules that name "
                        f"language-model modules only")
