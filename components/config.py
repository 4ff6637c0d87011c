"""The one validated model of params.yaml.

Every component reads its knobs from here; an unknown key or a bad value fails at load time with a
message that names the key, what was given and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import GraftError

Strategy = Literal["scratch", "linear_probe", "finetune", "lp_ft"]
STRATEGIES: tuple[str, ...] = Strategy.__args__


class ParamsError(GraftError, ValueError):
    """params.yaml is missing, unreadable or invalid; the message names each bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetParams(_Strict):
    name: str = Field(min_length=1)
    format: Literal["idx", "folder"]
    path: str
    val_size: int = Field(ge=0)
    test_size: int = Field(ge=0)
    labels_per_class: int | None = Field(default=None, ge=1)


class DataParams(_Strict):
    source: DatasetParams
    target: DatasetParams
    image_size: int = Field(ge=8, le=512)
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    split_seed: int = 42
    min_images_per_class: int = Field(default=3, ge=1)
    bad_files: Literal["quarantine", "fail"] = "quarantine"

    @model_validator(mode="after")
    def _one_norm_value_per_channel(self) -> DataParams:
        for key in ("mean", "std"):
            if len(getattr(self, key)) != self.channels:
                raise ValueError(f"data.{key} needs one value a channel: {self.channels} value(s) for channels={self.channels}")
        if any(s <= 0 for s in self.std):
            raise ValueError("data.std values must be > 0")
        return self


class ModelParams(_Strict):
    widths: list[int] = Field(min_length=1)


class Augment(_Strict):
    flip: bool = False
    rotate_degrees: float = Field(default=0.0, ge=0, le=180)
    scale: tuple[float, float] = (1.0, 1.0)
    shift_pixels: float = Field(default=0.0, ge=0)


class TrainParams(_Strict):
    """Knobs of the one training loop; pretraining and fine-tuning each get a copy."""

    batch_size: int = Field(ge=1)
    optimizer: Literal["sgd", "adamw"]
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_fraction: float = Field(default=0.0, ge=0, lt=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augment: Augment = Augment()
    eval_every_steps: int = Field(default=0, ge=0)


class PretrainParams(TrainParams):
    epochs: int = Field(ge=1)
    seed: int = 0  # its own seed: changing the target's `seed` must not redo the expensive pretraining


class FinetuneParams(TrainParams):
    strategy: Strategy
    steps: int = Field(ge=1)
    backbone_lr_scale: float = Field(default=0.1, gt=0)
    lp_steps: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _lp_steps_fit(self) -> FinetuneParams:
        if self.strategy == "lp_ft" and self.lp_steps >= self.steps:
            raise ValueError(f"finetune.lp_steps ({self.lp_steps}) must be < finetune.steps ({self.steps}) for lp_ft")
        return self


class ExportParams(_Strict):
    opset: int = Field(default=20, ge=17)
    parity_atol: float = Field(default=1e-4, gt=0)


class GateParams(_Strict):
    min_accuracy: float = Field(default=0.0, ge=0, le=1)
    min_macro_f1: float = Field(default=0.0, ge=0, le=1)
    min_transfer_gain: float = Field(default=0.0, ge=-1, le=1)  # transfer minus scratch test accuracy
    max_regression: float = Field(default=0.01, ge=0, le=1)      # how much worse than the champion is tolerated
    regression_mode: Literal["absolute", "relative"] = "absolute"
    large_batch: int = Field(default=256, ge=2)
    max_latency_ms_batch1: float = Field(default=50.0, gt=0)
    max_latency_ms_large_batch: float = Field(default=1000.0, gt=0)
    max_model_mb: float = Field(default=100.0, gt=0)


class PromotionParams(_Strict):
    auto_promote: bool = False  # the first model that passes every gate is always promoted


ProviderName = Literal["tensorrt", "cuda", "cpu"]


class ServingParams(_Strict):
    alias: str = "champion"
    providers: list[ProviderName] = Field(default=["tensorrt", "cuda", "cpu"], min_length=1)
    strict: bool = False  # refuse to serve on CPU when a GPU provider was asked for
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    max_body_bytes: int = Field(default=10_000_000, ge=1024)
    poll_seconds: float = Field(default=5.0, gt=0)
    threads: int = Field(default=0, ge=0)  # ONNX Runtime intra-op threads; 0: its default


class ScheduleParams(_Strict):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    work_pool: str = "graft"
    deployment: str = "nightly-retrain"
    retries: int = Field(default=3, ge=0)           # transient failures only: bad data or params are never retried
    retry_delay_seconds: float = Field(default=30, ge=0)  # doubles on each retry
    lock_wait_seconds: float = Field(default=600, ge=0)   # a second run waits this long for the first, then refuses

    @model_validator(mode="after")
    def _cron_has_five_fields(self) -> ScheduleParams:
        if len(self.cron.split()) != 5:
            raise ValueError(f"schedule.cron must have 5 fields (minute hour day month weekday), got {self.cron!r}")
        return self


class RegistryParams(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "graft"
    model_name: str = "graft-classifier"


class Params(_Strict):
    seed: int = 0
    data: DataParams
    model: ModelParams
    pretrain: PretrainParams
    finetune: FinetuneParams
    export: ExportParams = ExportParams()
    gates: GateParams = GateParams()
    promotion: PromotionParams = PromotionParams()
    registry: RegistryParams = RegistryParams()
    serving: ServingParams = ServingParams()
    schedule: ScheduleParams = ScheduleParams()


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; remove it or fix its spelling")
            continue
        given = item.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def parse_params(raw: dict) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"invalid params:\n{_describe(error)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such file; run graft from the project folder or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys at the top level")
    try:
        return parse_params(raw)
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None
