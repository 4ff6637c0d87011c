"""Error kinds, named once, and the exit status each gets on the command line.

  2  a user's input is wrong (bad params, bad data, an unknown stage or version, a busy project): the message
     names the problem and the fix; retrying cannot help
  3  the candidate was judged and rejected by a gate: nothing is wrong with the run, the model is not good enough
  75 (EX_TEMPFAIL) the registry was unreachable and stayed so through the retries: try again later
  1  a bug: the trace goes to the log file the CLI names

A transient failure is recognised where it happens, at the MLflow / HTTP boundary (`registry_call`), by the
type of what was raised, never by the text of a message.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


def _unreachable(error: BaseException) -> bool:
    """A connection that failed or timed out, or a 5xx answer: the server, not the request, was at fault."""
    import requests
    from mlflow.exceptions import MlflowException

    # RetryError: urllib3 gave up on 429 / 5xx answers (MLflow's client retries those with backoff).
    if isinstance(error, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError, ConnectionError,
                          TimeoutError)):
        return True
    return isinstance(error, MlflowException) and error.error_code == "TEMPORARILY_UNAVAILABLE"


@contextmanager
def registry_call(what: str, uri: str) -> Iterator[None]:
    """Talk to the registry; a connection failure anywhere in the cause chain becomes RegistryUnavailable.

    MLflow wraps the requests error it gave up on in an MlflowException (as its cause or context), so the
    chain is walked. deploy/ (which cannot import these kinds) says the same with its own types: its
    RegistryUnreachable is transient, any other SourceError (no such store, alias or version; a changed file) is
    the user's to fix. A full disk, a permission error or a refused request is not transient and passes as is."""
    try:
        yield
    except RegistryUnavailable:
        raise  # classified already, by a registry_call inside this one
    except Exception as error:
        from deploy.source import RegistryUnreachable, SourceError

        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, RegistryUnreachable):
                raise RegistryUnavailable(f"{what}: {cause}") from error
            if _unreachable(cause):
                raise RegistryUnavailable(f"{what}: the MLflow registry at {uri} is unreachable "
                                          f"({type(cause).__name__}); is the server running?") from error
            cause = cause.__cause__ or cause.__context__
        if isinstance(error, SourceError):
            raise GraftError(f"{what}: {error}") from error
        raise


def report_refusal(message: str) -> None:
    """In a stage process run by the runner: hand the reason for refusing the input back to it."""
    import os

    if path := os.environ.get(ERROR_FILE_VARIABLE):
        with open(path, "w") as handle:
            handle.write(message)
