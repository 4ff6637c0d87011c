"""The one validated model of params.yaml.

Every component reads its knobs from here; an unknown key or a bad value fails at load time with a
message that names the key, what was given and what is allowed.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from components.errors import GraftError

Strategy = Literal["scratch", "linear_probe", "finetune", "lp_ft"]
STRATEGIES: tuple[str, ...] = Strategy.__args__


class ParamsError(GraftError, ValueError):
    """params.yaml is missing, unreadable or invalid; the message names each bad key."""


class MissingData(GraftError):
    """A data folder that params.yaml names does not exist."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SOURCE_NAME = r"^[a-z0-9][a-z0-9._-]*$"  # a DVC stage suffix and a file name


class DatasetParams(_Strict):
    name: str = Field(min_length=1)
    format: Literal["idx", "folder"]
    path: str
    val_size: int = Field(ge=0)
    test_size: int = Field(ge=0)
    labels_per_class: int | None = Field(default=None, ge=1)


class UnlabeledParams(_Strict):
    """A folder of target images without classes (a new camera, a new factory): what domain adaptation aligns to."""

    path: str  # every image file in the folder (subfolders included); DVC versions it like the rest


class DataParams(_Strict):
    """The target: the small data set the model is fine-tuned on, and how it is split."""

    target: DatasetParams
    unlabeled: dict[str, UnlabeledParams] = {}  # by name: each gets a prepare_unlabeled@NAME stage
    channels: Literal[1, 3] = 1  # the target's colour mode (1 gray, 3 RGB): what every served image is converted to
    split_seed: int = 42
    min_images_per_class: int = Field(default=3, ge=1)
    min_image_side: int = Field(default=8, ge=1)  # a smaller image holds too little to learn from: quarantined
    bad_files: Literal["quarantine", "fail"] = "quarantine"

    @model_validator(mode="after")
    def _unlabeled_names(self) -> DataParams:
        if bad := [n for n in self.unlabeled if not re.match(SOURCE_NAME, n)]:
            raise ValueError(f"data.unlabeled name(s) {bad}: use lower-case letters, digits, '.', '_' and '-'")
        return self


class _Normalised(_Strict):
    image_size: int = Field(ge=8, le=1024)  # the source network's input size; the target is resized to it

    @model_validator(mode="after")
    def _normalisation_fits(self):
        mean, std = getattr(self, "mean"), getattr(self, "std")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if mean is not None:
            if len(mean) != len(std):
                raise ValueError(f"mean ({len(mean)} values) and std ({len(std)} values) need one value a channel each")
            if any(s <= 0 for s in std):
                raise ValueError("std values must be > 0")
        return self


class PipelineSource(_Normalised):
    """`kind: pipeline`: Graft pretrains its own small ResNet on this source data set (DVC caches it)."""

    data: DatasetParams
    channels: Literal[1, 3] = 1            # the source images' colour mode
    mean: list[float]                      # normalisation after scaling pixels to [0, 1], one value a channel
    std: list[float]
    widths: list[int] = Field(min_length=1)  # stem + one stride-2 BasicBlock a width

    @model_validator(mode="after")
    def _one_value_a_channel(self) -> PipelineSource:
        if len(self.mean) != self.channels:
            raise ValueError(f"mean/std need one value a channel: {self.channels} value(s) for channels={self.channels}")
        return self


class PretrainedSource(_Normalised):
    """`kind: pretrained`: a torchvision classification architecture (or efficientnet_lite0) with ready weights."""

    architecture: str = Field(min_length=1)  # torchvision.models name (resnet18, mobilenet_v3_small, ...) or efficientnet_lite0
    weights: str | None = None               # named weights: torchvision's (DEFAULT, IMAGENET1K_V1, ...), IMAGENET1K for efficientnet_lite0
    weights_file: str | None = None          # or a local state_dict file (loaded with weights_only=True; its sha256 is the identity)
    mean: list[float] | None = None          # default: the named weights' own normalisation, ImageNet's for a file
    std: list[float] | None = None

    @model_validator(mode="after")
    def _one_weights_origin(self) -> PretrainedSource:
        if (self.weights is None) == (self.weights_file is None):
            raise ValueError("give exactly one of weights (a named weights set) or weights_file (a local state_dict)")
        if self.mean is not None and len(self.mean) != 3:
            raise ValueError("mean/std of a pretrained (RGB) source need 3 values")
        return self


