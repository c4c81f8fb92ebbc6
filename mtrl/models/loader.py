"""Load local Hugging Face checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, text causal LMs) and their processors.

Everything that touches ``from_pretrained`` lives here, so the workers ask for "the policy", "the
critic" or "the tokenizer + processor" without knowing transformers' class zoo:

* :func:`load_model` -- ``AutoModelForImageTextToText`` for configs with a ``vision_config``,
  ``AutoModelForCausalLM`` otherwise; ``for_value=True`` gives a :class:`ValueHeadModel` (the model
  without its LM head + a linear value head) for the PPO critic.
* :func:`load_reward_model` -- a :class:`ValueHeadModel` with the folder's trained ``score`` head.
* :func:`load_processor` -- ``(tokenizer, processor or None)``.
* :func:`vision_tower`, :func:`vision_blocks`, :func:`decoder_layers`, :func:`language_model` --
  the sub-modules FSDP wraps separately (they also see through PEFT and the value-head wrapper).
* :func:`is_vision_model`, :func:`resolve_model_path`, :func:`resolve_attn_implementation`.

Paths: a local folder (``config.json`` + weights), or a Hub repository id that is already in the
local Hugging Face cache (``huggingface-cli download Qwen/Qwen2-VL-2B-Instruct``). Nothing is ever
downloaded here: a missing path is a :class:`~mtrl.utils.errors.UserError` that names it and says
how to get a model (including ``python -m mtrl.models.tiny`` for a tiny random one).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from mtrl.models.dtypes import resolve_dtype
from mtrl.utils.errors import UserError
from mtrl.utils.hub import cached_snapshot
from mtrl.utils.logger import get_logger

logger = get_logger(__name__)

__all__ = [
    "ValueHeadModel",
    "ValueHeadOutput",
    "decoder_layers",
    "is_vision_model",
    "language_model",
    "load_config",
    "load_model",
    "load_processor",
    "load_reward_model",
    "read_score_head",
    "resolve_attn_implementation",
    "resolve_model_path",
    "vision_blocks",
    "vision_tower",
]

# Files that make a folder loadable by the Auto classes.
_MODEL_FILES = ("config.json",)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")

_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}

# ---------------------------------------------------------------------------------------------
# Paths, configs, options
# ---------------------------------------------------------------------------------------------


def _how_to_get_a_model(path: str) -> str:
    return (
        "Point model_path at a local Hugging Face folder (config.json + *.safetensors + tokenizer files), "
        "download one with `huggingface-cli download <org>/<name> --local-dir DIR`, "
        f"or build a tiny random model with `python -m mtrl.models.tiny --arch qwen2_vl --out {path}` "
        "(or set worker.actor.model.build_tiny_if_missing: qwen2_vl)."
    )


def resolve_model_path(model_path: Union[str, os.PathLike, None], kind: str = "model") -> str:
    """Return a local folder for ``model_path`` or raise a :class:`UserError` saying what to do.

    ``kind`` is ``"model"`` (needs ``config.json``) or ``"tokenizer"`` (needs tokenizer or processor
    files). A non-existent path that looks like ``org/name`` is looked up in the local HF cache.
    """
    if model_path is None or str(model_path).strip() == "":
        raise UserError(f"No {kind} path was given. " + _how_to_get_a_model("outputs/tiny_qwen2_vl"))
    path = Path(os.path.expanduser(str(model_path)))
    if not path.exists():
        snapshot = cached_snapshot(str(model_path))
        if snapshot is None:
            raise UserError(f"{kind.capitalize()} path '{model_path}' does not exist. "
                            + _how_to_get_a_model(str(model_path)))
        path = Path(snapshot)
    if not path.is_dir():
        raise UserError(f"{kind.capitalize()} path '{model_path}' is a file, not a folder: pass the Hugging Face "
                        f"model folder that contains it (e.g. '{path.parent}').")
    wanted = _MODEL_FILES if kind == "model" else _TOKENIZER_FILES + _PROCESSOR_FILES
    if not any((path / name).is_file() for name in wanted):
        raise UserError(f"'{model_path}' is not a Hugging Face {kind} folder: none of {', '.join(wanted)} is in it. "
                        + _how_to_get_a_model(str(model_path)))
    return str(path)


def load_config(model_path, trust_remote_code: bool = False):
    """The transformers config of ``model_path`` (a clear error for a missing / non-HF folder)."""
    from transformers import AutoConfig  # noqa: PLC0415

    return AutoConfig.from_pretrained(resolve_model_path(model_path), trust_remote_code=trust_remote_code)


def is_vision_model(config_or_model: Any) -> bool:
    """True for vision-language configs (they carry a ``vision_config``); accepts a model too."""
    config = getattr(config_or_model, "config", config_or_model)
    return getattr(config, "vision_config", None) is not None


def resolve_attn_implementation(name: Optional[str]) -> str:
    """Validate an attention implementation name before loading (``None`` means ``sdpa``).

    ``flash_attention_2`` / ``_3`` need their package; without it this is a :class:`UserError` instead of
    transformers' error deep inside loading. MTRL's varlen implementations (``mtrl_varlen*``) are
    registered with transformers on demand. Other names (``sdpa``, ``eager``, ``flex_attention``, ...)
    are passed through.
    """
    name = name or "sdpa"
    package = _FLASH_PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(
            f"attn_implementation='{name}' needs the `{package}` package, which is not installed. "
            "Install it with `pip install mtrl[flash]` (CUDA only), or use attn_implementation='sdpa'.")
    if name.startswith("mtrl_varlen"):
        from mtrl.models.attention import register_varlen_attention  # noqa: PLC0415

        register_varlen_attention()
    return name


# ---------------------------------------------------------------------------------------------
# Sub-module access (FSDP wrapping, freezing)
# ---------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """See through PEFT (``PeftModel.get_base_model()``); FSDP2 keeps the module tree as it is."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _get_path(module: nn.Module, dotted: str) -> Optional[nn.Module]:
    for name in dotted.split(".") if dotted else []:
        module = getattr(module, name, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


# Where the vision encoder sits: transformers 5 Qwen-VL models keep it at `model.visual`
# (`XForConditionalGeneration.model` is the `XModel` holding `visual` + `language_model`).
_VISION_PATHS = ("model.visual", "visual", "model.vision_tower", "vision_tower", "model.vision_model", "vision_model")
# Where the decoder stack (with `.layers`) sits: VL models, causal LMs, bare backbones.
_LANGUAGE_MODEL_PATHS = ("model.language_model", "language_model", "model", "")


def vision_tower(model: nn.Module) -> Optional[nn.Module]:
    """The vision encoder (incl. its patch merger / projector) of a VL model, or None for text models.

    Works for ``*ForConditionalGeneration``, bare ``*Model`` backbones, :class:`ValueHeadModel` and PEFT
    wrappers. FSDP wraps it as its own unit (see ``mtrl.workers.fsdp_utils.apply_fsdp2``).
    """
    inner = _unwrap(model)
    for path in _VISION_PATHS:
        found = _get_path(inner, path)
        if found is not None:
            return found
    return None


def vision_blocks(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks of the vision encoder (empty for text models), for per-block FSDP units."""
    tower = vision_tower(model)
    blocks = getattr(tower, "blocks", None) if tower is not None else None
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def language_model(model: nn.Module) -> nn.Module:
    """The text decoder stack (the module holding ``embed_tokens`` and ``layers``)."""
    inner = _unwrap(model)
    for path in _LANGUAGE_MODEL_PATHS:
        found = _get_path(inner, path) if path else inner
        if found is not None and isinstance(getattr(found, "layers", None), nn.ModuleList):
            return found
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: looked for .layers under "
                     f"{', '.join(p or '<root>' for p in _LANGUAGE_MODEL_PATHS)}")


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The text transformer blocks, in order (one FSDP2 unit each)."""
    return list(language_model(model).layers)


# ---------------------------------------------------------------------------------------------
# Value-head model (PPO critic)
# ---------------------------------------------------------------------------------------------


@dataclass
class ValueHeadOutput:
    """``values`` (B, L, 1) in the value head's dtype; ``logits`` is the same tensor, so code written for
    ``*ForTokenClassification(num_labels=1)`` (verl's critic) works unchanged."""

    values: torch.Tensor
    logits: torch.Tensor


class ValueHeadModel(nn.Module):
    """A backbone (the LM without its vocabulary head) plus ``score = nn.Linear(hidden, 1)``.

    Used for the critic of every architecture, rather than ``AutoModelForTokenClassification``: VL models
    have no token-classification class, the text ones add dropout (0.1 by default) to the critic, and
    the head here is initialised from a fixed seed so every rank and run starts from the same critic.
    The parameter names (``model.*``, ``score.weight``, ``score.bias``) match
    ``Qwen2ForTokenClassification``.

    ``forward`` takes what the backbone takes (``input_ids``, ``attention_mask``, ``position_ids``,
    ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, varlen attention kwargs, ...) and
    returns a :class:`ValueHeadOutput` with one value per position.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, head_seed: int = 0, init_std: float = 0.02):
        super().__init__()
        self.model = backbone
        self.score = nn.Linear(hidden_size, 1, dtype=next(backbone.parameters()).dtype)
        generator = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            weight = torch.randn(self.score.weight.shape, generator=generator, dtype=torch.float32) * init_std
            self.score.weight.copy_(weight)
            self.score.bias.zero_()

    @property
    def config(self):
        return self.model.config

    def set_attn_implementation(self, attn_implementation) -> None:
        self.model.set_attn_implementation(attn_implementation)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None) -> None:
        _enable_activation_checkpointing(self.model, **(activation_checkpointing_kwargs or {}))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs) -> ValueHeadOutput:
        # LM-only arguments that callers may pass out of habit.
        for key in ("logits_to_keep", "labels", "return_dict"):
            kwargs.pop(key, None)
        kwargs.setdefault("use_cache", False)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         return_dict=True, **kwargs)
        hidden = out.last_hidden_state
        # nn.Linear on a 3-D input returns a view of its 2-D result; FSDP2 hooks the root module's outputs
        # for backward, and an in-place op on a view output would silently skip that hook (torch warns).
        values = self.score(hidden.to(self.score.weight.dtype)).clone()
        return ValueHeadOutput(values=values, logits=values)


def _hidden_size(config) -> int:
    text_config = getattr(config, "text_config", None) or config
    return int(text_config.hidden_size)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _enable_activation_checkpointing(model: nn.Module, **kwargs) -> None:
    # Non-reentrant checkpointing: needed with FSDP2 and when the inputs need no grad (frozen
    # embeddings / vision tower). Recent transformers 5.x renamed the method; the old name warns.
    kwargs = {"use_reentrant": False, **kwargs}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _from_pretrained(path: str, config, empty: bool = False, **kwargs) -> nn.Module:
    """``AutoModelForImageTextToText`` for VL configs, ``AutoModelForCausalLM`` otherwise.

    A VL config that transformers does not map to an image-text-to-text class (some remote-code
    models register only a causal-LM class) falls back to ``AutoModelForCausalLM``. ``empty``: build the
    architecture from the config instead (see :func:`load_model`).
    """
    import transformers  # noqa: PLC0415

    def build(cls) -> nn.Module:
        return _empty_model(cls, path, config, **kwargs) if empty else cls.from_pretrained(path, config=config, **kwargs)

    if is_vision_model(config):
        try:
            return build(transformers.AutoModelForImageTextToText)
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err):
                raise
            logger.info("%s has no image-text-to-text class; loading it with AutoModelForCausalLM", path)
    return build(transformers.AutoModelForCausalLM)


def _empty_model(cls, path: str, config, **kwargs) -> nn.Module:
    """``cls`` built from ``config`` with its parameters on the meta device and its buffers real.

    Buffers are few and small, and some are not in the checkpoint (the rotary ``inv_freq``, computed at
    construction): built on the CPU they are right from the start. What ``from_pretrained`` adds to the
    bare architecture is added here too: tied embeddings and the folder's generation config.
    """
    from accelerate import init_empty_weights  # noqa: PLC0415
    from transformers import GenerationConfig  # noqa: PLC0415

    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, **kwargs)
    model.tie_weights()
    if model.can_generate() and (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def load_model(
    model_path,
    *,
    dtype: Union[torch.dtype, str] = torch.float32,
    attn_implementation: Optional[str] = "sdpa",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    freeze_vision_tower: bool = False,
    for_value: bool = False,
    empty: bool = False,
) -> nn.Module:
    """Load a local checkpoint on CPU (move / shard it afterwards).

    Args:
        model_path: local HF folder, or a Hub id already in the local HF cache.
        dtype: parameter dtype (``torch.float32`` by default; FSDP mixed precision casts for compute).
            Strings ``"bf16"``, ``"fp16"``, ``"fp32"`` are accepted too.
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, ``"flash_attention_2"`` (needs
            ``pip install mtrl[flash]``), or an MTRL varlen name (see :mod:`mtrl.models.attention`).
        trust_remote_code: passed to transformers (custom model code in the folder).
        gradient_checkpointing: enable non-reentrant activation checkpointing.
        freeze_vision_tower: ``requires_grad=False`` for the whole vision encoder incl. its merger.
        for_value: return a :class:`ValueHeadModel` (critic) instead of the LM.
        empty: read no weights: the parameters are on the meta device (no memory), the buffers real, for
            sharded loading (``mtrl.workers.fsdp_worker.build_fsdp_model``) and the rollout copy, whose
            weights come from elsewhere. The value head of ``for_value`` is real (tiny).

    Returns:
        ``*ForConditionalGeneration`` (VL), ``*ForCausalLM`` (text) or :class:`ValueHeadModel`, in eval mode
        as ``from_pretrained`` leaves it (Qwen models have no dropout; call ``.train()`` for models that do).
    """
    path = resolve_model_path(model_path)
    config = load_config(path, trust_remote_code=trust_remote_code)
    kwargs = dict(dtype=resolve_dtype(dtype), attn_implementation=resolve_attn_implementation(attn_implementation),
                  trust_remote_code=trust_remote_code)
    model = _from_pretrained(path, config, empty=empty, **kwargs)
    if for_value:
        # The LM minus its vocabulary head: `.model` of *ForCausalLM / *ForConditionalGeneration.
        backbone = model.model
        model = ValueHeadModel(backbone, _hidden_size(config))

    if gradient_checkpointing:
        _enable_activation_checkpointing(model)
    if freeze_vision_tower:
        tower = vision_tower(model)
        if tower is None:
            logger.warning("freeze_vision_tower=True ignored: %s has no vision tower", path)
        else:
            tower.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# Scalar-head models (reward models, mtrl/workers/reward/model.py)
# ---------------------------------------------------------------------------------------------

SCORE_HEAD_KEYS = ("score.weight", "score.bias")


def read_score_head(path: str) -> Optional[Dict[str, torch.Tensor]]:
    """``score.weight`` (and ``score.bias`` when present) from the safetensors files of a folder, or None."""
    from safetensors import safe_open  # noqa: PLC0415

    found: Dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            for key in SCORE_HEAD_KEYS:
                if key in f.keys():
                    found[key] = f.get_tensor(key)
    return found if "score.weight" in found else None


def load_reward_model(model_path: str, *, require_head: bool = True, **load_kwargs: Any) -> ValueHeadModel:
    """A :class:`ValueHeadModel` with the trained head of `model_path` (`require_head=False`: a fresh, seeded
    head when the folder has none, to start reward-model training from a policy)."""
    import transformers  # noqa: PLC0415

    path = resolve_model_path(model_path)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # the head's keys are "unexpected" for the language model
    try:
        model = load_model(path, for_value=True, **load_kwargs)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    head = read_score_head(path)
    if head is None:
        if require_head:
            raise UserError(f"'{model_path}' has no reward head (no `score.weight` in its safetensors files): train "
                            f"one with a reward_model stage (training.mode=reward_model) or point "
                            f"worker.reward.reward_model_path at such a folder.")
        return model
    with torch.no_grad():
        weight = head["score.weight"].reshape(model.score.weight.shape)
        model.score.weight.copy_(weight.to(model.score.weight.dtype))
        model.score.bias.copy_(head.get("score.bias", torch.zeros(1)).reshape(1).to(model.score.bias.dtype))
    return model


def _has_any(path: str, names) -> bool:
    return any((Path(path) / name).is_file() for name in names)


def load_processor(
    model_path,
    *,
    trust_remote_code: bool = False,
    min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
) -> Tuple[Any, Optional[Any]]:
    """``(tokenizer, processor)`` of a model or tokenizer folder; ``processor`` is None for text models.

    For VL folders the tokenizer is ``processor.tokenizer`` (one object). A missing pad token is set to
    the eos token. ``min_pixels`` / ``max_pixels`` override the image processor's resize bounds (total
    pixels per image, as ``dataset.min_pixels`` / ``max_pixels``).
    """
    from transformers import AutoProcessor, AutoTokenizer, ProcessorMixin  # noqa: PLC0415

    path = resolve_model_path(model_path, kind="tokenizer")
    processor = None
    if _has_any(path, _PROCESSOR_FILES):
        loaded = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        # For a text model AutoProcessor may hand back the tokenizer itself: that is "no processor".
        if isinstance(loaded, ProcessorMixin) and getattr(loaded, "image_processor", None) is not None:
            processor = loaded
    tokenizer = processor.tokenizer if processor is not None else \
        AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if processor is not None and (min_pixels is not None or max_pixels is not None):
        _set_pixel_bounds(processor.image_processor, min_pixels, max_pixels)
    return tokenizer, processor


def _set_pixel_bounds(image_processor, min_pixels: Optional[int], max_pixels: Optional[int]) -> None:
    """Qwen-VL image processors resize to ``size = {shortest_edge: min_pixels, longest_edge: max_pixels}``
    (total pixels, despite the names); older ones also read ``min_pixels`` / ``max_pixels`` attributes."""
    size = dict(getattr(image_processor, "size", None) or {})
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
        if hasattr(image_processor, "min_pixels"):
            image_processor.min_pixels = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
        if hasattr(image_processor, "max_pixels"):
            image_processor.max_pixels = int(max_pixels)
    image_processor.size = size
