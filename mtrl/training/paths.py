"""Make the config's paths usable by every worker before the config travels to them.

Ray workers (on this node or others) do not share the driver's working directory, so a relative
`model_path` or data file that works for the driver would not be found by a worker: relative paths
become absolute. A model path that names a Hugging Face Hub repository (`org/name[@revision]`, no local
path of that name; mtrl/utils/hub.py) is downloaded here, once, and replaced by its local snapshot
folder, so no worker downloads and all read the same files (on several nodes the Hugging Face cache,
HF_HOME, must then be on storage every node mounts, like the run folder). Data files that are Hub ids stay as they
are: the driver reads the data itself (mtrl/utils/dataset.py).
"""

import os
from typing import Dict, Optional

from mtrl.training.training_config import MTRLConfig
from mtrl.utils.hub import download_snapshot, parse_dataset_id, parse_repo_id


def _absolute(path: Optional[str], must_exist: bool = False) -> Optional[str]:
    if not path or os.path.isabs(path) or (must_exist and not os.path.exists(path)):
        return path
    return os.path.abspath(path)


def _absolute_files(files: Optional[str]) -> Optional[str]:
    """Comma-separated data files, each optionally `path@split`; Hub dataset ids are kept as written."""
    if not files:
        return files
    out = []
    for entry in files.split(","):
        entry = entry.strip()
        if parse_dataset_id(entry) is not None:
            out.append(entry)
            continue
        path, at, split = entry.rpartition("@") if "@" in entry else (entry, "", "")
        out.append(_absolute(path) + (at + split if at else ""))
    return ",".join(out)


def _local_model(path: Optional[str], what: str, snapshots: Dict[str, str]) -> Optional[str]:
    """An existing path made absolute, a Hub id replaced by its snapshot (each repository fetched once)."""
    if parse_repo_id(path) is None:
        return _absolute(path, must_exist=True)
    if path not in snapshots:
        snapshots[path] = download_snapshot(path, what)
    return snapshots[path]


def absolutize_paths(config: MTRLConfig) -> None:
    """In place: data, checkpoint and model paths absolute, Hub model ids replaced by local snapshots."""
    d, t = config.dataset, config.training
    d.train_files, d.val_files = _absolute_files(d.train_files), _absolute_files(d.val_files)
    d.image_dir = _absolute(d.image_dir)
    t.save_checkpoint_path = _absolute(t.run_dir)
    t.load_checkpoint_path = _absolute(t.load_checkpoint_path)
    snapshots: Dict[str, str] = {}
    for section, model in (("worker.actor.model", config.worker.actor.model),
                           ("worker.critic.model", config.worker.critic.model)):
        model.model_path = _local_model(model.model_path, f"{section}.model_path", snapshots)
        model.tokenizer_path = _local_model(model.tokenizer_path, f"{section}.tokenizer_path", snapshots)
    reward = config.worker.reward
    reward.reward_model_path = _local_model(reward.reward_model_path, "worker.reward.reward_model_path", snapshots)
