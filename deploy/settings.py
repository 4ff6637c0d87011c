"""The model server's settings, stated once, here. params.yaml's `serving` section is validated by this model;
`graft serve` and `python -m deploy.server` derive their options from its fields (`--max-batch-size` for
`max_batch_size`, help from the field's description), the server its environment variables (`GRAFT_MAX_BATCH_SIZE`),
and tests/test_serving_settings.py holds deploy/compose.yaml, deploy/.env.example and the server image to them.
A nested model (`capture`, `drift`, `shadow`, `canary`) is flattened the same way: `capture.max_bytes` is `--capture-max-bytes` and
GRAFT_CAPTURE_MAX_BYTES.

pydantic only, and nothing that loads ONNX Runtime: validating params.yaml stays fast, and the serving image has
no training code.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from deploy.variants import AUTO, VARIANTS

# The execution providers by the names params.yaml and the command line use -> ONNX Runtime's names, fastest first.
# `auto` (deploy.variants.AUTO) stands for every one that can load here.
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = frozenset({PROVIDER_NAMES["tensorrt"], PROVIDER_NAMES["cuda"]})
ProviderName = Literal[(AUTO, *PROVIDER_NAMES)]
VariantName = Literal[(AUTO, *VARIANTS)]

VARIABLE_PREFIX = "GRAFT_"  # a field's environment variable: GRAFT_ and its name in capitals
# What the server reads beside its serving settings: not params.yaml's `serving`, but where and what it serves.
MODEL_VARIABLE = "GRAFT_MODEL"  # the registered model's name (params.yaml registry.model_name)
CACHE_VARIABLE = "GRAFT_CACHE_DIR"  # the one cache folder: registry downloads, and TensorRT engines in tensorrt/
TOKEN_VARIABLE = "GRAFT_API_TOKEN"  # the API token comes from the environment (or a secret), never from a file in git


def default_cache_dir() -> Path:
    """The folder the server keeps downloaded versions and (under tensorrt/) TensorRT engines in."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "graft")


class SettingsError(ValueError):
    """A serving setting given on the command line or in the environment is not allowed; the message names it."""


class CaptureSettings(BaseModel):
    """What the server keeps of the requests it answers (deploy/capture.py): off unless the operator turns it on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="keep a sampled share of the answered requests (their input, "
                                                     "prediction and request id) and take feedback labels for them")
    sample: float = Field(default=1.0, gt=0, le=1, description="the share of answered requests to capture")
    folder: str = Field(default="captures", description="the folder captures go to, one subfolder an hour")
    max_bytes: int = Field(default=1_000_000_000, ge=1_000_000,
                           description="the capture folder's size budget in bytes: capturing stops there")


class DriftSettings(BaseModel):
    """How the server tests served features against the model's reference sample (deploy/drift.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: int = Field(default=100, ge=10, description="served requests per drift test")
    level: float = Field(default=0.01, gt=0, lt=1, description="the p-value under which a window is called drift")
    permutations: int = Field(default=200, ge=20, description="permutations of the MMD test that give its p-value")
    cpu_share: float = Field(default=0.02, gt=0, le=1,
                             description="the drift tests' share of one core at most: under heavy traffic windows "
                                         "are sampled, not all tested")


class ShadowSettings(BaseModel):
    """A second model run on a share of the requests after their answer is sent (deploy/shadow.py): how it would
    have answered, never what the client gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="also run the model behind `shadow.alias` on a share of the "
                                                     "answered requests and record how it compares")
    alias: str = Field(default="challenger", description="the registry alias to shadow and follow")
    fraction: float = Field(default=1.0, gt=0, le=1, description="the share of answered requests the shadow runs on")
    queue: int = Field(default=64, ge=1, description="requests waiting for the shadow at most: beyond, one is "
                                                     "dropped (counted), never waited for")
    threads: int = Field(default=1, ge=0, description="the shadow's ONNX Runtime intra-op threads (0: its default): "
                                                     "few, so that the champion keeps its cores")
    cpu_share: float = Field(default=0.005, gt=0, le=1,
                             description="the shadow's runs' share of one core at most: under heavy traffic the "
                                         "sampled answers beyond it are skipped (counted over_budget); 1: no cap")


class CanarySettings(BaseModel):
    """A share of live traffic answered by the version behind `canary.alias`. The share itself is live state, not a
    setting: the registry's tag graft.canary.share (deploy/tags.py), set by `graft canary` and `graft promote --ramp`,
    recorded in the audit trail, and followed by every server at each poll like the alias."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="follow the registry's canary share: answer that share of requests "
                                                    "with the version behind `canary.alias` (no share set: none)")
    alias: str = Field(default="challenger", description="the registry alias whose version is the canary")
    key_header: str = Field(default="X-Graft-Key", pattern=r"^[A-Za-z0-9-]+$",
                            description="the request header whose value decides a request's side, so that one key "
                                        "stays on one version; without it, the request id decides")


class ServingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: str = Field(default="champion", description="the registry alias to serve and follow")
    providers: list[ProviderName] = Field(
        default=[AUTO], min_length=1,
        description="ONNX Runtime execution providers in order of preference, or auto: every one that can load "
                    "here, fastest first")
    variant: VariantName = Field(
        default=AUTO,
        description="the export variant to serve: auto (the provider's best published one: INT8 on a CPU with "
                    "8-bit dot-product instructions (VNNI, AMX), FP16 on CUDA, else FP32), or that one (refused when "
                    "not published)")
    strict: bool = Field(default=False, description="refuse to serve on CPU when a GPU provider was asked for")
    host: str = Field(default="127.0.0.1", description="the address to listen on")
    port: int = Field(default=8000, ge=1, le=65535, description="the port to listen on")
    grpc_port: int = Field(default=8001, ge=0, le=65535,
                           description="the port of the KServe V2 gRPC endpoint, on the same host (0: no gRPC)")
    max_batch_size: int = Field(default=32, ge=1,
                                description="dynamic batching: at most this many requests in one model call")
    max_queue_delay_ms: float = Field(
        default=0.0, ge=0,
        description="the longest a request waits for others to join its batch (0: batches form from the requests "
                    "that queue while the model runs)")
    max_body_bytes: int = Field(default=10_000_000, ge=1024, description="the largest request body accepted, in bytes")
    poll_seconds: float = Field(default=5.0, gt=0, description="how often the server checks whether the alias moved")
    switch_lead_seconds: float = Field(
        default=8.0, gt=0,
        description="how far ahead an alias move or canary share change is scheduled: every server sees it (within "
                    "poll_seconds), loads what it needs, and switches at that moment, all together")
    threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads; 0: its default")
    pinned_versions: int = Field(
        default=2, ge=0,
        description="registered versions, beside those behind the aliases, that clients may ask for by number "
                    "(/v2/models/NAME/versions/V): loaded at the first request, the least recently asked unloaded "
                    "past this many (0: only the aliases' versions)")
    capture: CaptureSettings = Field(default_factory=CaptureSettings,
                                     description="request capture and feedback (off: a privacy decision)")
    drift: DriftSettings = Field(default_factory=DriftSettings, description="drift tests on served features")
    shadow: ShadowSettings = Field(default_factory=ShadowSettings,
                                   description="a second model on live traffic, compared, never answering")
    canary: CanarySettings = Field(default_factory=CanarySettings,
                                   description="a second version answering a share of live traffic")

    @model_validator(mode="after")
    def _lead_covers_a_poll(self) -> ServingSettings:
        if self.switch_lead_seconds <= self.poll_seconds:
            raise ValueError(f"switch_lead_seconds ({self.switch_lead_seconds:g}) must be more than poll_seconds "
                             f"({self.poll_seconds:g}), with time to load a version: servers that poll less often than "
                             f"a change's lead switch late. Raise serving.switch_lead_seconds or lower poll_seconds")
        return self


@dataclass(frozen=True)
class Setting:
    """One leaf of ServingSettings: a plain field, or a nested model's field (`capture.sample`)."""

    path: tuple[str, ...]  # ("capture", "sample")
    info: FieldInfo

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def _leaves(model: type[BaseModel], parent: tuple[str, ...] = ()) -> dict[str, Setting]:
    """Every leaf setting of `model` by its flat name: a nested model's fields join its name with `_`."""
    found: dict[str, Setting] = {}
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found.update(_leaves(info.annotation, (*parent, name)))
        else:
            found["_".join((*parent, name))] = Setting((*parent, name), info)
    return found


