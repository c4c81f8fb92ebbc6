"""Make the config's relative paths absolute on the driver before the config travels to workers.

Ray workers (on this node or others) do not share the driver's working directory, so a relative
`model_path` or data file that works for the driver would not be found by a worker.
"""

import os
from typing import Optional

from mtrl.training.training_config import MTRLConfig


def _absolute(path: Optional[str], must_exist: bool = False) -> Optional[str]:
    if not path or os.path.isabs(path) or (must_exist and not os.path.exists(path)):
        return path
    return os.path.abspath(path)


def _absolute_files(files: Optional[str]) -> Optional[str]:
    """Comma-separated data files, each optionally `path@split`."""
    if not files:
        return files
    out = []
    for entry in files.split(","):
        path, at, split = entry.strip().rpartition("@") if "@" in entry else (entry.strip(), "", "")
        out.append(_absolute(path) + (at + split if at else ""))
    return ",".join(out)


def absolutize_paths(config: MTRLConfig) -> None:
    """In place. Model paths only when they exist locally (otherwise they may be hub ids in the HF cache)."""
    d, t = config.dataset, config.training
    d.train_files, d.val_files = _absolute_files(d.train_files), _absolute_files(d.val_files)
    d.image_dir = _absolute(d.image_dir)
    t.save_checkpoint_path = _absolute(t.run_dir)
    t.load_checkpoint_path = _absolute(t.load_checkpoint_path)
    for model in (config.worker.actor.model, config.worker.critic.model):
        model.model_path = _absolute(model.model_path, must_exist=True)
        model.tokenizer_path = _absolute(model.tokenizer_path, must_exist=True)
    reward = config.worker.reward
    reward.reward_model_path = _absolute(reward.reward_model_path, must_exist=True)
