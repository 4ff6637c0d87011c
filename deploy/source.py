"""Where the served model comes from: a registry alias (followed as it moves) or a fixed ONNX file.

Against an MLflow tracking server (http/https URI) this speaks MLflow's REST API with httpx, so the serving
image needs no mlflow package. For the embedded sqlite/file store of a laptop set-up there is no server to
ask, so the mlflow package is imported for that case only.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import httpx

from deploy.digest import sha256_file
from deploy.tags import CARD_ARTIFACT, CARD_MISTAKES
from deploy.variants import (
    FP32,
    ONNX_SHA_TAG,
    VARIANTS,
    published_in,
    relative_path,
    sha_tag,
    variant_path,
)

log = logging.getLogger("graft.registry")


class SourceError(RuntimeError):
    pass


class IntegrityError(SourceError):
    """The registry's copy of a version is not the file that was registered: it is refused, never served. `file`
    (relative to the version's folder), `actual` and `expected` (sha256) say which file and how; `expected` is ""
    when the version has no hash to check against."""

    def __init__(self, message: str, file: str = "", actual: str = "", expected: str = "") -> None:
        super().__init__(message)
        self.file, self.actual, self.expected = file, actual, expected


@dataclass(frozen=True)
class ModelCard:
    """A registered version's model card (Markdown) and the image of its most confident test mistakes."""

    text: str
    mistakes_png: bytes | None = None


class NotFound(SourceError):
    """The registry has no such model, version or alias."""


class RegistryUnreachable(SourceError):
    """No MLflow server answered at the tracking URI (refused, timed out, or a 5xx answer): trying later may pass."""


class NoRegistry(SourceError):
    """The local store named does not exist; opening it would create an empty one, whose alias never appears."""


def configured_by() -> str:
    """Where the tracking URI in use was set, for messages (the variable wins over params.yaml)."""
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "registry.tracking_uri"


def check_server(tracking_uri: str, attempts: int = 3, pause: float = 1.0, timeout: float = 2.0) -> None:
    """Ask an MLflow server's /health a few times, quickly: a server that is not there is named in seconds.

    MLflow's own client retries a refused connection for minutes without a word (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    _BACKOFF_FACTOR), which suits a server that blinks mid-run, not one that was never started."""
    for attempt in range(1, attempts + 1):
        try:
            # Only "is a server there" is asked: no credentials go out and nothing in the answer is trusted, so the
            # certificate is left to the client that makes the real calls (it may be told a private CA).
            status = httpx.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout, verify=False).status_code
            if status < 500:  # any answer from the server itself (a 401 or 404 too): the real calls will tell
                return
            why = f"it answered {status}"
        except httpx.TransportError as error:
            why = str(error) or type(error).__name__
        if attempt < attempts:
            log.warning("registry at %s not answering (attempt %d/%d: %s), retrying in %g s", tracking_uri, attempt,
                        attempts, why, pause)
            time.sleep(pause)
    parsed = urlparse(tracking_uri)
    fix = ("unset MLFLOW_TRACKING_URI to use the project's own store" if configured_by() == "MLFLOW_TRACKING_URI"
           else "fix registry.tracking_uri in params.yaml")
    raise RegistryUnreachable(
        f"no MLflow server answers at {tracking_uri} ({why}; {attempts} attempts): start it (mlflow server --host "
        f"{parsed.hostname} --port {parsed.port or (443 if parsed.scheme == 'https' else 80)} --backend-store-uri "
        f"sqlite:///mlflow.db) or {fix}")


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file an embedded sqlite store's URI names (its query left out); None for any other store, or an
    in-memory one."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    name = unquote(tracking_uri.removeprefix("sqlite:///").split("?")[0])
    return None if name in ("", ":memory:") else Path(name).resolve()


def check_store_exists(tracking_uri: str) -> None:
    """For a reader: refuse a sqlite store whose file is missing (a mistyped path), which MLflow would create empty."""
    path = sqlite_file(tracking_uri)
    if path is not None and not path.exists():
        raise NoRegistry(f"no MLflow registry at {path} ({configured_by()}): check the path; a registry is created by "
                         f"the first `graft run`")


