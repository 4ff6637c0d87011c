"""The one validated model of params.yaml.

Every component reads its knobs from here; an unknown key or a bad value fails at load time with a
message that names the key, what was given and what is allowed.
"""
from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Literal, TypeVar, get_args

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
from deploy.variants import FP16, FP32, INT8, VARIANTS

Strategy = Literal["scratch", "linear_probe", "finetune", "lp_ft"]
STRATEGIES: tuple[str, ...] = Strategy.__args__
# What an evaluation of the val split measures (components/train.py evaluate_split); balanced accuracy weighs every
# class the same, for unequal classes (components/evaluate.py)
ValScore = Literal["val_accuracy", "val_balanced_accuracy"]  # the higher the better: what a tuning trial can maximise
ValMetric = Literal[ValScore, "val_loss"]
VAL_METRICS: tuple[str, ...] = ValMetric.__args__
ClassBalance = Literal["none", "reweight", "resample"]  # an imbalanced labelled split's remedy (components/balance.py)
TransferScore = Literal["logme", "leep", "nce"]  # how well a source's frozen features fit the target (selection.py)
SCORES: tuple[str, ...] = TransferScore.__args__
ExportVariant = Literal[tuple(v for v in VARIANTS if v != FP32)]  # beside FP32, which is always exported


class ParamsError(GraftError, ValueError):
    """params.yaml is missing, unreadable or invalid; the message names each bad key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


SOURCE_NAME = r"^[a-z0-9][a-z0-9._-]*$"  # a DVC stage suffix and a file name


class DatasetParams(Strict):
    name: str = Field(min_length=1)
    format: Literal["idx", "folder"]
    path: str
    val_size: int = Field(ge=0)
    test_size: int = Field(ge=0)
    labels_per_class: int | None = Field(default=None, ge=1)


class UnlabeledParams(Strict):
    """A folder of target images without classes (a new camera, a new factory): what domain adaptation aligns to."""

    path: str  # every image file in the folder (subfolders included); DVC versions it like the rest


class DataParams(Strict):
    """The target: the small data set the model is fine-tuned on, and how it is split."""

    target: DatasetParams
    unlabeled: dict[str, UnlabeledParams] = {}  # by name: each gets a prepare_unlabeled@NAME stage
    channels: Literal[1, 3] = 1  # the target's colour mode (1 gray, 3 RGB): what every served image is converted to
    split_seed: int = 42
    min_images_per_class: int = Field(default=3, ge=1)
    min_image_side: int = Field(default=8, ge=1)  # a smaller image holds too little to learn from: quarantined
    max_image_pixels: int = Field(default=100_000_000, ge=1)  # a larger one is quarantined unread (data.py: ImageLimits)
    bad_files: Literal["quarantine", "fail"] = "quarantine"
    # Harvested production labels (the target's `production-*` files, `graft data harvest`): this share of them
    # validates, the rest trains; never the test split, so a harvest leaves the test split as it was.
    production_val_share: float = Field(default=0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _unlabeled_names(self) -> DataParams:
        if bad := [n for n in self.unlabeled if not re.match(SOURCE_NAME, n)]:
            raise ValueError(f"data.unlabeled name(s) {bad}: use lower-case letters, digits, '.', '_' and '-'")
        return self


class _Normalised(Strict):
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


class SourcesParams(Strict):
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


class RaceParams(Strict):
    """When the scores cannot decide, a short fine-tuning race on the validation split does (components/race.py)."""

    when: Literal["auto", "always", "never"] = "auto"  # auto: when the scores disagree or the lead is within noise
    bootstrap: int = Field(default=30, ge=2)        # resamples of the training images: the deciding score's noise
    min_lead_share: float = Field(default=0.95, gt=0.5, le=1)  # the leader must lead in this share of them
    candidates: int = Field(default=4, ge=2)        # the best this many by the deciding score race
    first_steps: int = Field(default=40, ge=2)      # fine-tuning steps a candidate in the first rung; doubled each rung
    budget_seconds: float = Field(default=600, gt=0)  # no new rung that would end past this: the last rung decides


class SelectionParams(Strict):
    mode: Literal["auto", "report"] = "auto"  # auto: fine-tune the best-scoring candidate; report: score all, fine-tune `use`
    score: TransferScore = "logme"
    use: str | None = None                    # report mode: the candidate to fine-tune (default: the first listed)
    batch_size: int = Field(default=64, ge=1)  # feature extraction batch
    race: RaceParams = RaceParams()


class Augment(Strict):
    flip: bool = False
    rotate_degrees: float = Field(default=0.0, ge=0, le=180)
    scale: tuple[float, float] = (1.0, 1.0)
    shift_pixels: float = Field(default=0.0, ge=0)
    brightness: float = Field(default=0.0, ge=0, le=1)  # pixel values times a factor within 1 +- this
    contrast: float = Field(default=0.0, ge=0, le=1)    # each image's distance from its mean times 1 +- this
    cutout: float = Field(default=0.0, ge=0, lt=1)      # one square, this fraction of the side, erased to grey


class EarlyStopping(Strict):
    """Stop training once the val split stops improving, and keep the weights of its best evaluation
    (components/train.py EarlyStopper)."""

    enabled: bool = False
    metric: ValMetric = "val_accuracy"
    patience: int = Field(default=4, ge=1)       # evaluations (eval_every_steps apart) without improvement
    min_steps: int = Field(default=0, ge=0)      # never stop before this step
    min_delta: float = Field(default=0.0, ge=0)  # an improvement smaller than this does not count


class TrainParams(Strict):
    """Knobs of the one training loop; pretraining and fine-tuning each get a copy."""

    batch_size: int = Field(ge=1)
    optimizer: Literal["sgd", "adamw"]
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_fraction: float = Field(default=0.0, ge=0, lt=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    class_balance: ClassBalance = "none"
    bn_momentum: float | None = Field(default=0.1, gt=0, le=1)  # every BatchNorm's; null keeps the architecture's own
    augment: Augment = Augment()
    eval_every_steps: int = Field(default=0, ge=0)
    early_stopping: EarlyStopping = EarlyStopping()


class ComputeParams(Strict):
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


class RegularizerParams(Strict):
    """Omega(f) in min_f L_T(f) + Omega(f) (components/tuning.py)."""

    kind: Literal["none", "l2", "l2_sp", "bss"] = "none"
    strength: float = Field(default=0.01, ge=0)       # l2: on every weight; l2_sp: on the drift from the source; bss: eta
    head_strength: float = Field(default=0.01, ge=0)  # l2_sp: plain L2 on the new head
    bss_k: int = Field(default=1, ge=1)               # bss: how many of the smallest singular values are shrunk


class JointParams(Strict):
    """The joint objective L_T + lambda(t) * L_S + Omega: keep training on the source's labelled data (components/objectives.py)."""

    weight: float = Field(default=0.0, ge=0)               # lambda; 0: off
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # lambda(t): constant, or decaying to 0
    batch_size: int = Field(default=32, ge=1)              # source images per step, beside the target batch
    source_examples: int | None = Field(default=10000, ge=1)  # the source pool, a seeded draw; null: all
    instance_weights: Literal["none", "domain", "class"] = "none"
    clip: float = Field(default=10.0, gt=1)                # domain: weights clipped at this multiple of their median
    keep_classes: int = Field(default=5, ge=1)             # class: the source classes nearest the target's kept


