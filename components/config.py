"""The one validated model of params.yaml.

Every component reads its knobs from here; an unknown key or a bad value fails at load time with a
message that names the key, what was given and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Strategy = Literal["scratch", "linear_probe", "finetune", "lp_ft"]
STRATEGIES: tuple[str, ...] = Strategy.__args__


class ParamsError(ValueError):
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
    registry: RegistryParams = RegistryParams()


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
