"""Models: loading checkpoints and processors, tiny random models, attention/packing glue.

* :mod:`mtrl.models.loader` -- ``load_model``, ``load_reward_model``, ``load_processor``, ``vision_tower``,
  ``decoder_layers``, ...
* :mod:`mtrl.models.dtypes` -- ``DTYPES`` / ``resolve_dtype``: the one map from dtype names to torch dtypes.
* :mod:`mtrl.models.lora` -- LoRA / QLoRA adapters and merging; :mod:`mtrl.models.export` -- Hugging Face
  folders from checkpoints.
* :mod:`mtrl.models.tiny` -- ``build_tiny_model`` / ``ensure_tiny_model`` / ``python -m mtrl.models.tiny``.
* :mod:`mtrl.models.attention`, :mod:`mtrl.models.packing`, :mod:`mtrl.models.multimodal` -- padding-free
  attention, packed forward passes and vision-input batching.

The loader and tiny-model APIs are re-exported here. transformers itself is imported lazily (on the
first load/build), so importing this package stays cheap.
"""

from mtrl.models.loader import (
    ValueHeadModel,
    decoder_layers,
    is_vision_model,
    language_model,
    load_config,
    load_model,
    load_processor,
    resolve_model_path,
    vision_blocks,
    vision_tower,
)

# The tiny-model builder is exported lazily: importing it here would make `python -m mtrl.models.tiny`
# find the module already imported (runpy's RuntimeWarning).
_TINY_EXPORTS = {"TINY_ARCHS": "ARCHS", "build_tiny_model": "build_tiny_model",
                 "ensure_tiny_model": "ensure_tiny_model", "make_tiny_model": "make_tiny_model"}


def __getattr__(name):
    if name in _TINY_EXPORTS:
        from mtrl.models import tiny  # noqa: PLC0415

        return getattr(tiny, _TINY_EXPORTS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TINY_ARCHS",
    "ValueHeadModel",
    "build_tiny_model",
    "decoder_layers",
    "ensure_tiny_model",
    "is_vision_model",
    "language_model",
    "load_config",
    "load_model",
    "load_processor",
    "make_tiny_model",
    "resolve_model_path",
    "vision_blocks",
    "vision_tower",
]
