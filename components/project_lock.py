"""One retraining run at a time per project folder."""
from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.errors import GraftError


class ProjectBusy(GraftError):
    pass


@contextmanager
def project_lock(root: str | Path, wait_seconds: float, holder: str) -> Iterator[None]:
    """One retraining run at a time per project folder: DVC's stages, its lock file and the outputs are shared.

    flock is released by the kernel when the holder dies, so a killed run never leaves a stale lock."""
    path = Path(root) / ".graft.lock"
    deadline = time.monotonic() + wait_seconds
    with open(path, "a+") as handle:
        said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                other = handle.read().strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise ProjectBusy(
                        f"another retraining run is using {Path(root).resolve()} ({other}); "
                        f"waited {wait_seconds:.0f}s. Try again when it ends, or raise schedule.lock_wait_seconds."
                    ) from None
                if not said:  # a wait that says nothing looks like a hang
                    logging.getLogger("graft.lock").warning(
                        "waiting up to %.0fs (schedule.lock_wait_seconds) for another run of this project to end: %s",
                        wait_seconds, other)
                    said = True
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{holder}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
