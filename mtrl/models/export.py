"""Export MTRL checkpoints as Hugging Face folders that ``transformers`` (or ``peft``) loads directly.

    python -m mtrl.models.export --checkpoint-dir checkpoints/p/e/global_step_100            # one checkpoint
    python -m mtrl.models.export --checkpoint-dir checkpoints/p/e --out exports/e              # every checkpoint
    python -m mtrl.models.export --checkpoint-dir .../global_step_100 --no-merge-lora          # LoRA adapter

``--checkpoint-dir`` is one ``global_step_N`` folder or a run folder holding several; for a run folder
every checkpoint not yet exported is exported (existing exports are skipped unless ``--force``).
Output: ``--out`` (for a run folder: ``OUT/global_step_N``); by default ``global_step_N/hf_model``
(full or LoRA-merged weights) or ``global_step_N/hf_adapter`` (``--no-merge-lora``).

A full / merged export holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (sharded
with an index for large models), the tokenizer / processor files and chat template, and
``mtrl_export.json`` (where it came from). An adapter export holds ``adapter_config.json`` (with
``base_model_name_or_path`` = the run's model path) and ``adapter_model.safetensors``, plus the
tokenizer / processor: ``PeftModel.from_pretrained(base_model, folder)`` loads it.

Runs on a plain CPU machine: the sharded torch.distributed.checkpoint weights are read in this process
without Ray or a process group (:func:`mtrl.utils.checkpoint.load_model_state_dict`). The weights are
loaded into the transformers model class built from the saved config on the meta device (no random
initialisation, no second copy) and written with ``save_pretrained``, so the files have the names and
layout ``from_pretrained`` expects. Every export is written to ``OUT.partial`` and renamed when complete.
"""

import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

import torch

from mtrl.models import lora as lora_utils
from mtrl.models.dtypes import ALIASES, DTYPES, resolve_dtype
from mtrl.utils import checkpoint as ckpt
from mtrl.utils.errors import UserError
from mtrl.utils.logger import get_logger

logger = get_logger(__name__)

EXPORT_META = "mtrl_export.json"
# Files of the checkpoint's huggingface/ folder that the export writes itself.
_OWN_FILES = {"config.json", "adapter_config.json", "generation_config.json"}


