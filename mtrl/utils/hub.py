"""Hugging Face Hub repositories named in a config: what counts as one, and getting their local snapshot.

An entry names a Hub repository when no local path of that name exists and it reads `org/name` or
`org/name@revision` (a branch, tag or commit); a data file entry names a Hub dataset as
`org/name[:config][@split]` (`parse_dataset_id`; read by mtrl/utils/dataset.py with the `datasets`
library). `download_snapshot` fetches a model with huggingface_hub (which honours HF_HOME / HF_HUB_CACHE,
HF_HUB_OFFLINE and HF_TOKEN), or finds it in the cache when offline, and returns the snapshot folder;
`cached_snapshot` only looks in the cache. The driver calls `download_snapshot` once per repository and
rewrites the config to the folder, so every worker reads the same files and none downloads
(mtrl/training/paths.py).
"""

import os
import re
from typing import Optional, Tuple

from mtrl.utils.errors import UserError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_REVISION = re.compile(r"[\w.-]+(/[\w.-]+)*")  # main, v1.0, a commit hash, refs/pr/1
_CONFIG = re.compile(r"[\w.-]+")
_SPLIT = re.compile(r"[\w.%:+\[\]-]+")  # train, test, train[:1000] (the datasets library's slicing)
_DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")

# Weights in formats MTRL never loads (Flax, TensorFlow, the original non-HF checkpoints of some repos).
_IGNORED_FILES = ("*.msgpack", "*.h5", "*.ot", "original/*", "consolidated*.pth")


def parse_repo_id(spec: Optional[str]) -> Optional[Tuple[str, Optional[str]]]:
    """`(repo_id, revision or None)` when `spec` names a Hub repository (see the module docstring), else None."""
    if not spec or os.path.exists(os.path.expanduser(spec)):
        return None
    repo, at, revision = spec.partition("@")
    if not _REPO_ID.fullmatch(repo) or (at and not _REVISION.fullmatch(revision)):
        return None
    return repo, revision or None


def parse_dataset_id(entry: Optional[str]) -> Optional[Tuple[str, Optional[str], Optional[str]]]:
    """`(repo_id, config or None, split or None)` when `entry` reads `org/name[:config][@split]` and no local path
    of that name exists, else None. A name ending like a data file (`data/train.jsonl`) is a missing file, not an id."""
    if not entry or os.path.exists(os.path.expanduser(entry)):
        return None
    name, at, split = entry.partition("@")
    repo, colon, config = name.partition(":")
    if (not _REPO_ID.fullmatch(repo) or repo.lower().endswith(_DATA_FILE_SUFFIXES)
            or (colon and not _CONFIG.fullmatch(config)) or (at and not _SPLIT.fullmatch(split))):
        return None
    return repo, config or None, split or None


def cached_snapshot(spec: str, repo_type: str = "model") -> Optional[str]:
    """The snapshot folder of a Hub repository already in the local cache, or None (never downloads)."""
    parsed = parse_repo_id(spec)
    if parsed is None:
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(parsed[0], revision=parsed[1], repo_type=repo_type, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, invalid id, hub library missing: all mean "not here"
        return None


def download_snapshot(spec: str, what: str, repo_type: str = "model") -> str:
    """The local snapshot folder of the Hub repository `spec`, downloaded when needed.

    `what` names the config key for messages. Every failure is a `UserError` that says what to do;
    offline (HF_HUB_OFFLINE=1) with the repository not cached is one of them.
    """
    parsed = parse_repo_id(spec)
    if parsed is None:
        raise UserError(f"{what} = {spec!r} is neither a local path nor a Hub id (org/name or org/name@revision)")
    repo_id, revision = parsed
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{what} = {spec!r}: there is no local path of that name, and the Hub {repo_type} repository {repo_id}"
    try:
        return snapshot_download(repo_id, revision=revision, repo_type=repo_type, ignore_patterns=_IGNORED_FILES)
    except GatedRepoError:
        raise UserError(f"{where} is gated: accept its terms on huggingface.co and log in (`hf auth login` or "
                        f"HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{where} does not exist (or is private: log in with `hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{where} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise UserError(f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                            f"forbids downloading it: download it once online (`hf download {repo_id}"
                            f"{f' --revision {revision}' if revision else ''}`), point HF_HOME at a cache that has "
                            f"it, or give a local folder") from None
        raise UserError(f"{where} could not be downloaded (no connection to the Hub?) and is not in the Hugging "
                        f"Face cache ({constants.HF_HUB_CACHE})") from None
