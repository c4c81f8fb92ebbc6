"""First-use generation of the built-in task data and tiny model named by a config.

`dataset.generate_if_missing: shapes[:difficulty]` writes the coloured-shapes task into the folder of
`train_files` / `val_files`; `worker.actor.model.build_tiny_if_missing: ARCH` builds a tiny random
model (tokenizer trained on the task's text) at `model_path`. Both only act when the target is
missing, and both write to a temporary folder first, so an interrupted run leaves nothing half-made.
"""

import os
from typing import Optional, Tuple

from mtrl.training.training_config import MTRLConfig
from mtrl.utils.errors import UserError


def _task_spec(spec: Optional[str]) -> Optional[Tuple[str, str]]:
    if not spec:
        return None
    name, _, difficulty = spec.partition(":")
    if name != "shapes":
        raise UserError(f"`dataset.generate_if_missing` = {spec!r}: the only built-in task is `shapes` "
                        f"(optionally `shapes:easy`, `shapes:medium`, `shapes:hard`).")
    return name, difficulty or "easy"


def _ensure_pairs(config: MTRLConfig, task_folders) -> None:
    """`{train,val}_pairs.jsonl` named in preference_files / preference_val_files inside a generated task folder:
    correct-vs-wrong answer pairs for reward models and DPO (`shapes_task.write_preference_pairs`)."""
    import re

    from mtrl.utils.shapes_task import write_preference_pairs

    for entry in f"{config.dataset.preference_files or ''},{config.dataset.preference_val_files or ''}".split(","):
        path = entry.strip()
        match = re.fullmatch(r"(train|val)_pairs\.jsonl", os.path.basename(path))
        if match and os.path.dirname(path) in task_folders and not os.path.exists(path):
            write_preference_pairs(os.path.dirname(path), match.group(1), seed=config.dataset.seed)


def ensure_builtin_assets(config: MTRLConfig) -> None:
    from mtrl.models.tiny import ensure_tiny_model
    from mtrl.utils.shapes_task import ensure_task, task_corpus

    task = _task_spec(config.dataset.generate_if_missing)
    difficulty = task[1] if task else "easy"
    if task:
        files = ",".join(f for f in (config.dataset.train_files, config.dataset.val_files) if f)
        folders = {os.path.dirname(f.split("@")[0]) for f in files.split(",") if f}
        for folder in sorted(folders):
            ensure_task(folder, difficulty=difficulty, seed=config.dataset.seed)
        _ensure_pairs(config, folders)
    for model in (config.worker.actor.model, config.worker.critic.model):
        if model.build_tiny_if_missing and model.model_path:
            ensure_tiny_model(model.model_path, arch=model.build_tiny_if_missing, corpus=task_corpus(difficulty))
