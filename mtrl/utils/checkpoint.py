"""Checkpoints on disk: the layout, finding them, and the workers' sharded save / load (SPEC section 9).

Layout of one checkpoint (``{save_checkpoint_path}/global_step_N/``)::

    global_step_N/
      mtrl_checkpoint.json          what is inside: step, world size, roles, model path, LoRA settings
      trainer_state.json            controller: the trainer's state_dict() (global step, dataloader position,
                                    divergence / entropy-bonus coefficients)
      trainer_rng.pt                controller RNG states (python, numpy, torch)
      actor/
        model/                      torch.distributed.checkpoint (DCP): sharded weights, any world size
        optim/                      DCP: sharded optimizer state (absent for a run without optimizer)
        extra_state_rank_{r}.pt     per rank: LR scheduler state, RNG states (python, numpy, torch, cuda)
        huggingface/                rank 0: config.json, generation_config.json, tokenizer / processor,
                                    chat template, adapter_config.json (LoRA) -- what export needs
      critic/                       as actor/ (model, optim, extra state), when the run has a critic
    latest_checkpointed_iteration.txt   (in the run folder) the step of the newest complete checkpoint

Crash safety: a checkpoint is written into ``global_step_N.partial/`` and renamed to ``global_step_N``
only when every part (including ``mtrl_checkpoint.json``, written last inside it) is on disk; the
tracker file is written after that, through a temporary file and ``os.replace``. Resume reads the
tracker (or, without one, picks the newest complete folder), so an interrupted save is never picked;
leftover ``*.partial`` folders are removed by the next save.

Worker side: :func:`save_fsdp_state` / :func:`load_fsdp_state` (called by the workers'
``save_checkpoint`` / ``load_checkpoint`` on every rank: DCP calls are collective). The sharded state
is read and written with ``torch.distributed.checkpoint.state_dict.get_state_dict`` /
``set_state_dict`` + ``dcp.save`` / ``dcp.load``, so a checkpoint written by 2 ranks loads on 1 or 4.
Controller side (what a checkpoint holds besides the workers' state, when to save, what to resume):
``mtrl/training/checkpointing.py``.
:func:`load_model_state_dict` reads the full (unsharded) weights of a checkpoint in a plain process,
without torch.distributed (used by ``python -m mtrl.models.export``).
"""

import json
import os
import random
import re
import shutil
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch

from mtrl.utils.logger import get_logger

logger = get_logger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "mtrl_checkpoint.json"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINER_RNG_FILE = "trainer_rng.pt"
HF_DIR = "huggingface"
MODEL_DIR = "model"
OPTIM_DIR = "optim"
PARTIAL_SUFFIX = ".partial"
CHECKPOINT_FORMAT = 1

_STEP_DIR = re.compile(r"^global_step_(\d+)$")


# ============================================================================= paths and discovery


def step_dir_name(step: int) -> str:
    return f"global_step_{int(step)}"


def checkpoint_step(path: str) -> Optional[int]:
    """N for a folder named ``global_step_N``, else None."""
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str) -> bool:
    """A finished checkpoint folder: its metadata file (written last) and the actor's DCP metadata exist."""
    return os.path.isfile(os.path.join(path, META_FILE)) and is_dir_with_model(os.path.join(path, "actor"))


def is_dir_with_model(role_dir: str) -> bool:
    """A role folder (``.../global_step_N/actor``) holding a DCP model."""
    return os.path.isfile(os.path.join(role_dir, MODEL_DIR, ".metadata"))


