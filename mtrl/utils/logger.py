"""The package's logger: `get_logger(__name__)` in every module of mtrl; each line reads "[mtrl] message".

One handler on the "mtrl" logger writes INFO and above to stderr. Records still propagate to the root
logger, so pytest's `caplog` and an application's own handlers see them. What the command-line tools
print as their result (a run's summary, `wrote ...`, `exported ...`) stays a plain print on stdout.
"""

import logging
import sys

PACKAGE_LOGGER = "mtrl"
FORMAT = "[mtrl] %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (pytest and Ray replace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def get_logger(name: str) -> logging.Logger:
    package = logging.getLogger(PACKAGE_LOGGER)
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        package.addHandler(_StderrHandler())
        package.setLevel(logging.INFO)
    return logging.getLogger(name)
