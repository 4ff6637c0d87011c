"""Aliases in the MLflow registry, with an audit trail MLflow itself does not keep.

`challenger` marks a version that passed every gate; `champion` is what production serves; the canary share
(deploy/canary.py: the percent of live traffic that serving.canary.alias's version answers) is the registered model's
tag graft.canary.share. Every alias move and share change is recorded as a registered-model tag `graft.audit.<ns timestamp>` holding JSON: alias, version, previous
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from components.artifacts import read_json, sha256_json, write_json
from components.config import Params
from components.settings import RegistryParams, Settings, load_settings
from components.errors import GraftError, RegistryUnavailable
from components.layout import Layout
from deploy.digest import sha256_file
from deploy.source import (
    IntegrityError,
    NotFound,
    RegistrySource,
    RegistryUnreachable,
    SourceError,
    check_server,
    check_store_exists,
    sqlite_file,
)
from deploy.canary import ShareError, parse_share
from deploy.tags import (
    AUDIT_PREFIX,
    CANARY_SHARE_TAG,
    CANDIDATE_TAG,
    GATES_TAG,
    JUDGED_TAG,
    TRAFFIC_AT_TAG,
    gate_verdicts,
)
from deploy.variants import FP32

if TYPE_CHECKING:
    from mlflow import MlflowClient

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
    share: float | None = None           # a canary share change (action canary, or rollback of one): the new percent
    previous_share: float | None = None  # ... and the one before
    effective: str | None = None         # when servers switch to it (ISO, UTC, ms): serving.switch_lead_seconds after
                                         # it was made (None in records written before changes were scheduled)


def tracking_uri(registry: RegistryParams, root: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI, else params; an embedded store's relative path is relative to the project folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or registry.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path(root) / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def _check_reachable(uri: str) -> None:
    """A tracking server that does not answer is named within seconds (MLflow's own client retries for minutes)."""
    if uri.startswith(("http://", "https://")):
        with registry_call("opening the registry", uri):
            check_server(uri)


def use_store(registry: RegistryParams, root: str | Path = ".") -> str:
    """Point MLflow at the configured store; its URI. A server that does not answer is named within seconds."""
    uri = tracking_uri(registry, root)
    _check_reachable(uri)
    import mlflow  # here, not at the top: `graft history` answers from its cache without MLflow (read_history)

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
    import mlflow

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
    _check_reachable(uri)
    # A client of its own: alias commands log no runs, so MLflow's global tracking URI (whose setting also resets
    # its tracing provider) is left alone.
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri), params.registry.model_name


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
    from mlflow import MlflowClient

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
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in error.message:
            return None
        raise


def _record(client: MlflowClient, name: str, move: AliasMove) -> AliasMove:
    key = move.key or f"{AUDIT_PREFIX}{time.time_ns()}"
    move = AliasMove(**{**asdict(move), "key": key})
    fields = {k: v for k, v in asdict(move).items() if k != "key" and (v is not None or k not in OPTIONAL_FIELDS)}
    client.set_registered_model_tag(name, key, json.dumps(fields))
    return move


OPTIONAL_FIELDS = ("share", "previous_share", "effective")  # only a canary share change has the first two


