"""Write an FSDP2-sharded model as a Hugging Face folder (the end of a training stage).

The full state dict is gathered (rank 0 holds it, on the CPU), written with
`huggingface_hub.save_torch_state_dict` (safetensors, sharded above 5 GB, shared tensors de-duplicated),
and every non-weight file of the model folder the run started from (config.json, generation config,
tokenizer / processor files, chat template) is copied beside it. The folder is written under a
temporary name and renamed at the end, so a crash never leaves a half-written export that a later
stage would load. All ranks must call `save_hf_folder` (the gather is a collective).

Parameter names are the module names of the loaded transformers model, which `from_pretrained` of
the same transformers major version reads directly. A `ValueHeadModel` (reward model / critic) is
written the same way: `model.*` backbone weights plus `score.weight` / `score.bias`; the folder then
loads as the language model (the head is ignored) or, with `mtrl.models.loader.load_reward_model`,
as the scalar-head model.
"""

import json
import os
import shutil
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from mtrl.utils.faults import crash_point

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def gather_cpu_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Full (unsharded) state dict on rank 0's CPU, empty on the other ranks (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _tied(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def copy_model_files(source: str, target: str) -> None:
    """Every file of a model folder except the weights (config, tokenizer, processor, chat template, ...)."""
    for name in sorted(os.listdir(source)):
        src = os.path.join(source, name)
        if os.path.isfile(src) and not name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(src, os.path.join(target, name))


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when it owns its whole storage, else a copy (gathered shards can be views into one
    buffer, which safetensors refuses to write)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    return t


def write_hf_folder(state_dict: Dict[str, torch.Tensor], path: str, source_model_path: str, tied: bool = False,
                    extra_json: Optional[Dict[str, dict]] = None) -> str:
    """Write `state_dict` + the non-weight files of `source_model_path` to `path` atomically (one process)."""
    from huggingface_hub import save_torch_state_dict

    from mtrl.models.loader import resolve_model_path

    source = resolve_model_path(source_model_path)
    state_dict = {k: _own_storage(v.detach().to("cpu")) for k, v in state_dict.items()}
    if tied and "lm_head.weight" in state_dict:
        state_dict.pop("lm_head.weight")  # from_pretrained ties it to the input embeddings again
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    copy_model_files(source, tmp)
    save_torch_state_dict(state_dict, tmp, max_shard_size="5GB")
    for name, content in (extra_json or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(content, f, indent=2)
    crash_point("export:before_rename")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def save_hf_folder(model: nn.Module, path: str, source_model_path: str, rank: int,
                   weights: Optional[Dict[str, torch.Tensor]] = None,
                   extra_json: Optional[Dict[str, dict]] = None) -> None:
    """Gather `model` (or use the already gathered `weights`, e.g. LoRA-merged) and write it on rank 0."""
    state_dict = weights if weights is not None else gather_cpu_state_dict(model)
    if rank == 0:
        write_hf_folder(state_dict, path, source_model_path, tied=_tied(model), extra_json=extra_json)
    del state_dict
    if dist.is_initialized():
        dist.barrier()
