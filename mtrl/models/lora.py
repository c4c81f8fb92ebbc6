"""LoRA and QLoRA for the actor, through peft.

Config (``worker.actor.model``): ``peft_type: lora | qlora``, ``lora_rank``, ``lora_alpha``,
``lora_dropout``, ``lora_target_modules``.

* :func:`apply_lora` wraps the loaded policy in a ``PeftModel`` before FSDP2 sharding; only the adapter
  weights train (the optimizer sees ``requires_grad`` parameters only).
* The reference policy is the same module with the adapter switched off (``PeftModel.disable_adapter()``),
  so no second copy of the weights is kept.
* The rollout engine holds a plain (non-peft) copy of the model (``worker.rollout.lora_sync=merged``; with
  ``adapter`` the vllm engine gets the base once and then the adapter's factors): the weight sync
  (``mtrl/workers/rollout/weight_sync.py``) merges ``W + (alpha / r) * B @ A`` one module at a time
  (:func:`merge_lora_weight`, the adapted modules found by :func:`lora_adapters`, names by :func:`base_name`);
  :func:`merge_lora_state_dict` does the same over a whole state dict, for export (``python -m mtrl.models.export``).
* QLoRA (:func:`load_quantized_model`) loads the base in 4 bit (bitsandbytes NF4, ``BitsAndBytesConfig``)
  and needs a CUDA GPU: :func:`check_peft_supported` stops a CPU run at start with a clear message.
  With QLoRA the packed 4-bit base weights are replicated on every rank instead of sharded
  (:func:`quantized_params`, FSDP2 ``ignored_params``), the frozen base is not checkpointed (it is the model
  at ``model_path``) and the rollout copy is the base in the compute dtype plus the merged adapter
  (``RolloutWeightSync``). The QLoRA path cannot run on this project's CPU CI and is untested there.
"""

import importlib.util
import re
from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from mtrl.utils.errors import UserError

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.(?P<adapter>[^.]+)\.weight$")
_UNSUPPORTED = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def peft_type(model_config) -> Optional[str]:
    return getattr(model_config, "peft_type", None) or None


def check_peft_supported(model_config, device_type: str) -> None:
    """Raise a :class:`UserError` when the configured adapter cannot run here (before anything starts)."""
    kind = peft_type(model_config)
    if kind is None:
        return
    if importlib.util.find_spec("peft") is None:
        raise UserError(f"worker.actor.model.peft_type={kind} needs the `peft` package: pip install peft")
    if model_config.lora_rank <= 0:
        raise UserError(f"worker.actor.model.lora_rank = {model_config.lora_rank} must be > 0.")
    if not list(model_config.lora_target_modules or []):
        raise UserError("worker.actor.model.lora_target_modules is empty: name the modules to adapt "
                        "(e.g. [q_proj, k_proj, v_proj, o_proj]).")
    if kind == "qlora":
        if device_type != "cuda" or not torch.cuda.is_available():
            raise UserError("worker.actor.model.peft_type=qlora loads the base model in 4 bit with bitsandbytes, "
                            "which needs a CUDA GPU; this run is on CPU (training.device="
                            f"{device_type}). Use peft_type=lora on CPU, or run on GPUs.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("worker.actor.model.peft_type=qlora needs the `bitsandbytes` package: "
                            "pip install 'mtrl[qlora]' (or pip install bitsandbytes)")


def lora_config(model_config, inference_mode: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=int(model_config.lora_rank), lora_alpha=model_config.lora_alpha,
                      lora_dropout=float(model_config.lora_dropout),
                      target_modules=list(model_config.lora_target_modules), bias="none",
                      inference_mode=inference_mode)


def apply_lora(model: nn.Module, model_config) -> nn.Module:
    """Wrap ``model`` in a peft ``PeftModel`` with the configured LoRA adapter (base weights frozen)."""
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(model, lora_config(model_config))
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise UserError(f"worker.actor.model.lora_target_modules = {list(model_config.lora_target_modules)}: "
                        f"{err}") from None
    return wrapped


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def lora_scaling(lora: Dict[str, Any]) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) from a LoraConfig dict or an MTRL checkpoint's lora entry."""
    rank = lora.get("r", lora.get("rank"))
    alpha = lora.get("lora_alpha", lora.get("alpha"))
    if lora.get("use_rslora"):
        return float(alpha) / float(rank) ** 0.5
    return float(alpha) / float(rank)


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def base_name(key: str) -> str:
    """The base model's name of a peft state-dict entry (``base_model.model.x.q_proj.base_layer.weight`` ->
    ``x.q_proj.weight``)."""
    return strip_peft_prefix(key).replace(".base_layer.", ".")