class SourcesParams(_Strict):
    """The candidates to transfer from, by kind; `select_source` scores each on the target before fine-tuning."""

    pipeline: dict[str, PipelineSource] = {}
    pretrained: dict[str, PretrainedSource] = {}

    @model_validator(mode="after")
    def _named_and_not_empty(self) -> SourcesParams:
        names = [*self.pipeline, *self.pretrained]
        if not names:
            raise ValueError("list at least one candidate under sources.pipeline or sources.pretrained")
        if both := set(self.pipeline) & set(self.pretrained):
            raise ValueError(f"candidate name(s) {sorted(both)} used under both pipeline and pretrained; names must be unique")
        if bad := [n for n in names if not re.match(SOURCE_NAME, n)]:
            raise ValueError(f"candidate name(s) {bad}: use lower-case letters, digits, '.', '_' and '-'")
        return self

    def names(self) -> list[str]:
        return [*self.pipeline, *self.pretrained]

    def kind(self, name: str) -> str:
        return "pipeline" if name in self.pipeline else "pretrained"

    def image_sizes(self) -> list[int]:
        return sorted({c.image_size for c in (*self.pipeline.values(), *self.pretrained.values())})


class RaceParams(_Strict):
    """When the scores cannot decide, a short fine-tuning race on the validation split does (components/race.py)."""

    when: Literal["auto", "always", "never"] = "auto"  # auto: when the scores disagree or the lead is within noise
    bootstrap: int = Field(default=30, ge=2)        # resamples of the training images: the deciding score's noise
    min_lead_share: float = Field(default=0.95, gt=0.5, le=1)  # the leader must lead in this share of them
    candidates: int = Field(default=4, ge=2)        # the best this many by the deciding score race
    first_steps: int = Field(default=40, ge=2)      # fine-tuning steps a candidate in the first rung; doubled each rung
    budget_seconds: float = Field(default=600, gt=0)  # no new rung that would end past this: the last rung decides


class SelectionParams(_Strict):
    mode: Literal["auto", "report"] = "auto"  # auto: fine-tune the best-scoring candidate; report: score all, fine-tune `use`
    score: Literal["logme", "leep", "nce"] = "logme"
    use: str | None = None                    # report mode: the candidate to fine-tune (default: the first listed)
    batch_size: int = Field(default=64, ge=1)  # feature extraction batch
    race: RaceParams = RaceParams()


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
    bn_momentum: float | None = Field(default=0.1, gt=0, le=1)  # every BatchNorm's; null keeps the architecture's own
    augment: Augment = Augment()
    eval_every_steps: int = Field(default=0, ge=0)


class ComputeParams(_Strict):
    """Where and in what precision the training loop runs (components/compute.py); auto: chosen from the machine."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False  # torch.compile the backbone (TorchInductor; needs a C++ compiler on CPU)
    processes: int = Field(default=1, ge=1)  # >1: data-parallel training under torchrun (components/distributed.py)


class PretrainParams(TrainParams):
    epochs: int = Field(ge=1)
    checkpoint_every_steps: int = Field(default=100, ge=0)  # a resume point for a killed run; 0: none
    seed: int = 0  # its own seed: changing the target's `seed` must not redo the expensive pretraining


class RegularizerParams(_Strict):
    """Omega(f) in min_f L_T(f) + Omega(f) (components/tuning.py)."""

    kind: Literal["none", "l2", "l2_sp", "bss"] = "none"
    strength: float = Field(default=0.01, ge=0)       # l2: on every weight; l2_sp: on the drift from the source; bss: eta
    head_strength: float = Field(default=0.01, ge=0)  # l2_sp: plain L2 on the new head
    bss_k: int = Field(default=1, ge=1)               # bss: how many of the smallest singular values are shrunk


class JointParams(_Strict):
    """The joint objective L_T + lambda(t) * L_S + Omega: keep training on the source's labelled data (components/objectives.py)."""

    weight: float = Field(default=0.0, ge=0)               # lambda; 0: off
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # lambda(t): constant, or decaying to 0
    batch_size: int = Field(default=32, ge=1)              # source images per step, beside the target batch
    source_examples: int | None = Field(default=10000, ge=1)  # the source pool, a seeded draw; null: all
    instance_weights: Literal["none", "domain", "class"] = "none"
    clip: float = Field(default=10.0, gt=1)                # domain: weights clipped at this multiple of their median
    keep_classes: int = Field(default=5, ge=1)             # class: the source classes nearest the target's kept