def list_checkpoints(run_dir: str) -> List[str]:
    """Complete ``global_step_N`` folders of a run, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        step = checkpoint_step(name)
        path = os.path.join(run_dir, name)
        if step is not None and os.path.isdir(path) and is_complete_checkpoint(path):
            found.append((step, path))
    return [path for _, path in sorted(found)]


def read_tracker(run_dir: str) -> Optional[int]:
    """The step recorded in the run's tracker file, or None (no file, or not a number)."""
    path = os.path.join(run_dir, TRACKER_FILE)
    try:
        with open(path) as f:
            return int(f.read().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        logger.warning("%s does not hold a step number; ignoring it", path)
        return None


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_tracker(run_dir: str, step: int) -> None:
    atomic_write(os.path.join(run_dir, TRACKER_FILE), f"{int(step)}\n")


def find_latest_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint the tracker file names; without a tracker, the newest complete folder."""
    step = read_tracker(run_dir)
    if step is not None:
        path = os.path.join(run_dir, step_dir_name(step))
        if is_complete_checkpoint(path):
            return path
        logger.warning("%s names step %d but %s is missing or incomplete; looking for the newest complete "
                       "checkpoint instead", TRACKER_FILE, step, path)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


def prune_checkpoints(run_dir: str, keep: Optional[int], protect: Iterable[str] = ()) -> List[str]:
    """Delete all but the newest ``keep`` complete checkpoints (never one in ``protect``). Returns the removed."""
    if not keep or keep <= 0:
        return []
    protected = {os.path.abspath(p) for p in protect}
    found = list_checkpoints(run_dir)
    removed = []
    for path in found[:max(0, len(found) - keep)]:
        if os.path.abspath(path) in protected:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_partial_checkpoints(run_dir: str) -> None:
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        if name.startswith("global_step_") and (name.endswith(PARTIAL_SUFFIX) or name.endswith(".old")):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


# ============================================================================= RNG


# Besides tensors and plain containers, the extra-state and trainer RNG files hold numpy's RNG state (a uint32
# ndarray). Loading them with weights_only=True, these globals allowed, keeps a tampered checkpoint from
# running code: an unrestricted torch.load unpickles anything.
_NUMPY_RNG_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                      (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct]


def load_torch_file(path: str) -> Any:
    """`torch.load` of a small state file (RNG, LR scheduler) on the CPU, with weights_only=True."""
    with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # another GPU layout: this process's current device takes the first saved state
            torch.cuda.set_rng_state(states[0])


# ============================================================================= worker side (collective)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def save_fsdp_state(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    lr_scheduler: Any = None, hf_artifacts: Iterable[Any] = (), save_frozen: bool = True) -> None:
    """Save one role's sharded model (+ optimizer) state into ``path`` (every rank must call this).

    ``hf_artifacts``: objects with ``save_pretrained(folder)`` (model config, generation config, processor
    or tokenizer, peft config) that rank 0 writes to ``path/huggingface``. ``save_frozen=False`` leaves the
    frozen parameters out (QLoRA: the quantized base is reloaded from the model path instead).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    rank = _rank()
    os.makedirs(path, exist_ok=True)
    options = StateDictOptions(ignore_frozen_params=not save_frozen)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model_sd, optim_sd = get_model_state_dict(model, options=options), None
    dcp.save({"model": model_sd}, checkpoint_id=os.path.join(path, MODEL_DIR))
    if optim_sd is not None:
        dcp.save({"optim": optim_sd}, checkpoint_id=os.path.join(path, OPTIM_DIR))
    extra = {"rng": rng_state(), "world_size": _world_size(), "rank": rank,
             "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None}
    torch.save(extra, os.path.join(path, f"extra_state_rank_{rank}.pt"))
    if rank == 0:
        hf_dir = os.path.join(path, HF_DIR)
        os.makedirs(hf_dir, exist_ok=True)
        for artifact in hf_artifacts:
            if artifact is not None:
                artifact.save_pretrained(hf_dir)
    _barrier()


def load_fsdp_state(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    lr_scheduler: Any = None, load_frozen: bool = True) -> Dict[str, Any]:
    """Load what :func:`save_fsdp_state` wrote into an FSDP2 model (+ optimizer) at any world size.

    Every rank must call this. The optimizer state is loaded when ``optimizer`` is given (it must exist in
    the checkpoint); LR scheduler and RNG come from this rank's extra-state file, or rank 0's when the
    checkpoint was written by fewer ranks. Returns that extra state.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    model_dir, optim_dir = os.path.join(path, MODEL_DIR), os.path.join(path, OPTIM_DIR)
    if not os.path.isfile(os.path.join(model_dir, ".metadata")):
        raise FileNotFoundError(f"{model_dir} is not a torch.distributed.checkpoint folder")
    options = StateDictOptions(ignore_frozen_params=not load_frozen)
    if optimizer is not None:
        if not os.path.isfile(os.path.join(optim_dir, ".metadata")):
            raise FileNotFoundError(f"{optim_dir} is missing: the checkpoint has no optimizer state to resume from")
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        dcp.load({"model": model_sd}, checkpoint_id=model_dir)
        dcp.load({"optim": optim_sd}, checkpoint_id=optim_dir)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    else:
        model_sd = get_model_state_dict(model, options=options)
        dcp.load({"model": model_sd}, checkpoint_id=model_dir)
        set_model_state_dict(model, model_sd, options=options)
    rank = _rank()
    extra_path = os.path.join(path, f"extra_state_rank_{rank}.pt")
    if not os.path.isfile(extra_path):
        extra_path = os.path.join(path, "extra_state_rank_0.pt")
    extra: Dict[str, Any] = {}
    if os.path.isfile(extra_path):
        extra = load_torch_file(extra_path)
        if lr_scheduler is not None and extra.get("lr_scheduler") is not None:
            lr_scheduler.load_state_dict(extra["lr_scheduler"])
        if extra.get("rng") is not None:
            set_rng_state(extra["rng"])
    _barrier()
    return extra


def load_model_state_dict(role_dir: str) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model weights of one role folder (``.../global_step_N/actor``), in this process,
    without torch.distributed (no Ray, no process group): plain tensors keyed by the training model's names."""
    model_dir = os.path.join(role_dir, MODEL_DIR)
    if not os.path.isfile(os.path.join(model_dir, ".metadata")):
        raise FileNotFoundError(f"{model_dir} is not a torch.distributed.checkpoint folder")
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group, loading in a single process" notices
        loaded = _load_state_dict_from_keys(checkpoint_id=model_dir)
    state = loaded.get("model", loaded)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}