def registry_identity(tracking_uri: str) -> str:
    """What tells two registries apart: a server's address, or a local store's absolute path."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        return f"{parsed.scheme}://{(parsed.netloc or '').lower()}{parsed.path.rstrip('/')}"
    if parsed.scheme == "sqlite":
        return f"sqlite:{Path(unquote(tracking_uri.removeprefix('sqlite:///'))).resolve()}"
    return f"file:{Path(unquote(parsed.path or tracking_uri)).resolve()}"


@dataclass(frozen=True)
class ResolvedModel:
    version: str
    onnx_path: Path
    tags: dict[str, str] = field(default_factory=dict)
    variant: str = FP32


class FileSource:
    """One ONNX file (and the variants export wrote beside it), never reloaded."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def current_version(self) -> str:
        return "file"

    def card(self, version: str) -> ModelCard | None:
        """A file has no registry entry, so no model card."""
        return None

    def variants(self, version: str) -> list[str]:
        return [v for v in VARIANTS if v == FP32 or variant_path(self.path, v).is_file()]

    def fetch(self, version: str, variant: str = FP32) -> ResolvedModel:
        return ResolvedModel(version, variant_path(self.path, variant), {}, variant)

    def describe(self) -> str:
        return str(self.path)


class RegistrySource:
    """`name@alias` in an MLflow registry. A version's file is kept in cache_dir under the registry's identity and
    its registered sha256, and checked against that hash every time it is about to be served: two projects (or
    two registries) with the same model name and version never share a file, and changed bytes are refused."""

    def __init__(self, tracking_uri: str, name: str, alias: str, cache_dir: str | Path, timeout: float = 30.0) -> None:
        self.tracking_uri, self.name, self.alias = tracking_uri.rstrip("/"), name, alias
        self._given = (cache_dir, timeout)
        identity = registry_identity(self.tracking_uri)
        self.cache_dir = Path(cache_dir) / f"{urlparse(self.tracking_uri).scheme}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
        self.remote = urlparse(tracking_uri).scheme in ("http", "https")
        # Reading only: a server that is not there, or a store file that is not, is named now, not waited on.
        if self.remote:
            check_server(self.tracking_uri)
        else:
            check_store_exists(self.tracking_uri)
        # Plain http never uses TLS (and redirects are not followed): no certificate store to load (20-50 ms).
        self._http = httpx.Client(base_url=self.tracking_uri, timeout=timeout,
                                  verify=urlparse(tracking_uri).scheme == "https") if self.remote else None
        self._client = None

    def describe(self) -> str:
        return f"models:/{self.name}@{self.alias} at {self.tracking_uri}"

    def for_alias(self, alias: str) -> RegistrySource:
        """The same registered model in the same registry and cache, behind another alias."""
        return RegistrySource(self.tracking_uri, self.name, alias, *self._given)

    # ------------------------------------------------------------ MLflow REST (a tracking server)

    def _get(self, path: str, **params) -> dict:
        try:
            response = self._http.get(f"/api/2.0/mlflow/{path}", params=params)
        except httpx.TransportError as error:
            raise RegistryUnreachable(f"cannot reach the registry at {self.tracking_uri}: {error}") from None
        if response.status_code in (400, 404) and "not found" in response.text:  # no such model, version or alias
            raise NotFound(f"{self.name}@{self.alias} not found at {self.tracking_uri}: {response.text[:200]}")
        if response.status_code >= 500:  # the server's trouble, not the request's
            raise RegistryUnreachable(f"registry at {self.tracking_uri} answered {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise SourceError(f"registry at {self.tracking_uri} answered {response.status_code}: {response.text[:200]}")
        return response.json()

    def _download_remote(self, version: str, file: str, dest: Path) -> None:
        uri = self._get("model-versions/get-download-uri", name=self.name, version=version)["artifact_uri"]
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            # A version registered on the embedded store before that database was put behind `mlflow server` keeps
            # its file:// URI: readable on the machine that holds it (and hash-checked like any), refused elsewhere.
            if not Path(unquote(parsed.path)).is_dir():
                raise SourceError(
                    f"{self.name} v{version}: the tracking server gives its files as {uri!r}, a folder this machine "
                    f"does not have (registered on an embedded store, then served without --serve-artifacts): run "
                    f"where that folder is, or publish the model again through a server started with --serve-artifacts")
            self._copy_stored(uri, version, file, dest)
            return
        if parsed.scheme != "mlflow-artifacts":
            raise SourceError(f"artifact URI {uri!r} is not served by the tracking server; start it with --serve-artifacts")
        path = quote(f"{parsed.path.lstrip('/')}/{file}")
        with self._http.stream("GET", f"/api/2.0/mlflow-artifacts/artifacts/{path}") as response:
            response.raise_for_status()
            with open(dest, "wb") as handle:
                for chunk in response.iter_bytes(1 << 20):
                    handle.write(chunk)

    # ------------------------------------------------------------ the embedded store (sqlite / file)

    def _local(self):
        if self._client is None:
            from mlflow import (
                MlflowClient,  # only here: a serving image talks to a server and lacks mlflow
            )

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # ------------------------------------------------------------

    def current_version(self) -> str:
        if self.remote:
            return str(self._get("registered-models/alias", name=self.name, alias=self.alias)["model_version"]["version"])
        from mlflow.exceptions import MlflowException

        try:
            return str(self._local().get_model_version_by_alias(self.name, self.alias).version)
        except MlflowException as error:
            raise SourceError(f"{self.name}@{self.alias} not found at {self.tracking_uri}: {error.message}") from None

    def model_tag(self, key: str) -> str | None:
        """A tag of the registered model itself (not of a version); None when it is not set."""
        return self.model_tags().get(key)

    def model_tags(self) -> dict[str, str]:
        """The registered model's own tags (not a version's); NotFound when no model of that name is registered."""
        if self.remote:
            try:
                raw = self._get("registered-models/get", name=self.name)["registered_model"].get("tags", [])
            except NotFound:
                raise NotFound(f"no registered model named {self.name!r} at {self.tracking_uri}") from None
            return {t["key"]: t.get("value", "") for t in raw}
        from mlflow.exceptions import MlflowException

        try:
            return dict(self._local().get_registered_model(self.name).tags)
        except MlflowException as error:
            raise NotFound(f"{self.name} not found at {self.tracking_uri}: {error.message}") from None

    def _tags(self, version: str) -> dict[str, str]:
        if self.remote:
            raw = self._get("model-versions/get", name=self.name, version=version)["model_version"].get("tags", [])
            return {t["key"]: t.get("value", "") for t in raw}
        from mlflow.exceptions import MlflowException

        try:
            return dict(self._local().get_model_version(self.name, version).tags)
        except MlflowException as error:
            raise SourceError(f"{self.name} v{version} not found at {self.tracking_uri}: {error.message}") from None

    def _download(self, version: str, file: str, dest: Path) -> None:
        if self.remote:
            self._download_remote(version, file, dest)
            return
        uri = self._local().get_model_version_download_uri(self.name, version)
        if urlparse(uri).scheme not in ("", "file"):
            raise SourceError(f"cannot read {uri!r} without a tracking server")
        self._copy_stored(uri, version, file, dest)

    def _copy_stored(self, uri: str, version: str, file: str, dest: Path) -> None:
        """`file` of a version whose artifacts lie in the local folder `uri` (file://), copied to `dest`."""
        stored = Path(unquote(urlparse(uri).path)) / file
        if not stored.is_file():
            raise IntegrityError(f"{self.name} v{version} at {self.tracking_uri}: the artifact store has no {file} "
                                 f"({stored}): refused (it was deleted or moved after registration)", file)
        shutil.copyfile(stored, dest)

    def card(self, version: str) -> ModelCard | None:
        """The version's model card (written at publishing), or None when it has none. Not hash-checked: it
        describes the model, the server never runs it."""
        files: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for file in (CARD_ARTIFACT, CARD_MISTAKES):
                try:
                    self._download(version, file, Path(tmp) / "file")
                except (SourceError, httpx.HTTPError, OSError):  # none stored, or not reachable now: the page says so
                    continue
                files[file] = (Path(tmp) / "file").read_bytes()
        if CARD_ARTIFACT not in files:
            return None
        return ModelCard(files[CARD_ARTIFACT].decode("utf-8"), files.get(CARD_MISTAKES))

    def variants(self, version: str) -> list[str]:
        """The variants this version was published with (at least FP32, which every check below needs)."""
        return [FP32, *[v for v in published_in(self._tags(version)) if v != FP32]]

    def fetch(self, version: str, variant: str = FP32) -> ResolvedModel:
        tags = self._tags(version)
        if not tags.get(ONNX_SHA_TAG):
            raise IntegrityError(f"{self.name} v{version} has no {ONNX_SHA_TAG} tag (registered by an older Graft, or not "
                                 f"by Graft), so its file cannot be checked: publish it again with `graft publish`",
                                 relative_path(FP32))
        expected = tags.get(sha_tag(variant))
        if not expected:
            raise SourceError(f"{self.name} v{version} has no {variant} variant ({sha_tag(variant)} is not among its tags)")
        file = relative_path(variant)
        target = self.cache_dir / self.name / version / expected / Path(file).name
        if target.is_file() and sha256_file(target) == expected:
            return ResolvedModel(version, target, tags, variant)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        os.close(fd)
        try:
            self._download(version, file, Path(tmp))
            actual = sha256_file(tmp)
            if actual != expected:
                raise IntegrityError(f"{self.name} v{version} at {self.tracking_uri}: the artifact store's {file} has "
                                     f"sha256 {actual[:16]}..., the registered file {expected[:16]}...: refused (it was "
                                     f"changed or replaced after registration)", file, actual, expected)
            os.replace(tmp, target)  # only whole, verified bytes take the final name
        finally:
            Path(tmp).unlink(missing_ok=True)
        return ResolvedModel(version, target, tags, variant)