class AdaptationParams(_Strict):
    """Domain adaptation toward unlabelled target images (data.unlabeled): align the features (components/objectives.py)."""

    method: Literal["none", "coral", "mmd", "dann"] = "none"
    unlabeled: str | None = None                           # which data.unlabeled entry (default: the only one)
    weight: float = Field(default=1.0, ge=0)
    batch_size: int = Field(default=32, ge=1)              # unlabelled images per step, beside the labelled batch
    hidden: int = Field(default=256, ge=1)                 # dann: the domain classifier's hidden units


class FinetuneParams(TrainParams):
    strategy: Strategy
    steps: int = Field(ge=1)
    backbone_lr_scale: float = Field(default=0.1, gt=0)
    lp_steps: int = Field(default=100, ge=1)
    channel_adapter: Literal["replicate", "learned"] = "replicate"  # target colour mode != source's: fixed or trained 1x1 conv
    regularizer: RegularizerParams = RegularizerParams()
    reinit_top_blocks: int = Field(default=0, ge=0)         # the source's top N blocks re-initialised, trained as the head
    layer_lr_decay: float = Field(default=1.0, gt=0, le=1)  # per backbone block from the top: lr * decay^depth
    unfreeze_every_steps: int = Field(default=0, ge=0)      # gradual unfreezing: one more block from the top every N steps
    batchnorm: Literal["train", "frozen"] = "train"         # frozen: keep the source's BatchNorm statistics
    joint: JointParams = JointParams()
    adaptation: AdaptationParams = AdaptationParams()

    @model_validator(mode="after")
    def _lp_steps_fit(self) -> FinetuneParams:
        if self.strategy == "lp_ft" and self.lp_steps >= self.steps:
            raise ValueError(f"finetune.lp_steps ({self.lp_steps}) must be < finetune.steps ({self.steps}) for lp_ft")
        return self


DEFAULT_SWEEP_STRATEGIES = {
    "scratch": {"strategy": "scratch"},
    "linear_probe": {"strategy": "linear_probe"},
    "finetune": {"strategy": "finetune"},
    "lp_ft": {"strategy": "lp_ft"},
    "l2_sp": {"strategy": "finetune", "regularizer": {"kind": "l2_sp"}},
    "joint": {"strategy": "finetune", "joint": {"weight": 1.0}},
    "joint_iw": {"strategy": "finetune", "joint": {"weight": 1.0, "instance_weights": "domain"}},
}