def lora_adapters(keys: Iterable[str]) -> Dict[str, Dict[str, str]]:
    """The adapted modules of a peft state dict: base module name -> ``{"A": key, "B": key}``."""
    adapters: Dict[str, Dict[str, str]] = {}
    for key in keys:
        if any(part in key for part in _UNSUPPORTED):
            raise NotImplementedError(f"merging {key!r}: only LoRA on linear layers is supported (no embedding "
                                      "adapters, no DoRA)")
        match = _LORA_KEY.match(key)
        if match:
            adapters.setdefault(strip_peft_prefix(match.group("module")), {})[match.group("which")] = key
    for module, pair in adapters.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA weights of {module} are incomplete: have {sorted(pair)}")
    return adapters


def merge_lora_weight(module: str, base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """``base + scaling * lora_B @ lora_A`` of one module, computed in fp32, in the base's dtype."""
    delta = lora_B.float() @ lora_A.float()
    if delta.shape != base.shape:
        raise ValueError(f"LoRA delta of {module} has shape {tuple(delta.shape)}, base {tuple(base.shape)}")
    return (base.float() + scaling * delta.to(base.device)).to(base.dtype)


def merge_lora_state_dict(state_dict: Dict[str, torch.Tensor], scaling: float,
                          base_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """A peft model's (full) state dict -> the merged weights under the base model's names.

    ``base_layer.weight + scaling * lora_B @ lora_A`` for every adapted linear layer (computed in fp32,
    cast back to the base dtype); other entries keep their values with the peft prefix removed. Frozen
    base weights missing from ``state_dict`` (QLoRA checkpoints) are taken from ``base_state_dict``
    (keyed by base names).
    """
    adapters = lora_adapters(state_dict)
    lora_keys = {key for pair in adapters.values() for key in pair.values()}
    merged: Dict[str, torch.Tensor] = dict(base_state_dict or {})
    merged.update((base_name(key), value) for key, value in state_dict.items() if key not in lora_keys)
    for module, pair in adapters.items():
        name = f"{module}.weight"
        if name not in merged:
            raise KeyError(f"no base weight {name!r} to merge the LoRA adapter into")
        merged[name] = merge_lora_weight(module, merged[name], state_dict[pair["A"]], state_dict[pair["B"]], scaling)
    return merged


def adapter_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Only the adapter weights, named as peft saves them (``...lora_A.weight``, adapter name removed)."""
    out = {}
    for key, value in state_dict.items():
        match = _LORA_KEY.match(key)
        if match:
            out[f"{match.group('module')}.lora_{match.group('which')}.weight"] = value
    return out


# ----------------------------------------------------------------------------- QLoRA


def load_quantized_model(model_path, *, compute_dtype: torch.dtype = torch.bfloat16,
                         attn_implementation: Optional[str] = "sdpa", trust_remote_code: bool = False,
                         gradient_checkpointing: bool = False, freeze_vision_tower: bool = False) -> nn.Module:
    """The base model in 4 bit (NF4 + double quantisation, bitsandbytes) for QLoRA, on this process's GPU.

    ``bnb_4bit_quant_storage`` is the compute dtype so that FSDP can shard the packed weights like the others.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from mtrl.models.loader import (_enable_activation_checkpointing, _from_pretrained, load_config,
                                    resolve_attn_implementation, resolve_model_path, vision_tower)

    if not torch.cuda.is_available():
        raise UserError("QLoRA (peft_type=qlora) needs a CUDA GPU.")
    path = resolve_model_path(model_path)
    config = load_config(path, trust_remote_code=trust_remote_code)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype,
                                      llm_int8_skip_modules=["visual", "vision_tower", "lm_head"])
    model = _from_pretrained(path, config, dtype=compute_dtype, quantization_config=quantization,
                             attn_implementation=resolve_attn_implementation(attn_implementation),
                             trust_remote_code=trust_remote_code, device_map={"": torch.cuda.current_device()})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        _enable_activation_checkpointing(model)
    if freeze_vision_tower and vision_tower(model) is not None:
        vision_tower(model).requires_grad_(False)
    return model


def quantized_params(model: nn.Module) -> set:
    """bitsandbytes' packed 4-bit parameters (QLoRA): FSDP2 cannot shard them together with their quantization
    state, so they stay replicated on every rank (small: 4 bit) and frozen; everything else is sharded."""
    return {p for p in model.parameters() if type(p).__name__ in ("Params4bit", "Int8Params")}

