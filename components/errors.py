"""Error kinds, named once, and the exit status each gets on the command line.

  2  a user's input is wrong (bad params, bad data, an unknown stage or version, a busy project): the message
     names the problem and the fix; retrying cannot help
  3  the candidate was judged and rejected by a gate: nothing is wrong with the run, the model is not good enough
  75 (EX_TEMPFAIL) the registry was unreachable and stayed so through the retries: try again later
  1  a bug: the trace goes to the log file the CLI names

A transient failure is recognised where it happens, at the MLflow / HTTP boundary (components/registry.py
`registry_call`), by the type of what was raised, never by the text of a message.
"""
from __future__ import annotations

EXIT_USER, EXIT_REJECTED, EXIT_TRANSIENT, EXIT_BUG = 2, 3, 75, 1
# A stage runs as `graft stage NAME` in its own process under DVC; the runner passes it this variable (in that
# process's environment only) naming a file for the reason it refused its input, so the reason reaches the flow.
ERROR_FILE_VARIABLE = "GRAFT_STAGE_ERROR_FILE"


class GraftError(Exception):
    """The input is wrong; the message names the problem and the fix."""


class CandidateRejected(Exception):
    """The candidate failed a gate: it is registered for diagnosis, without the challenger alias."""


class RegistryUnavailable(Exception):
    """The MLflow server could not be reached, timed out, or answered that it is temporarily unavailable."""


def report_refusal(message: str) -> None:
    """In a stage process run by the runner: hand the reason for refusing the input back to it."""
    import os

    if path := os.environ.get(ERROR_FILE_VARIABLE):
        with open(path, "w") as handle:
            handle.write(message)
