"""Error kinds, and how a stage process reports them to the runner.

A stage runs as `graft stage NAME` under DVC. Its exit status tells the runner what kind of failure it was:
  2  (EX_USAGE-like)  the input is wrong (bad data, bad params, a refused promotion): retrying cannot help
  75 (EX_TEMPFAIL)    the world was briefly wrong (MLflow server unreachable, an I/O error): retry with backoff
  1                   a bug: not retried
and, when GRAFT_ERROR_FILE is set, it writes the message there so the runner can show it by name.
"""
from __future__ import annotations

import json
import os

EXIT_PERMANENT, EXIT_TRANSIENT = 2, 75
_TRANSIENT_TEXT = ("Max retries exceeded", "Connection refused", "Connection reset", "timed out", "Temporary failure",
                   "Name or service not known", "503 Service Unavailable", "502 Bad Gateway")


class GraftError(Exception):
    """The input is wrong; the message names the problem and the fix."""


class StageFailed(RuntimeError):
    """A pipeline stage failed and retrying will not help."""


class TransientStageError(RuntimeError):
    """A pipeline stage failed on something that may pass on a retry."""


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return any(text in str(error) for text in _TRANSIENT_TEXT)


def report_error(kind: str, message: str) -> None:
    path = os.environ.get("GRAFT_ERROR_FILE")
    if path:
        with open(path, "w") as handle:
            json.dump({"kind": kind, "message": message}, handle)
