"""Aliases in the MLflow registry, with an audit trail MLflow itself does not keep.

`challenger` marks a version that passed every gate; `champion` is what production serves. Every alias move
is recorded as a registered-model tag `graft.audit.<ns timestamp>` holding JSON: alias, version, previous
version, when, who, which run, why, and whether the move completed. A move is written as `started`, then the
alias is set (one atomic registry call), then `completed`: a process killed in between leaves the alias
either where it was or where it was going, both complete, gate-passing versions, and the history shows the
interrupted move.
"""
from __future__ import annotations

import functools
import getpass
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.artifacts import read_json, sha256_json
from components.config import Params
from components.settings import RegistryParams, Settings, load_settings
from components.errors import GraftError, RegistryUnavailable
from components.layout import Layout
from deploy.digest import sha256_file
from deploy.source import (
    IntegrityError,
    RegistrySource,
    RegistryUnreachable,
    SourceError,
    check_server,
    check_store_exists,
)
from deploy.tags import AUDIT_PREFIX, CANDIDATE_TAG, GATES_TAG, JUDGED_TAG, gate_verdicts
from deploy.variants import FP32

if TYPE_CHECKING:
    from deploy.model import LoadedModel


CHAMPION, CHALLENGER = "champion", "challenger"


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



class RegistryError(GraftError):
    pass


@dataclass(frozen=True)
class AliasMove:
    alias: str
    version: str
    previous: str | None
    action: str          # promote | rollback | challenger
    actor: str
    run_id: str
    reason: str
    status: str          # started | completed
    at: str
    key: str = ""