SETTINGS = _leaves(ServingSettings)  # flat name -> setting: `capture_max_bytes` for capture.max_bytes
FIELDS = {name: setting.info for name, setting in SETTINGS.items()}
_BY_PATH = {setting.path: name for name, setting in SETTINGS.items()}


def variable(name: str) -> str:
    """A serving setting's environment variable: `max_batch_size` -> GRAFT_MAX_BATCH_SIZE, `capture_sample` ->
    GRAFT_CAPTURE_SAMPLE."""
    return VARIABLE_PREFIX + name.upper()


def option(name: str) -> str:
    """A serving setting's command-line option: `max_batch_size` -> --max-batch-size."""
    return "--" + name.replace("_", "-")


def variables() -> dict[str, str]:
    """Every serving setting's environment variable, by field name."""
    return {name: variable(name) for name in FIELDS}


def _is_list(name: str) -> bool:
    return get_origin(FIELDS[name].annotation) is list


def allowed(name: str) -> tuple | None:
    """The values a setting allows, when the model states them as a Literal (a list's items for a list)."""
    annotation = FIELDS[name].annotation
    if _is_list(name):
        annotation = get_args(annotation)[0]
    return get_args(annotation) if get_origin(annotation) is Literal else None


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) else str(value)


def add_options(parser: argparse.ArgumentParser, environment: bool) -> None:
    """One `--kebab-name` per field, its help the field's description; a bool is `--name` / `--no-name`, a list
    comma-separated. Every option defaults to None (not given): `serving_from` fills in the environment variable
    (with `environment`), else params.yaml's value or the model's default, as the help says."""
    group = parser.add_argument_group("serving settings (params.yaml serving; deploy/settings.py)")
    for name, info in FIELDS.items():
        choices = allowed(name)
        metavar = None if choices is None else "{" + ",".join(choices) + "}" + (",..." if _is_list(name) else "")
        default = (f"${variable(name)}, else {_shown(info.default)}" if environment
                   else f"params.yaml serving.{SETTINGS[name].dotted}")
        help_text = f"{info.description} (default: {default})".replace("%", "%%")
        if info.annotation is bool:
            group.add_argument(option(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(option(name), metavar=metavar, default=None, help=help_text)


def _value(name: str, text: Any) -> Any:
    return [item.strip() for item in text.split(",")] if isinstance(text, str) and _is_list(name) else text


def serving_from(args: argparse.Namespace, base: ServingSettings | None = None,
                 environ: Mapping[str, str] | None = None) -> ServingSettings:
    """The serving settings from the options `add_options` made: each given option, else (with `environ`) its
    environment variable, else `base`'s value (params.yaml's) or the model's default; validated by the model.
    A value it refuses raises SettingsError naming the option or variable and what is allowed."""
    given: dict[str, tuple[str, Any]] = {}  # field -> (where it came from, value)
    for name in FIELDS:
        if (value := getattr(args, name, None)) is not None:
            given[name] = (option(name), _value(name, value))
        elif environ is not None and environ.get(variable(name)):  # set and not empty
            given[name] = (variable(name), _value(name, environ[variable(name)]))
    merged = base.model_dump() if base is not None else {}
    for name, (_, value) in given.items():
        *parents, leaf = SETTINGS[name].path
        node = merged
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return ServingSettings.model_validate(merged)
    except ValidationError as error:
        problems = []
        for problem in error.errors():  # pydantic's message names the allowed values or the bound
            name = _setting_at(problem["loc"])
            where = given[name][0] if name in given else f"serving.{SETTINGS[name].dotted}"
            problems.append(f"{where} {_shown(problem['input'])!r}: {problem['msg']}")
        raise SettingsError("; ".join(problems)) from None


def _setting_at(loc: tuple) -> str:
    """The flat name of the setting a pydantic error location is in: ("capture", "sample") -> capture_sample,
    ("providers", 1) -> providers (the location goes on into a list's items)."""
    return next(_BY_PATH[tuple(loc[:end])] for end in range(len(loc), 0, -1) if tuple(loc[:end]) in _BY_PATH)
