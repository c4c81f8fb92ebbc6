"""Stopping a run on SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C) without losing the work done.

The first signal only raises a flag: the trainer finishes the step it is in, writes a checkpoint
(`training.save_on_signal`, default true; skipped when that step was just saved), shuts the workers and
Ray down and exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT). The time from the
signal to the exit is therefore bounded by the rest of the current step, one checkpoint save and the
shutdown (a few seconds; tests/test_signals.py measures it). A second signal abandons the step at once:
no checkpoint (an interrupted save leaves only a `.partial` folder, which resume never picks).

Rerunning the same command resumes (`training.find_last_checkpoint=true`, the default).
"""

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Set by the first signal; the trainer looks at it after each step."""

    def __init__(self):
        self.signum: Optional[int] = None


class StopRequested(Exception):
    """The run stopped on a signal: after step `step` with `checkpoint` written, or abandoned (step None)."""

    def __init__(self, signum: int, step: Optional[int] = None, checkpoint: Optional[str] = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if step is None:
            what = f"{name} again: abandoned the current step without a checkpoint"
        elif checkpoint:
            what = f"stopped by {name} after step {step}; checkpoint: {checkpoint}"
        else:
            what = f"stopped by {name} after step {step} without writing a checkpoint (training.save_on_signal=false" \
                   f" or no step trained)"
        super().__init__(f"{what}. To resume, run the same command again (training.find_last_checkpoint=true, the "
                         f"default, continues from the run folder's last checkpoint).")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals():
    """Within the block, SIGTERM / SIGINT set the yielded StopFlag (the second one raises StopRequested);
    the previous handlers are restored afterwards. Outside the main thread (no handlers possible) the flag
    is never set."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum, frame):
        if flag.signum is not None:
            raise StopRequested(signum)
        flag.signum = signum
        print(f"[mtrl] received {signal.Signals(signum).name}: stopping after the current step (send it again "
              f"to abandon the step without a checkpoint)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
