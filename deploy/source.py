"""Where the served model comes from: a registry alias (followed as it moves) or a fixed ONNX file.

Against an MLflow tracking server (http/https URI) this speaks MLflow's REST API with httpx, so the serving
image needs no mlflow package. For the embedded sqlite/file store of a laptop set-up there is no server to
ask, so the mlflow package is imported for that case only.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import httpx

ONNX_FILE = "model.onnx"


class SourceError(RuntimeError):
    pass


@dataclass(frozen=True)
class ResolvedModel:
    version: str
    onnx_path: Path
    tags: dict[str, str] = field(default_factory=dict)


class FileSource:
    """One ONNX file, never reloaded."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def current_version(self) -> str:
        return "file"

    def fetch(self, version: str) -> ResolvedModel:
        return ResolvedModel(version, self.path, {})

    def describe(self) -> str:
        return str(self.path)


class RegistrySource:
    """`name@alias` in an MLflow registry; each version is downloaded once into cache_dir/name/version."""

    def __init__(self, tracking_uri: str, name: str, alias: str, cache_dir: str | Path, timeout: float = 30.0) -> None:
        self.tracking_uri, self.name, self.alias = tracking_uri.rstrip("/"), name, alias
        self.cache_dir = Path(cache_dir)
        self.remote = urlparse(tracking_uri).scheme in ("http", "https")
        self._http = httpx.Client(base_url=self.tracking_uri, timeout=timeout) if self.remote else None
        self._client = None

    def describe(self) -> str:
        return f"models:/{self.name}@{self.alias} at {self.tracking_uri}"

    # ------------------------------------------------------------ MLflow REST (a tracking server)

    def _get(self, path: str, **params) -> dict:
        try:
            response = self._http.get(f"/api/2.0/mlflow/{path}", params=params)
        except httpx.TransportError as error:
            raise SourceError(f"cannot reach the registry at {self.tracking_uri}: {error}") from None
        if response.status_code in (400, 404) and "not found" in response.text:  # no such model, version or alias
            raise SourceError(f"{self.name}@{self.alias} not found at {self.tracking_uri}: {response.text[:200]}")
        if response.status_code >= 400:
            raise SourceError(f"registry at {self.tracking_uri} answered {response.status_code}: {response.text[:200]}")
        return response.json()

    def _download_remote(self, version: str, dest: Path) -> None:
        uri = self._get("model-versions/get-download-uri", name=self.name, version=version)["artifact_uri"]
        parsed = urlparse(uri)
        if parsed.scheme != "mlflow-artifacts":
            raise SourceError(f"artifact URI {uri!r} is not served by the tracking server; start it with --serve-artifacts")
        path = quote(f"{parsed.path.lstrip('/')}/{ONNX_FILE}")
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

    def _tags(self, version: str) -> dict[str, str]:
        if self.remote:
            raw = self._get("model-versions/get", name=self.name, version=version)["model_version"].get("tags", [])
            return {t["key"]: t.get("value", "") for t in raw}
        return dict(self._local().get_model_version(self.name, version).tags)

    def fetch(self, version: str) -> ResolvedModel:
        target = self.cache_dir / self.name / version / ONNX_FILE
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
            os.close(fd)
            try:
                if self.remote:
                    self._download_remote(version, Path(tmp))
                else:
                    uri = self._local().get_model_version_download_uri(self.name, version)
                    if urlparse(uri).scheme not in ("", "file"):
                        raise SourceError(f"cannot read {uri!r} without a tracking server")
                    shutil.copyfile(Path(unquote(urlparse(uri).path)) / ONNX_FILE, tmp)
                os.replace(tmp, target)  # a half-downloaded file never takes the final name
            finally:
                Path(tmp).unlink(missing_ok=True)
        return ResolvedModel(version, target, self._tags(version))
