"""What a command shows on the terminal, and what only its log file keeps.

The terminal of a run carries what a person acts on: progress bars, one line a stage with its time, the
summary, and errors. Everything else (DVC's own lines, Prefect's, MLflow's, the libraries' warnings) goes to the
run's log file, `.graft/logs/graft-<command>-<time>.log`, which the last line names; `graft -v` shows it on the
terminal too. The log file and the choice travel to the stage processes DVC starts through the environment.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

LOG_FILE_VARIABLE = "GRAFT_LOG_FILE"
VERBOSE_VARIABLE = "GRAFT_VERBOSE"
TERMINAL = "graft_terminal"  # a log record with this attribute set is meant for the terminal (logging `extra`)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE) == "1"


def log_file() -> Path | None:
    path = os.environ.get(LOG_FILE_VARIABLE)
    return Path(path) if path else None


def start(root: str | Path, command: str, verbose_terminal: bool) -> Path:
    """A new log file for this command under the project's .graft/logs, named in this process's environment so that
    every process it starts (DVC, the stages) writes there as well."""
    folder = Path(root).resolve() / ".graft" / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"graft-{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.touch()
    os.environ[LOG_FILE_VARIABLE] = str(path)
    os.environ[VERBOSE_VARIABLE] = "1" if verbose_terminal else "0"
    return path


def write(text: str) -> None:
    """Another program's output: to the log file, and to the terminal with -v (or when there is no log file)."""
    path = log_file()
    if path is not None:
        with open(path, "a") as handle:
            handle.write(text)
    if path is None or verbose():
        print(text, end="", flush=True)


# Public names: Prefect keeps its own terminal handler off the root logger only when it finds a handler there
# whose class name does not start with "_".
class RunLogFile(logging.FileHandler):
    """The run's log file: every record."""


class TerminalLines(logging.StreamHandler):
    """The terminal: records marked TERMINAL as plain lines, Graft's own warnings; with -v every record, with its
    level and logger."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        # Graft's own warnings (a registry that does not answer yet, retried) are for the person at the terminal.
        ours = record.levelno >= logging.WARNING and record.name.startswith("graft")
        return verbose() or ours or getattr(record, TERMINAL, False)

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if getattr(record, TERMINAL, False) else super().format(record)


def route_logging() -> None:
    """In a process of a command that has a log file: every log record and warning goes there, and the terminal
    shows the records marked TERMINAL (with -v, every record). Call it before Prefect is imported: Prefect then
    leaves the root logger's handlers alone. Idempotent."""
    path = log_file()
    root = logging.getLogger()
    if path is None or any(isinstance(h, RunLogFile) for h in root.handlers):
        return
    to_file = RunLogFile(path)
    to_file.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(to_file)
    root.addHandler(TerminalLines())
    logging.captureWarnings(True)  # warnings.warn goes through the `py.warnings` logger: to the file
    # MLflow gives its loggers a terminal handler of their own unless told not to; left alone they reach the root
    # logger's handlers above. Its artifact downloads are quick: no progress bar.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextmanager
def quiet() -> Iterator[None]:
    """What a library prints itself (MLflow's "Successfully registered model ...") goes to the log file, not the
    terminal, unless -v."""
    path = log_file()
    if path is None or verbose():
        yield
        return
    with open(path, "a") as handle, redirect_stdout(handle), redirect_stderr(handle):
        yield