class AdaptationParams(Strict):
    """Domain adaptation toward unlabelled target images (data.unlabeled): align the features (components/objectives.py)."""

    method: Literal["none", "coral", "mmd", "dann"] = "none"
    unlabeled: str | None = None                           # which data.unlabeled entry (default: the only one)
    weight: float = Field(default=1.0, ge=0)
    batch_size: int = Field(default=32, ge=1)              # unlabelled images per step, beside the labelled batch
    hidden: int = Field(default=256, ge=1)                 # dann: the domain classifier's hidden units

    @property
    def uses_unlabeled(self) -> bool:
        return self.method != "none"


# FixMatch's strong view: RandAugment's geometric and photometric kinds at fixed strengths, and Cutout.
STRONG_AUGMENT = Augment(flip=True, rotate_degrees=30.0, scale=(0.8, 1.2), shift_pixels=8.0, brightness=0.5,
                         contrast=0.5, cutout=0.5)


class SelfTrainingParams(Strict):
    """Self-training (Noisy Student, Xie et al. 2020): the trained model labels the unlabelled images it is at least
    `confidence` sure of; a fresh graft of the same source trains on the target's labels and those, with the same
    recipe and terms (FixMatch's strong view is the student's noise), and becomes the model. Each round repeats it
    with the last student as the teacher (components/stages/train_target.py)."""

    rounds: int = Field(default=0, ge=0, le=5)
    confidence: float = Field(default=0.95, gt=0, le=1)


