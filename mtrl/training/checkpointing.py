"""The controller's checkpoint manager: save and resume a whole run (SPEC section 9, docs/CHECKPOINTS.md).

A checkpoint is what the worker groups save (each group's `save_checkpoint(folder)`: sharded weights,
optimizer, LR scheduler and RNG per rank, mtrl/utils/checkpoint.py) plus the trainer's `state_dict()`
(mtrl/training/trainer_base.py), in the layout below; the manager knows nothing else about trainers.

    global_step_N/
      mtrl_checkpoint.json          what is inside: step, world size, roles, model path, LoRA settings
      trainer_state.json            the trainer's state_dict() without its RNG (step, data position, ...)
      trainer_rng.pt                the controller RNG states (python, numpy, torch): state_dict()["rng"]
      actor/ [critic/]              one folder per worker group (role)

Crash safety: the checkpoint is written into `global_step_N.partial/` and renamed only when every part
(`mtrl_checkpoint.json` last) is on disk; the tracker file follows (temporary file + os.replace), then
`save_limit` pruning. Folder discovery and the tracker live in mtrl/utils/checkpoint.py (export reads them).
"""

import json
import os
import shutil
import time
from typing import Any, Dict, Optional, Tuple

import torch

from mtrl.training.training_config import MTRLConfig, TrainingConfig
from mtrl.utils import checkpoint as ckpt
from mtrl.utils.errors import UserError
from mtrl.utils.faults import crash_point
from mtrl.utils.logger import get_logger

logger = get_logger(__name__)


def should_save(save_freq: int, step: int, last_step: bool) -> bool:
    """Every ``save_freq`` steps (-1: never in between) and always after the last step."""
    return last_step or (save_freq > 0 and step % save_freq == 0)


def resolve_resume_path(training: TrainingConfig, run_dir: str) -> Optional[str]:
    """The checkpoint to resume from: ``load_checkpoint_path`` if given, else (with ``find_last_checkpoint``)
    the run folder's latest one, else None."""
    explicit = training.load_checkpoint_path
    if explicit:
        path = os.path.expanduser(str(explicit))
        if not os.path.isdir(path):
            raise UserError(f"`training.load_checkpoint_path` = {explicit!r}: no such folder.")
        if not ckpt.is_complete_checkpoint(path):
            inside = ckpt.list_checkpoints(path)
            hint = f" It holds checkpoints; pass one of them, e.g. {inside[-1]!r}." if inside else ""
            raise UserError(f"`training.load_checkpoint_path` = {explicit!r} is not a complete MTRL checkpoint "
                            f"(a `global_step_N` folder with {ckpt.META_FILE}).{hint}")
        return path
    if training.find_last_checkpoint:
        return ckpt.find_latest_checkpoint(run_dir)
    return None


class CheckpointManager:
    def __init__(self, config: MTRLConfig):
        self.config = config
        self.run_dir = config.training.run_dir

    def meta(self, step: int, roles) -> Dict[str, Any]:
        config = self.config
        mcfg = config.worker.actor.model
        actor = {"model_path": os.path.abspath(mcfg.model_path)
                 if mcfg.model_path and os.path.exists(mcfg.model_path) else mcfg.model_path,
                 "tokenizer_path": mcfg.tokenizer_path, "peft_type": mcfg.peft_type,
                 "frozen_params_saved": mcfg.peft_type != "qlora"}
        if mcfg.peft_type:
            actor["lora"] = {"rank": mcfg.lora_rank, "alpha": mcfg.lora_alpha, "dropout": mcfg.lora_dropout,
                             "target_modules": list(mcfg.lora_target_modules)}
        return {"format": ckpt.CHECKPOINT_FORMAT, "global_step": step, "world_size": config.training.world_size,
                "roles": list(roles), "actor": actor, "experiment_name": config.training.experiment_name,
                "project_name": config.training.project_name, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save(self, step: int, groups: Dict[str, Any], state: Dict[str, Any]) -> str:
        """Save the worker groups (by role) and the trainer state at `step` into the run folder; returns the
        checkpoint folder."""
        run_dir = self.run_dir
        step = int(step)
        final = os.path.join(run_dir, ckpt.step_dir_name(step))
        partial = final + ckpt.PARTIAL_SUFFIX
        ckpt.remove_partial_checkpoints(run_dir)
        os.makedirs(partial)
        for role, group in groups.items():
            group.save_checkpoint(os.path.join(partial, role))
        crash_point("checkpoint:after_shards", step)
        state = dict(state)
        rng = state.pop("rng", None)
        with open(os.path.join(partial, ckpt.TRAINER_STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)
        if rng is not None:
            torch.save(rng, os.path.join(partial, ckpt.TRAINER_RNG_FILE))
        # The metadata file marks the folder complete: it is written last, then the folder is renamed.
        ckpt.atomic_write(os.path.join(partial, ckpt.META_FILE), json.dumps(self.meta(step, groups), indent=1))
        crash_point("checkpoint:before_rename", step)
        if os.path.exists(final):  # the same step saved again (e.g. a rerun into the same folder)
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            crash_point("checkpoint:during_rename", step)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
        crash_point("checkpoint:before_tracker", step)
        ckpt.write_tracker(run_dir, step)
        limit = self.config.training.save_limit
        removed = ckpt.prune_checkpoints(run_dir, limit, protect=[final])
        if removed:
            logger.info(f"save_limit={limit}: removed {', '.join(os.path.basename(p) for p in removed)}")
        return final

    def load(self, groups: Dict[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Load the checkpoint :func:`resolve_resume_path` picks into the worker groups; returns its path and
        the trainer state to give to the trainer's `load_state_dict` (None when starting fresh)."""
        t = self.config.training
        path = resolve_resume_path(t, self.run_dir)
        if path is None:
            return None
        meta = ckpt.read_meta(path)
        self._check_compatible(path, meta)
        start = time.perf_counter()
        for role, group in groups.items():
            role_dir = os.path.join(path, role)
            if not ckpt.is_dir_with_model(role_dir):
                raise UserError(f"checkpoint {path} has no {role} state but this run needs one (roles saved: "
                                f"{', '.join(meta.get('roles', []))}); resume with the settings it was trained "
                                f"with (e.g. the same advantage_estimator).")
            group.load_checkpoint(role_dir)
        with open(os.path.join(path, ckpt.TRAINER_STATE_FILE)) as f:
            state = json.load(f)
        rng_path = os.path.join(path, ckpt.TRAINER_RNG_FILE)
        if os.path.isfile(rng_path):
            state["rng"] = ckpt.load_torch_file(rng_path)
        saved_world = meta.get("world_size")
        note = f" (saved with {saved_world} workers, now {t.world_size})" \
            if saved_world not in (None, t.world_size) else ""
        what = "loaded the weights of" if t.val_only else "resumed from"
        logger.info(f"{what} {path} at step {state['global_step']}{note} in {time.perf_counter() - start:.1f}s")
        return path, state

    def _check_compatible(self, path: str, meta: Dict[str, Any]) -> None:
        saved_peft = (meta.get("actor") or {}).get("peft_type")
        wanted = self.config.worker.actor.model.peft_type
        if (saved_peft or None) != (wanted or None):
            raise UserError(f"checkpoint {path} was trained with worker.actor.model.peft_type={saved_peft} but this "
                            f"run has peft_type={wanted}; set the same value to resume (or export it and start a new "
                            f"run from the exported model).")