def tracking_uri(registry: RegistryParams, root: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI, else params; an embedded store's relative path is relative to the project folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or registry.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path(root) / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def use_store(registry: RegistryParams, root: str | Path = ".") -> str:
    """Point MLflow at the configured store; its URI. A server that does not answer is named within seconds."""
    uri = tracking_uri(registry, root)
    if uri.startswith(("http://", "https://")):
        with registry_call("opening the registry", uri):
            check_server(uri)
    users_choice = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow also writes the URI into this process's environment; the variable stays the user's choice, else
    # the next project opened in this process would be sent to this one's registry.
    if users_choice is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = users_choice
    return uri


def use_experiment(registry: RegistryParams, root: str | Path = ".") -> str:
    """Point MLflow at the configured store and experiment (created with its artifact folder if new)."""
    uri = use_store(registry, root)
    experiment = mlflow.get_experiment_by_name(registry.experiment)
    if experiment is None and uri.startswith(("http://", "https://")):
        # A tracking server stores artifacts where it was told (--artifacts-destination), not in our folder.
        experiment_id = mlflow.create_experiment(registry.experiment)
    elif experiment is None:
        location = registry.artifact_location
        if "://" not in location:
            location = (Path(root) / location).resolve().as_uri()
        experiment_id = mlflow.create_experiment(registry.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def open_registry(params_path: str | Path) -> tuple[MlflowClient, str]:
    """A client on the configured store, and the registered model's name: what alias commands work on. They only
    read the store (and move aliases in it): a store that does not exist is refused, never created empty."""
    params = load_settings(params_path)
    root = Path(params_path).parent
    uri = tracking_uri(params.registry, root)
    with registry_call("opening the registry", uri):
        check_store_exists(uri)
    use_store(params.registry, root)  # alias commands log no runs: no experiment needed
    return MlflowClient(), params.registry.model_name


def _classified(what: str):
    """For an alias command (called with the client first): its registry calls are classified at the boundary, so
    a server that stops answering part-way is RegistryUnavailable (exit 75), not a bug."""
    def wrap(command):
        @functools.wraps(command)
        def call(client: MlflowClient, *args, **kwargs):
            with registry_call(what, client.tracking_uri):
                return command(client, *args, **kwargs)
        return call
    return wrap


def candidate_key(root: Path, params: Settings) -> str:
    """The candidate's identity: its ONNX bytes, data version, source weights and the params that made it."""
    meta = read_json(root / Layout.transfer_model.with_suffix(".json"))
    made_by = {k: v for k, v in params.model_dump(mode="json").items() if k in Params.model_fields}
    return sha256_json({"onnx": sha256_file(root / Layout.onnx_model), "data_version": meta["data_version"],
                    "source": meta.get("source", {}).get("sha256", ""), "params": made_by})


def judged_key(params: Settings) -> str:
    return sha256_json({"gates": params.gates.model_dump(mode="json"), "serving": params.serving.model_dump(mode="json")})


def find_candidate(client: MlflowClient, name: str, key: str) -> str | None:
    """The version that holds this candidate, if the registry has one (the oldest, should two ever exist)."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{CANDIDATE_TAG}` = '{key}'")
    return min((str(v.version) for v in found), key=int, default=None)


def published_version(root: str | Path, params: Settings) -> str | None:
    """The version holding this candidate, judged with today's gate params, in the registry in use; else None
    (also when the project has produced no candidate yet)."""
    name = params.registry.model_name
    if not all((Path(root) / path).is_file() for path in (Layout.transfer_model.with_suffix(".json"), Layout.onnx_model)):
        return None
    with registry_call("looking the candidate up", tracking_uri(params.registry, root)):
        use_experiment(params.registry, root)
        client = MlflowClient()
        version = find_candidate(client, name, candidate_key(Path(root), params))
        if version is None or client.get_model_version(name, version).tags.get(JUDGED_TAG) != judged_key(params):
            return None
    return version


def _actor() -> str:
    return os.environ.get("GRAFT_ACTOR") or getpass.getuser()


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version behind name@alias; None when the model or the alias does not exist (never on other errors:
    an unreachable server must not pass for "no champion")."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in error.message:
            return None
        raise


def _record(client: MlflowClient, name: str, move: AliasMove) -> AliasMove:
    key = move.key or f"{AUDIT_PREFIX}{time.time_ns()}"
    move = AliasMove(**{**asdict(move), "key": key})
    client.set_registered_model_tag(name, key, json.dumps({k: v for k, v in asdict(move).items() if k != "key"}))
    return move


def move_alias(client: MlflowClient, name: str, alias: str, version: str, action: str, reason: str, run_id: str = "") -> AliasMove:
    """Point `alias` at `version`, recorded before and after the (atomic) registry call."""
    previous = alias_version(client, name, alias)
    started = _record(client, name, AliasMove(alias, str(version), previous, action, _actor(), run_id, reason, "started",
                                               datetime.now(timezone.utc).isoformat(timespec="seconds")))
    client.set_registered_model_alias(name, alias, str(version))
    return _record(client, name, AliasMove(**{**asdict(started), "status": "completed"}))


@_classified("reading the alias history")
def history(client: MlflowClient, name: str) -> list[AliasMove]:
    """Every alias move, oldest first; a move whose `completed` record is missing shows as interrupted."""
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model named {name!r} yet; run the retraining flow (graft run) first") from None
        raise
    moves = [AliasMove(**json.loads(value), key=key) for key, value in tags.items() if key.startswith(AUDIT_PREFIX)]
    moves.sort(key=lambda m: int(m.key[len(AUDIT_PREFIX):]))
    completed = {(m.alias, m.version, m.previous, m.action, m.at) for m in moves if m.status == "completed"}
    merged = []
    for move in moves:
        if move.status == "completed":
            merged.append(move)
        elif (move.alias, move.version, move.previous, move.action, move.at) not in completed:
            merged.append(AliasMove(**{**asdict(move), "status": "interrupted"}))
    return merged


def _version_tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    try:
        return client.get_model_version(name, version).tags
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    known = sorted((str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int)
    raise RegistryError(f"{name} has no version {version!r}; registered versions: {', '.join(known) or 'none'} "
                        f"(see `graft history` for the aliases)") from None


def failed_gates(tags: dict[str, str]) -> list[str]:
    """The gates a registered version failed, by name, from its tags (gate.NAME.verdict)."""
    return sorted(gate for gate, verdict in gate_verdicts(tags).items() if verdict == "failed")


def gates_passed(client: MlflowClient, name: str, version: str) -> tuple[bool, str]:
    tags = _version_tags(client, name, version)
    verdict = tags.get(GATES_TAG)
    if verdict != "passed":
        failed = failed_gates(tags)
        why = f"failed gates: {', '.join(failed)}" if failed else f"gate verdict is {verdict!r}"
        return False, why
    return True, "every gate passed"


@contextmanager
def loaded_version(name: str, version: str, uri: str | None = None, variant: str = FP32) -> Iterator[LoadedModel]:
    """A registered version's file (FP32 unless `variant`), fetched as the server fetches it (deploy/source.py
    RegistrySource: downloaded into a fresh folder and checked against the sha256 registered for it, IntegrityError
    when it does not match) and loaded on CPU as the server loads it. `uri`: the registry (default: MLflow's now)."""
    from deploy.model import (
        load_model,  # ONNX Runtime only where a model is loaded: alias commands start fast
    )

    # A fresh cache: a copy verified earlier proves nothing about the bytes the store holds now.
    with tempfile.TemporaryDirectory() as tmp:
        source = RegistrySource(uri or mlflow.get_tracking_uri(), name, CHAMPION, tmp)
        yield load_model(source.fetch(version, variant).onnx_path, providers=["cpu"])


def _refusal(refusing: str, name: str, version: str, error: Exception) -> RegistryError:
    """One line: what is refused, which file, why, and what helps."""
    if isinstance(error, IntegrityError) and error.expected and error.actual:
        why = (f"its stored {error.file} no longer matches the sha256 registered for it (sha256 {error.actual[:16]}..., "
               f"registered {error.expected[:16]}...): it was changed or replaced after registration and the server "
               f"would refuse it too. Restore the file in the artifact store, or choose another version (graft history)")
    elif isinstance(error, IntegrityError):
        why = str(error)
    else:
        why = f"it does not load as the server loads it: {error}"
    return RegistryError(" ".join(f"refusing to {refusing} {name} v{version}: {why}".split()))


def verify_artifact(client: MlflowClient, name: str, version: str, refusing: str = "promote") -> None:
    """Every file of the version the server may serve (FP32 and each published variant) fetched from the store and
    checked against its registered sha256 exactly as the server does, and loaded on CPU: the alias never points at a
    file the server would refuse. A mismatch is a RegistryError naming the file (`refusing`: the alias move)."""
    from deploy.model import ModelLoadError, load_model

    with tempfile.TemporaryDirectory() as tmp:
        source = RegistrySource(client.tracking_uri, name, CHAMPION, tmp)
        for variant in source.variants(version):
            try:
                load_model(source.fetch(version, variant).onnx_path, providers=["cpu"])
            except (IntegrityError, ModelLoadError) as error:
                raise _refusal(refusing, name, version, error) from None


@_classified("promoting")
def promote(client: MlflowClient, name: str, version: str | None = None, reason: str = "", run_id: str = "") -> AliasMove:
    """Move champion to `version` (default: the challenger) after re-checking its gates and its artifact."""
    version = version or alias_version(client, name, CHALLENGER)
    if version is None:
        raise RegistryError(f"{name} has no {CHALLENGER!r} version to promote; run the retraining flow first")
    ok, why = gates_passed(client, name, version)
    if not ok:
        raise RegistryError(f"refusing to promote {name} v{version}: {why}")
    if alias_version(client, name, CHAMPION) == str(version):
        raise RegistryError(f"{name} v{version} is already the {CHAMPION}")
    verify_artifact(client, name, version)
    return move_alias(client, name, CHAMPION, version, "promote", reason or "promoted after passing every gate", run_id)


def champion_lineage(moves: list[AliasMove]) -> list[str]:
    """The stack of champions: a promotion pushes a version, a rollback pops back to the one before."""
    stack: list[str] = []
    for move in moves:
        if move.alias != CHAMPION or move.status != "completed":
            continue
        if move.action == "rollback" and len(stack) > 1 and stack[-2] == move.version:
            stack.pop()
        else:
            stack.append(move.version)
    return stack


@_classified("rolling back")
def rollback(client: MlflowClient, name: str, reason: str = "") -> AliasMove:
    stack = champion_lineage(history(client, name))
    if len(stack) < 2:
        raise RegistryError(f"{name} has no previous {CHAMPION} to roll back to (champion history: {stack or 'empty'})")
    target = stack[-2]
    verify_artifact(client, name, target, refusing="roll back to")
    return move_alias(client, name, CHAMPION, target, "rollback", reason or f"rolled back from v{stack[-1]}")


def format_history(moves: list[AliasMove]) -> str:
    if not moves:
        return "no alias moves recorded"
    header = f"{'when (UTC)':25} {'alias':10} {'version':>7} {'from':>5} {'action':10} {'status':11} {'by':12} {'run':12} why"
    lines = [header, "-" * len(header)]
    for m in moves:
        lines.append(f"{m.at:25} {m.alias:10} {'v' + m.version:>7} {('v' + m.previous) if m.previous else '-':>5} "
                     f"{m.action:10} {m.status:11} {m.actor[:12]:12} {m.run_id[:12]:12} {m.reason}")
    return "\n".join(lines)