def _schedule(client: MlflowClient, name: str, lead_seconds: float) -> str:
    """Say when the traffic change about to be made takes effect: `lead_seconds` from now (TRAFFIC_AT_TAG, written
    before the change, so a server that sees the change reads its moment too, and every server switches then); that
    moment as ISO time."""
    ms = round((time.time() + lead_seconds) * 1000)  # whole milliseconds: the tag and the ISO time say the same
    client.set_registered_model_tag(name, TRAFFIC_AT_TAG, f"{ms // 1000}.{ms % 1000:03d}")
    moment = datetime.fromtimestamp(ms // 1000, timezone.utc).replace(microsecond=ms % 1000 * 1000)
    return moment.isoformat(timespec="milliseconds")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _scheduled_change(client: MlflowClient, name: str, move: AliasMove, lead_seconds: float,
                      change: Callable[[], object]) -> AliasMove:
    """`change` (one registry call) recorded before and after as `move`, taking effect `lead_seconds` later."""
    started = _record(client, name, move)
    effective = _schedule(client, name, lead_seconds)
    change()
    return _record(client, name, replace(started, status="completed", effective=effective))


def move_alias(client: MlflowClient, name: str, alias: str, version: str, action: str, reason: str, run_id: str = "",
               lead_seconds: float = 0.0) -> AliasMove:
    """Point `alias` at `version`, recorded before and after the (atomic) registry call; servers following it switch
    `lead_seconds` later, together."""
    previous = alias_version(client, name, alias)
    move = AliasMove(alias, str(version), previous, action, _actor(), run_id, reason, "started", _now())
    return _scheduled_change(client, name, move, lead_seconds,
                             lambda: client.set_registered_model_alias(name, alias, str(version)))


def _no_model(name: str) -> RegistryError:
    return RegistryError(f"no registered model named {name!r} yet; run the retraining flow (graft run) first")


@_classified("reading the alias history")
def history(client: MlflowClient, name: str) -> list[AliasMove]:
    """Every alias move, oldest first; a move whose `completed` record is missing shows as interrupted."""
    from mlflow.exceptions import MlflowException

    try:
        return moves_in(client.get_registered_model(name).tags)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise _no_model(name) from None
        raise


def moves_in(tags: dict[str, str]) -> list[AliasMove]:
    """The alias moves a registered model's tags record (history)."""
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


def sqlite_change_key(uri: str) -> list[int] | None:
    """What changes whenever an embedded SQLite store is written: its file's identity, size and time, and SQLite's own
    change counter (the header's bytes 24-27, incremented by every write transaction in rollback-journal mode). None
    where no such key exists: another kind of store, a missing file, or a WAL-mode database (its writes sit in the
    -wal file and leave the counter)."""
    path = sqlite_file(uri)
    if path is None:
        return None
    try:
        status = path.stat()
        with path.open("rb") as store:
            header = store.read(100)
    except OSError:
        return None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0") or header[18] == 2 or Path(f"{path}-wal").exists():
        return None
    return [status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, int.from_bytes(header[24:28], "big")]


def read_history(params_path: str | Path) -> list[AliasMove]:
    """`graft history`'s read: every alias move (history). On an embedded SQLite store the answer is kept in
    .graft/cache, keyed on the store's change key (sqlite_change_key) and read back while the key holds, so that a
    store nothing has written since needs no MLflow, whose import is most of the command's time. Any write (an alias
    move, a run) changes the key; the key is taken before the read, so a write during it only makes the next read
    fresh."""
    params = load_settings(params_path)
    root = Path(params_path).parent
    uri, name = tracking_uri(params.registry, root), params.registry.model_name
    key = sqlite_change_key(uri)
    if key is not None:
        try:
            kept = read_json(root / Layout.history_cache)
            if (kept["uri"], kept["model"], kept["key"]) == (uri, name, key):
                return [AliasMove(**move) for move in kept["moves"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache yet, or one written by another Graft: read the store
    if uri.startswith(("http://", "https://")):
        return _history_from_server(uri, name)
    moves = history(*open_registry(params_path))
    if key is not None:
        _keep_history(root, uri, name, key, moves)
    return moves


def remember_history(client: MlflowClient, root: str | Path, registry: RegistryParams) -> None:
    """After this process wrote the registry (an alias move, a registration), with MLflow loaded anyway: its history
    read now and kept as read_history keeps it, so that the next `graft history` needs no MLflow. The key is taken
    before the read, as there. A store without a change key keeps nothing (a server is read without MLflow)."""
    uri = tracking_uri(registry, root)
    key = sqlite_change_key(uri)
    if key is not None:
        _keep_history(Path(root), uri, registry.model_name, key, history(client, registry.model_name))


def _keep_history(root: Path, uri: str, name: str, key: list[int], moves: list[AliasMove]) -> None:
    write_json(root / Layout.history_cache, {"uri": uri, "model": name, "key": key, "moves": [asdict(m) for m in moves]})


def _history_from_server(uri: str, name: str) -> list[AliasMove]:
    """history through a tracking server, read with the REST reader serving uses (deploy/source.py), not MLflow's
    client: the command then needs no MLflow import, most of its time."""
    with registry_call("reading the alias history", uri), tempfile.TemporaryDirectory() as nothing_fetched:
        try:
            return moves_in(RegistrySource(uri, name, CHAMPION, nothing_fetched).model_tags())
        except NotFound:
            raise _no_model(name) from None


def _version_tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    return _model_version(client, name, version).tags


def _model_version(client: MlflowClient, name: str, version: str):
    """The registered version; a RegistryError listing the known ones when there is no such version."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    known = sorted((str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int)
    raise RegistryError(f"{name} has no version {version!r}; registered versions: {', '.join(known) or 'none'} "
                        f"(see `graft history` for the aliases)") from None


def download_run_files(client: MlflowClient, name: str, version: str, files: list[str], dest: Path,
                       what: str) -> list[Path]:
    """Files of a registered version's MLflow run (paths inside the run's artifacts), into `dest`; a RegistryError
    naming `what` is missing when one is not there."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    run_id = _model_version(client, name, version).run_id  # an unknown version: the error that lists the known ones
    try:
        return [Path(download_artifacts(run_id=run_id, artifact_path=file, dst_path=str(dest), tracking_uri=client.tracking_uri))
                for file in files]
    except (MlflowException, OSError):
        raise RegistryError(f"{name} v{version} has no {what} in its run {run_id} (registered before Graft stored it, "
                            f"or the file was removed): name a version registered since (graft history lists them)") from None


def read_card(client: MlflowClient, name: str, version: str) -> str:
    """A registered version's model card, fetched as the server fetches it (components/register.py log_card)."""
    _version_tags(client, name, version)  # an unknown version: the error that lists the known ones
    with tempfile.TemporaryDirectory() as tmp:
        card = RegistrySource(client.tracking_uri, name, CHAMPION, tmp).card(version)
    if card is None:
        raise RegistryError(f"{name} v{version} has no model card (registered before Graft wrote cards, or the file "
                            f"was removed): `graft publish` in the project that made it writes one")
    return card.text


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
        import mlflow

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
def promote(client: MlflowClient, name: str, version: str | None = None, reason: str = "", run_id: str = "",
            lead_seconds: float = 0.0) -> AliasMove:
    """Move champion to `version` (default: the challenger) after re-checking its gates and its artifact; servers
    switch `lead_seconds` later."""
    version = version or alias_version(client, name, CHALLENGER)
    if version is None:
        raise RegistryError(f"{name} has no {CHALLENGER!r} version to promote; run the retraining flow first")
    ok, why = gates_passed(client, name, version)
    if not ok:
        raise RegistryError(f"refusing to promote {name} v{version}: {why}")
    if alias_version(client, name, CHAMPION) == str(version):
        raise RegistryError(f"{name} v{version} is already the {CHAMPION}")
    verify_artifact(client, name, version)
    return move_alias(client, name, CHAMPION, version, "promote", reason or "promoted after passing every gate", run_id,
                      lead_seconds)


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


def canary_share(client: MlflowClient, name: str) -> float:
    """The canary share the registry holds now, in percent (no tag: 0)."""
    return parse_share(client.get_registered_model(name).tags.get(CANARY_SHARE_TAG))


@_classified("setting the canary share")
def set_canary_share(client: MlflowClient, name: str, alias: str, share: float | str, action: str = "canary",
                     reason: str = "", lead_seconds: float = 0.0) -> AliasMove:
    """Let `alias`'s version answer `share` percent of live traffic on every server that follows the registry
    (serving.canary) from `lead_seconds` on, recorded before and after like an alias move. A share above 0 needs a gate-passing version
    behind `alias` that is not the champion."""
    try:
        share = parse_share(share)
    except ShareError as error:
        raise RegistryError(str(error)) from None
    version = alias_version(client, name, alias)
    if share > 0:
        if version is None:
            raise RegistryError(f"{name} has no {alias!r} version to canary (serving.canary.alias); a retrain that "
                                f"passes every gate registers one (graft run)")
        if version == alias_version(client, name, CHAMPION):
            raise RegistryError(f"{name}@{alias} is v{version}, the {CHAMPION} itself: there is nothing to canary")
        ok, why = gates_passed(client, name, version)
        if not ok:
            raise RegistryError(f"refusing to canary {name} v{version}: {why}")
    previous = canary_share(client, name)
    move = AliasMove(alias, version or "-", None, action, _actor(), "", reason or f"canary share {previous:g}% -> {share:g}%",
                     "started", _now(), share=share, previous_share=previous)
    return _scheduled_change(client, name, move, lead_seconds,
                             lambda: client.set_registered_model_tag(name, CANARY_SHARE_TAG, f"{share:g}"))


@_classified("rolling back")
def rollback(client: MlflowClient, name: str, reason: str = "", canary_alias: str = CHALLENGER,
             lead_seconds: float = 0.0) -> AliasMove:
    """Move traffic back, on every server together `lead_seconds` later: a live canary's share to 0 (the champion
    answers everything again), else the champion alias back to the champion before it."""
    if canary_share(client, name) > 0:
        return set_canary_share(client, name, canary_alias, 0, "rollback", reason or "canary rolled back", lead_seconds)
    stack = champion_lineage(history(client, name))
    if len(stack) < 2:
        raise RegistryError(f"{name} has no previous {CHAMPION} to roll back to (champion history: {stack or 'empty'})")
    target = stack[-2]
    verify_artifact(client, name, target, refusing="roll back to")
    return move_alias(client, name, CHAMPION, target, "rollback", reason or f"rolled back from v{stack[-1]}",
                      lead_seconds=lead_seconds)


def format_history(moves: list[AliasMove]) -> str:
    if not moves:
        return "no alias moves recorded"
    header = (f"{'when (UTC)':25} {'alias':10} {'version':>7} {'from':>5} {'share':>12} {'action':10} {'status':11} "
              f"{'by':12} {'run':12} why")
    lines = [header, "-" * len(header)]
    for m in moves:
        share = "-" if m.share is None else f"{m.previous_share:g}% -> {m.share:g}%"
        version = m.version if m.version == "-" else "v" + m.version
        lines.append(f"{m.at:25} {m.alias:10} {version:>7} {('v' + m.previous) if m.previous else '-':>5} {share:>12} "
                     f"{m.action:10} {m.status:11} {m.actor[:12]:12} {m.run_id[:12]:12} {m.reason}")
    return "\n".join(lines)


@dataclass(frozen=True)
class TrafficSpan:
    """From `since`, which versions answered which percent of live traffic (on servers following the registry)."""

    since: str
    shares: dict[str, float]  # version -> percent


def traffic_timeline(moves: list[AliasMove], canary_alias: str = CHALLENGER) -> list[TrafficSpan]:
    """Who answered live traffic when, from the audit trail: the champion all of it, but the canary share, which
    the version behind `canary_alias` answered while it was set and that version was not the champion."""
    champion = canary = None
    share, spans = 0.0, []
    for move in moves:
        if move.status != "completed":
            continue
        if move.share is not None:
            share = move.share
        elif move.alias == CHAMPION:
            champion = move.version
        elif move.alias == canary_alias:
            canary = move.version
        else:
            continue
        if champion is None:
            continue
        live = canary is not None and canary != champion and share > 0
        shares = {champion: 100.0 - share, canary: share} if live else {champion: 100.0}
        if not spans or spans[-1].shares != shares:
            spans.append(TrafficSpan(move.effective or move.at, shares))
    return spans


def format_traffic(spans: list[TrafficSpan]) -> str:
    if not spans:
        return "no champion yet: nothing has answered live traffic"
    lines = [f"{'since (UTC)':25} answered by", "-" * 50]
    for span in spans:
        lines.append(f"{span.since:25} " + ", ".join(f"v{version} {share:g}%" for version, share in span.shares.items()))
    return "\n".join(lines)