class SemiSupervisedParams(Strict):
    """Unlabelled target images (data.unlabeled) as a training signal of their own: FixMatch (Sohn et al. 2020),
    the model's confident answer on a weak view of an image is the label its strong view must be given
    (components/objectives.py)."""

    method: Literal["none", "fixmatch"] = "none"
    unlabeled: str | None = None                        # which data.unlabeled entry (default: the only one)
    weight: float = Field(default=1.0, ge=0)            # lambda_u
    threshold: float = Field(default=0.95, gt=0, le=1)  # a pseudo-label counts once its probability reaches this
    batch_size: int = Field(default=32, ge=1)           # unlabelled images a step, each forwarded twice (weak, strong)
    strong_augment: Augment = STRONG_AUGMENT           # the weak view is finetune.augment
    self_training: SelfTrainingParams = SelfTrainingParams()

    @property
    def uses_unlabeled(self) -> bool:
        return self.method != "none" or self.self_training.rounds > 0


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
    semi_supervised: SemiSupervisedParams = SemiSupervisedParams()

    @model_validator(mode="after")
    def _lp_steps_fit(self) -> FinetuneParams:
        if self.strategy == "lp_ft" and self.lp_steps >= self.steps:
            raise ValueError(f"finetune.lp_steps ({self.lp_steps}) must be < finetune.steps ({self.steps}) for lp_ft")
        return self


class Int8SearchParams(Strict):
    """The INT8 recipes export tries (every combination of these lists; components/export.py Int8Recipe): the fastest
    at batch 64 on this machine within max_accuracy_drop on the validation split is kept; recipes within
    `same_speed_within` of the fastest count as fast as it, and the most accurate of them is kept."""

    formats: list[Literal["qdq", "qoperator"]] = Field(default=["qdq"], min_length=1)
    per_channel: list[bool] = Field(default=[True], min_length=1)
    calibration: list[Literal["percentile", "minmax", "entropy"]] = Field(default=["percentile"], min_length=1)
    float_convs: list[Annotated[int, Field(ge=0)]] = Field(default=[1, 2, 4], min_length=1)
    float_classifier: list[bool] = Field(default=[True], min_length=1)
    same_speed_within: float = Field(default=0.05, ge=0, lt=1)  # a share of the fastest recipe's batch-64 latency


class ExportParams(Strict):
    opset: int = Field(default=20, ge=17)
    parity_atol: float = Field(default=1e-3, gt=0)   # every |ONNX logit - PyTorch logit| <= atol + rtol * |PyTorch logit|
    parity_rtol: float = Field(default=1e-3, ge=0)   # (NumPy's allclose rule: deep networks have large logits)
    variants: list[ExportVariant] = Field(default=[INT8, FP16])
    max_accuracy_drop: float = Field(default=0.005, ge=0, le=1)  # a variant further below FP32 is not published
    calibration_images: int = Field(default=1024, ge=1)  # INT8 activation ranges: target train, then val, images
    calibration_percentile: float = Field(default=99.99, gt=50, le=100)  # percentile calibration's share of values
    int8_search: Int8SearchParams = Field(default_factory=Int8SearchParams)
    drift_reference_images: int = Field(default=500, ge=2)  # features stored with each file: target val, then train

    @field_validator("variants")
    @classmethod
    def _each_once(cls, variants: list[str]) -> list[str]:
        if len(set(variants)) != len(variants):
            raise ValueError(f"each variant at most once, got {variants}")
        return variants


class CalibrationParams(Strict):
    """How the shipped model's probabilities are calibrated (components/calibrate.py), and measured."""

    method: Literal["temperature", "none"] = "temperature"  # temperature: one T fitted on the val split; none: T = 1
    bins: int = Field(default=15, ge=2, le=100)  # expected calibration error's equal-width confidence bins


class ExplainParams(Strict):
    """The evaluate stage's galleries of the shipped model's test answers, each image beside its Grad-CAM map."""

    mistakes: int = Field(default=16, ge=0, le=200)        # the most confident wrong answers shown
    correct_per_class: int = Field(default=2, ge=0, le=20)  # right answers a class shown (a draw with `seed`)


UnlabeledTerm = Literal["adaptation", "semi_supervised"]
UNLABELED_TERMS: tuple[UnlabeledTerm, ...] = ("adaptation", "semi_supervised")  # finetune's keys fed by data.unlabeled