def checkpoints_in(path: str) -> List[str]:
    """``[path]`` for a checkpoint folder, the complete checkpoints (oldest first) for a run folder."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise UserError(f"--checkpoint-dir {path}: no such folder.")
    if ckpt.is_complete_checkpoint(path):
        return [path]
    found = ckpt.list_checkpoints(path)
    if not found:
        if ckpt.checkpoint_step(path) is not None:
            raise UserError(f"{path} is an incomplete checkpoint (no {ckpt.META_FILE}; the save was interrupted).")
        raise UserError(f"{path} holds no MTRL checkpoint (global_step_N folders with {ckpt.META_FILE}).")
    return found


def _resolve_dtype(name: str, config) -> torch.dtype:
    if name != "auto":
        return resolve_dtype(name)
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    text_config = getattr(config, "text_config", None)
    if saved is None and text_config is not None:
        saved = getattr(text_config, "dtype", None)
    try:
        return resolve_dtype(saved) if saved else torch.float32
    except ValueError:  # a dtype name this map does not know: export in full precision
        return torch.float32


def _copy_processor_files(src: str, dst: str) -> None:
    for name in os.listdir(src):
        full = os.path.join(src, name)
        if name not in _OWN_FILES and os.path.isfile(full):
            shutil.copy2(full, os.path.join(dst, name))


def _model_class(config):
    import transformers

    from mtrl.models.loader import is_vision_model

    if is_vision_model(config):
        mapping = transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        if config.model_type in mapping:
            return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def build_model(config, state_dict: Dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """The transformers model of ``config`` holding ``state_dict`` (names as in the training model)."""
    cls = _model_class(config)
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype)
    expected = set(model.state_dict())
    tied = {k for k in expected - set(state_dict) if k.endswith("lm_head.weight")}
    missing = expected - set(state_dict) - tied
    unexpected = set(state_dict) - expected
    if missing or unexpected:
        raise ValueError(f"the checkpoint's weights do not fit {cls.__name__}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(weights, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "text_config", None),
                                                                  "tie_word_embeddings", False):
        model.tie_weights()
    # Buffers that are not in the state dict (rotary frequencies) stay on the meta device; they are not saved.
    model.config.dtype = dtype
    return model


def _base_weights_for_qlora(meta: dict, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    from mtrl.models.loader import load_model

    base = meta["actor"]["model_path"]
    logger.info("export: QLoRA checkpoint; reading the frozen base weights from %s", base)
    return {k: v.detach() for k, v in load_model(base, dtype=dtype).state_dict().items()}


def default_output(checkpoint_dir: str, adapter: bool) -> str:
    return os.path.join(checkpoint_dir, "hf_adapter" if adapter else "hf_model")


def export_checkpoint(checkpoint_dir: str, out: Optional[str] = None, merge_lora: bool = True,
                      dtype: str = "auto", force: bool = False) -> Optional[str]:
    """Export one ``global_step_N`` folder; returns the output folder, or None when it already existed."""
    from transformers import AutoConfig

    checkpoint_dir = os.path.abspath(checkpoint_dir)
    meta = ckpt.read_meta(checkpoint_dir)
    actor_meta = meta.get("actor") or {}
    peft_type = actor_meta.get("peft_type")
    adapter_only = bool(peft_type) and not merge_lora
    out = os.path.abspath(out or default_output(checkpoint_dir, adapter_only))
    if os.path.exists(out):
        if not force:
            return None
        shutil.rmtree(out)
    role_dir = os.path.join(checkpoint_dir, "actor")
    hf_src = os.path.join(role_dir, ckpt.HF_DIR)
    if not os.path.isfile(os.path.join(hf_src, "config.json")):
        raise UserError(f"{hf_src}/config.json is missing: the checkpoint was written without its Hugging Face "
                        "config, so it cannot be exported.")
    start = time.perf_counter()
    state_dict = ckpt.load_model_state_dict(role_dir)
    partial = out + ckpt.PARTIAL_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    info = {"source": checkpoint_dir, "global_step": meta.get("global_step"), "peft_type": peft_type}
    if adapter_only:
        _write_adapter(state_dict, hf_src, partial, actor_meta)
        info.update(kind="lora_adapter")
    else:
        config = AutoConfig.from_pretrained(hf_src)
        target = _resolve_dtype(dtype, config)
        if peft_type:
            adapter_config = _adapter_config(hf_src)
            base = None if actor_meta.get("frozen_params_saved", True) else _base_weights_for_qlora(meta, target)
            state_dict = lora_utils.merge_lora_state_dict(state_dict, lora_utils.lora_scaling(adapter_config), base)
        model = build_model(config, state_dict, target)
        model.save_pretrained(partial)
        info.update(kind="lora_merged" if peft_type else "full", dtype=str(target).replace("torch.", ""))
    _copy_processor_files(hf_src, partial)
    if not adapter_only and os.path.isfile(os.path.join(hf_src, "generation_config.json")):
        shutil.copy2(os.path.join(hf_src, "generation_config.json"), os.path.join(partial, "generation_config.json"))
    with open(os.path.join(partial, EXPORT_META), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(partial, out)
    print(f"[mtrl.export] {checkpoint_dir} -> {out} ({info['kind']}, {time.perf_counter() - start:.1f}s)")
    return out


def _adapter_config(hf_src: str) -> dict:
    path = os.path.join(hf_src, "adapter_config.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: the LoRA checkpoint was written without its adapter config.")
    with open(path) as f:
        return json.load(f)


def _write_adapter(state_dict: Dict[str, torch.Tensor], hf_src: str, out: str, actor_meta: dict) -> None:
    from safetensors.torch import save_file

    adapter = lora_utils.adapter_state_dict(state_dict)
    if not adapter:
        raise UserError("the checkpoint has no LoRA weights to export as an adapter")
    save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(out, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = _adapter_config(hf_src)
    config["base_model_name_or_path"] = actor_meta.get("model_path") or config.get("base_model_name_or_path")
    config["inference_mode"] = True
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export(checkpoint_dir: str, out: Optional[str] = None, merge_lora: bool = True, dtype: str = "auto",
           force: bool = False) -> List[str]:
    """Export one checkpoint or every not-yet-exported checkpoint of a run folder; returns the new exports."""
    found = checkpoints_in(checkpoint_dir)
    single = len(found) == 1 and ckpt.is_complete_checkpoint(os.path.abspath(checkpoint_dir))
    written = []
    for path in found:
        target = out if (single or out is None) else os.path.join(out, os.path.basename(path))
        result = export_checkpoint(path, target, merge_lora=merge_lora, dtype=dtype, force=force)
        if result is None:
            print(f"[mtrl.export] {path}: already exported, skipped (--force to redo)")
        else:
            written.append(result)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtrl.models.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", required=True,
                        help="a global_step_N checkpoint, or a run folder (exports every checkpoint in it)")
    parser.add_argument("--out", help="output folder (for a run folder: the parent of one folder per checkpoint)")
    merge = parser.add_mutually_exclusive_group()
    merge.add_argument("--merge-lora", dest="merge_lora", action="store_true", default=True,
                       help="LoRA runs: write the base weights with the adapter merged in (default)")
    merge.add_argument("--no-merge-lora", dest="merge_lora", action="store_false",
                       help="LoRA runs: write the adapter only, as a peft adapter folder")
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted([*DTYPES, *ALIASES])],
                        help="weight dtype of a full / merged export (auto: the model config's dtype)")
    parser.add_argument("--force", action="store_true", help="re-export checkpoints that were exported already")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint_dir, args.out, merge_lora=args.merge_lora, dtype=args.dtype, force=args.force)
    except UserError as e:
        print(f"mtrl.export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