class SweepDask(_Strict):
    """Where `graft sweep`'s branches run with executor dask (flows/sweep.py)."""

    address: str | None = None  # a running Dask scheduler (tcp://host:8786); DASK_SCHEDULER_ADDRESS wins; null: a LocalCluster
    workers: int = Field(default=2, ge=1)                    # the LocalCluster's worker processes
    threads_per_worker: int | None = Field(default=None, ge=1)  # torch threads a branch uses; null: cores / workers

    def scheduler_address(self) -> str | None:
        return os.environ.get("DASK_SCHEDULER_ADDRESS") or self.address

    def threads(self) -> int:
        return self.threads_per_worker or max(1, (os.cpu_count() or 1) // self.workers)


class SweepParams(_Strict):
    """`graft sweep`: learning curves, strategies x labels per class x seeds (components/sweep.py)."""

    executor: Literal["dask", "sequential"] = "dask"  # dask: branches in parallel (Prefect + prefect-dask); sequential: one process
    dask: SweepDask = SweepDask()

    labels_per_class: list[int | None] = Field(default=[1, 5, 10, 25, 50, None], min_length=1)  # None: every label
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    # name: what it changes in `finetune` (a partial finetune mapping); "scratch" is the reference line
    strategies: dict[str, dict] = Field(default=DEFAULT_SWEEP_STRATEGIES, min_length=1)

    @model_validator(mode="after")
    def _counts_positive(self) -> SweepParams:
        if bad := [k for k in self.labels_per_class if k is not None and k < 1]:
            raise ValueError(f"sweep.labels_per_class: {bad} must be >= 1 (or null: every label)")
        if bad := [n for n in self.strategies if not re.match(SOURCE_NAME, n)]:
            raise ValueError(f"sweep.strategies name(s) {bad}: use lower-case letters, digits, '.', '_' and '-'")
        return self


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied key by key, nested mappings merged rather than replaced."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class ExportParams(_Strict):
    opset: int = Field(default=20, ge=17)
    parity_atol: float = Field(default=1e-3, gt=0)   # every |ONNX logit - PyTorch logit| <= atol + rtol * |PyTorch logit|
    parity_rtol: float = Field(default=1e-3, ge=0)   # (NumPy's allclose rule: deep networks have large logits)
    variants: list[Literal["int8", "fp16"]] = Field(default=["int8", "fp16"])  # beside FP32 (deploy/variants.py)
    max_accuracy_drop: float = Field(default=0.005, ge=0, le=1)  # a variant further below FP32 is not published
    calibration_images: int = Field(default=1024, ge=1)  # INT8 activation ranges: target train, then val, images
    calibration_method: Literal["percentile", "minmax", "entropy"] = "percentile"
    calibration_percentile: float = Field(default=99.99, gt=50, le=100)

    @field_validator("variants")
    @classmethod
    def _each_once(cls, variants: list[str]) -> list[str]:
        if len(set(variants)) != len(variants):
            raise ValueError(f"each variant at most once, got {variants}")
        return variants


class GateParams(_Strict):
    min_accuracy: float = Field(default=0.0, ge=0, le=1)
    min_macro_f1: float = Field(default=0.0, ge=0, le=1)
    # Transfer vs scratch and candidate vs champion are paired comparisons on the same test examples:
    # "worse" only when McNemar's exact test is significant at `confidence` and the gap is at least `min_effect`.
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    min_effect: float = Field(default=0.01, ge=0, le=1)
    transfer: Literal["not_worse", "better", "off"] = "not_worse"
    max_skew: float = Field(default=0.002, ge=0, le=1)  # |served minus evaluated test accuracy| allowed
    large_batch: int = Field(default=256, ge=2)
    max_latency_ms_batch1: float = Field(default=50.0, gt=0)
    max_latency_ms_large_batch: float = Field(default=1000.0, gt=0)
    max_model_mb: float = Field(default=100.0, gt=0)


class PromotionParams(_Strict):
    auto_promote: bool = False  # the first model that passes every gate is always promoted


ProviderName = Literal["auto", "tensorrt", "cuda", "cpu"]


class ServingParams(_Strict):
    alias: str = "champion"
    providers: list[ProviderName] = Field(default=["auto"], min_length=1)
    variant: Literal["auto", "fp32", "int8", "fp16"] = "auto"  # auto: INT8 on CPU, FP16 on CUDA, when published
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


class StorageParams(_Strict):
    dvc_remote: str | None = None  # a folder, ssh://..., s3://...: each successful run pushes there (dvc push)


class Params(_Strict):
    seed: int = 0
    data: DataParams
    sources: SourcesParams
    selection: SelectionParams = SelectionParams()
    pretrain: PretrainParams
    finetune: FinetuneParams
    export: ExportParams = ExportParams()
    gates: GateParams = GateParams()
    promotion: PromotionParams = PromotionParams()
    registry: RegistryParams = RegistryParams()
    serving: ServingParams = ServingParams()
    schedule: ScheduleParams = ScheduleParams()
    sweep: SweepParams = SweepParams()
    compute: ComputeParams = ComputeParams()
    storage: StorageParams = StorageParams()

    @model_validator(mode="after")
    def _sweep_strategies_are_finetune_settings(self) -> Params:
        for name in self.sweep.strategies:
            try:
                self.sweep_finetune(name)
            except ValidationError as error:
                raise ValueError(f"sweep.strategies.{name} is not a valid change of finetune:\n{_describe(error)}") from None
        return self

    def sweep_finetune(self, name: str) -> FinetuneParams:
        """The finetune params of one sweep strategy: params.yaml's, with the strategy's changes."""
        return FinetuneParams.model_validate(merged(self.finetune.model_dump(), self.sweep.strategies[name]))

    @model_validator(mode="after")
    def _selection_names_a_candidate(self) -> Params:
        if self.selection.use is not None and self.selection.use not in self.sources.names():
            raise ValueError(f"selection.use: {self.selection.use!r} is not a candidate; candidates: {', '.join(self.sources.names())}")
        return self

    @model_validator(mode="after")
    def _batches_split_across_processes(self) -> Params:
        processes = self.compute.processes
        if processes == 1:
            return self
        for key, batch in (("pretrain.batch_size", self.pretrain.batch_size), ("finetune.batch_size", self.finetune.batch_size)):
            if batch % processes:
                raise ValueError(f"{key}: {batch} does not split evenly across compute.processes: {processes}; "
                                 f"use a multiple of {processes}")
        if self.finetune.joint.weight > 0 or self.finetune.adaptation.method != "none":
            raise ValueError("compute.processes > 1 trains the target's own loss data-parallel; the extra terms "
                             "(finetune.joint, finetune.adaptation) run in one process: set compute.processes: 1")
        return self

    @model_validator(mode="after")
    def _adaptation_names_unlabeled_data(self) -> Params:
        adaptation = self.finetune.adaptation
        if adaptation.method == "none":
            return self
        names = ", ".join(self.data.unlabeled) or "none"
        if adaptation.unlabeled is None and len(self.data.unlabeled) != 1:
            raise ValueError(f"finetune.adaptation.method {adaptation.method!r} needs unlabelled target images: name one "
                             f"data.unlabeled entry in finetune.adaptation.unlabeled (entries: {names})")
        if adaptation.unlabeled is not None and adaptation.unlabeled not in self.data.unlabeled:
            raise ValueError(f"finetune.adaptation.unlabeled: {adaptation.unlabeled!r} is not a data.unlabeled entry; entries: {names}")
        return self

    def unlabeled_for_adaptation(self) -> str:
        return self.finetune.adaptation.unlabeled or next(iter(self.data.unlabeled))

    def raw_datasets(self) -> dict[str, DatasetParams]:
        """Every data set the stages read, by the params key that names it."""
        datasets = {"data.target": self.data.target}
        datasets.update({f"sources.pipeline.{name}.data": source.data for name, source in self.sources.pipeline.items()})
        return datasets

    def raw_data_paths(self) -> dict[str, str]:
        """Every data folder the stages read, by the params key that names it."""
        paths = {f"{key}.path": dataset.path for key, dataset in self.raw_datasets().items()}
        paths.update({f"data.unlabeled.{name}.path": folder.path for name, folder in self.data.unlabeled.items()})
        return paths

    def chosen_in_report_mode(self) -> str:
        return self.selection.use or self.sources.names()[0]


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


FOREACH_KEYS = ("sources.pipeline", "data.unlabeled")  # dvc.yaml: foreach over each


def parse_params(raw: dict) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"invalid params:\n{_describe(error)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such file; run graft from the project folder or pass --root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys at the top level")
    try:
        params = parse_params(raw)
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None
    # dvc.yaml iterates over these mappings (foreach), and DVC reads params.yaml itself: an absent key is an error
    # there, even where Graft's default (no entries) would do.
    if missing := [key for key in FOREACH_KEYS if not isinstance((raw.get(key.split(".")[0]) or {}).get(key.split(".")[1]), dict)]:
        raise ParamsError(f"{path}: {', '.join(missing)}: missing; dvc.yaml runs a stage per entry, so write it out, "
                          f"empty if none: {'; '.join(f'{k}: {{}}' for k in missing)}")
    return params