class Params(Strict):
    """The candidate params: everything that changes the model a run produces (the DVC stages read only these).
    The operations settings (gates, registry, serving, schedule, storage, sweep) are components/settings.py's."""

    seed: int = 0
    data: DataParams
    sources: SourcesParams
    selection: SelectionParams = SelectionParams()
    pretrain: PretrainParams
    finetune: FinetuneParams
    calibration: CalibrationParams = CalibrationParams()
    explain: ExplainParams = ExplainParams()
    export: ExportParams = ExportParams()
    compute: ComputeParams = ComputeParams()

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
        if self.finetune.joint.weight > 0 or self.unlabeled_terms():
            raise ValueError("compute.processes > 1 trains the target's own loss data-parallel; the extra terms "
                             "(finetune.joint, finetune.adaptation, finetune.semi_supervised) run in one process: "
                             "set compute.processes: 1")
        return self

    def unlabeled_terms(self) -> list[UnlabeledTerm]:
        """The terms of finetune that are on and feed on unlabelled target images."""
        return [term for term in UNLABELED_TERMS if getattr(self.finetune, term).uses_unlabeled]

    @model_validator(mode="after")
    def _unlabeled_terms_name_their_data(self) -> Params:
        names = ", ".join(self.data.unlabeled) or "none"
        for term in self.unlabeled_terms():
            chosen = getattr(self.finetune, term)
            if chosen.unlabeled is None and len(self.data.unlabeled) != 1:
                asks = chosen.method if chosen.method != "none" else "self_training"
                raise ValueError(f"finetune.{term}: {asks!r} needs unlabelled target images: name one "
                                 f"data.unlabeled entry in finetune.{term}.unlabeled (entries: {names})")
            if chosen.unlabeled is not None and chosen.unlabeled not in self.data.unlabeled:
                raise ValueError(f"finetune.{term}.unlabeled: {chosen.unlabeled!r} is not a data.unlabeled entry; "
                                 f"entries: {names}")
        return self

    def unlabeled_for(self, term: UnlabeledTerm) -> str:
        """The data.unlabeled entry finetune.<term> feeds on."""
        return getattr(self.finetune, term).unlabeled or next(iter(self.data.unlabeled))

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


def _model_in(annotation) -> type[BaseModel] | None:
    """The one params model a field holds, directly or as the items of a list or mapping (None: no model, or several)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = {model for arg in get_args(annotation) if (model := _model_in(arg)) is not None}
    return found.pop() if len(found) == 1 else None


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed where `loc` points: list indexes and mapping keys (a source's name) stay on their items' model."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is not None and (model := _model_in(field.annotation)) is None:
            return []
    return sorted(model.model_fields)


def describe(error: ValidationError, model: type[BaseModel]) -> str:
    """Each of `error`'s problems on a line, by key; `model` is what was validated (an unknown key's line lists the
    keys allowed where it stands)."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = _keys_at(model, item["loc"][:-1])
            lines.append(f"  {key}: unknown key; remove it or fix its spelling"
                         + (f" (allowed here: {', '.join(allowed)})" if allowed else ""))
            continue
        given = item.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {item['msg']}{shown}")
    return "\n".join(lines)


FOREACH_KEYS = ("sources.pipeline", "data.unlabeled")  # dvc.yaml: foreach over each


def validated(model: type[M], raw: dict) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"invalid params:\n{describe(error, model)}") from None


def parse_params(raw: dict) -> Params:
    """The candidate params of a params.yaml mapping; its other sections are left to components/settings.py."""
    return validated(Params, {key: value for key, value in raw.items() if key in Params.model_fields})


# libyaml's parser where PyYAML was built with it: params.yaml in 5 ms instead of 32, read by every graft command.
FAST_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_params_file(path: str | Path) -> dict:
    """params.yaml's mapping, or a ParamsError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such file; run graft from the project folder or pass --root")
    text = path.read_text()
    try:
        raw = yaml.load(text, Loader=FAST_YAML_LOADER)
    except yaml.YAMLError:
        try:  # again with the pure-Python parser: its message quotes the line and points at the column
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ParamsError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys at the top level")
    # dvc.yaml iterates over these mappings (foreach), and DVC reads params.yaml itself: an absent key is an error
    # there, even where Graft's default (no entries) would do.
    if missing := [key for key in FOREACH_KEYS if not isinstance((raw.get(key.split(".")[0]) or {}).get(key.split(".")[1]), dict)]:
        raise ParamsError(f"{path}: {', '.join(missing)}: missing; dvc.yaml runs a stage per entry, so write it out, "
                          f"empty if none: {'; '.join(f'{k}: {{}}' for k in missing)}")
    return raw


def parsed_params_file(path: str | Path, parse: Callable[[dict], T]) -> T:
    """The params file at `path` read and given to `parse`; a validation error names the file (read_params_file's
    own errors name it already)."""
    raw = read_params_file(path)
    try:
        return parse(raw)
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """The candidate params of the file at `path` (graft validates the whole file first: components/settings.py)."""
    return parsed_params_file(path, parse_params)
