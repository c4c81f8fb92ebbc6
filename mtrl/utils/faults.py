"""Crash injection, a TEST HOOK: `MTRL_CRASH_AT=POINT[@STEP]` ends the process at that point with os._exit.

The reliability tests (tests/test_faults*.py) kill a run at chosen points of a checkpoint save, of a
training step and of an export, then check that resuming loses nothing and never picks up a half-written
folder. os._exit skips every `finally` and atexit handler, as a SIGKILL or a power cut would.

The variable is read once, at import; unset (every real run), `crash_point` is one comparison. An unknown
point name is refused at import, so a typo in a test cannot silently never crash. `@STEP` limits the crash
to the checkpoint save or the training step of that global step.
"""

import os
import sys
from typing import Optional, Tuple

CRASH_ENV = "MTRL_CRASH_AT"
CRASH_EXIT_CODE = 86

POINTS = {
    "checkpoint:after_shards": "the worker groups' shards are written, trainer state and metadata not yet",
    "checkpoint:before_rename": "the `.partial` folder is complete (metadata written), not yet renamed",
    "checkpoint:during_rename": "re-saving a step: the old folder moved aside, the new one not yet in place",
    "checkpoint:before_tracker": "the folder is renamed, the tracker file still names the previous step",
    "step:after_train": "the training step is computed, not yet logged or saved",
    "export:before_rename": "(in the worker writing it) the Hugging Face folder is written, not yet renamed",
}


def _parse(value: Optional[str]) -> Optional[Tuple[str, Optional[int]]]:
    if not value:
        return None
    point, _, step = value.partition("@")
    if point not in POINTS:
        raise ValueError(f"{CRASH_ENV}={value!r}: unknown crash point {point!r}; known: {', '.join(POINTS)}")
    return point, int(step) if step else None


_TARGET = _parse(os.environ.get(CRASH_ENV))


def crash_point(point: str, step: Optional[int] = None) -> None:
    """End the process here when MTRL_CRASH_AT names `point` (and `step`, if it gives one)."""
    if _TARGET is None or _TARGET[0] != point or _TARGET[1] not in (None, step):
        return
    print(f"[mtrl] {CRASH_ENV}: crashing at {point}" + (f" (step {step})" if step is not None else ""),
          file=sys.stderr, flush=True)
    os._exit(CRASH_EXIT_CODE)