def check_raw_data(root: str | Path, params: Params) -> None:
    """Every data folder the stages read exists, a folder data set's class folders hold files, and its split fits
    them, before any stage (or server) starts. (DVC does not see an empty folder: a class added without images would
    change nothing.) Files are counted, not opened: milliseconds for the default target's 10k."""
    missing = [(key, path) for key, path in params.raw_data_paths().items() if not (Path(root) / path).exists()]
    if not missing:
        for key, dataset in params.raw_datasets().items():
            if dataset.format == "folder":
                check_split_fits(key, dataset, Path(root) / dataset.path)
        return
    names = ", ".join(f"{path} ({key})" for key, path in missing)
    tracked = [f"{path}.dvc" for _, path in missing if (Path(root) / f"{path}.dvc").exists()]
    if tracked:
        raise MissingData(f"no data at {names}, which DVC tracks: restore it with `dvc checkout {' '.join(tracked)}` "
                          f"(from DVC's cache) or `dvc pull {' '.join(tracked)}` (from the DVC remote)")
    raise MissingData(f"no data at {names}. For the embedded default data run `graft fetch-data`; for your own, "
                      f"point the key at a folder that exists")


def check_split_fits(key: str, dataset: DatasetParams, folder: Path) -> None:
    """The split `key` configures fits the class folders' file counts (an upper bound on the usable images: the
    prepare stage has the last word); else a DataError naming the values that fit."""
    from components.data import DataError, class_file_counts, fitting_split, split_changes, split_shortfalls

    counts = class_file_counts(folder)
    if shortfalls := split_shortfalls(counts, dataset):
        fitting = fitting_split(counts, dataset, dataset.path)
        values = ", ".join(f"{key}.{name}: {after}" for name, (_, after) in split_changes(dataset, fitting).items())
        raise DataError(f"{key}: the split does not fit {dataset.path} ({len(counts)} classes, {sum(counts.values())} files): "
                        f"{'; '.join(shortfalls)}. Set {values} (every class in each split)")
