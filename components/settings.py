"""The whole of params.yaml: the candidate params (components/config.py, what the DVC stages read) and the
operations settings beside them, which judge, publish, serve, schedule and store a candidate but never change it:
editing one reruns no stage (dvc.yaml lists only candidate code and keys)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from components.config import (
    SOURCE_NAME,
    FinetuneParams,
    Params,
    Strict,
    ValScore,
    describe,
    parsed_params_file,
    validated,
)
from deploy.settings import ServingSettings

DEFAULT_SWEEP_STRATEGIES = {
    "scratch": {"strategy": "scratch"},
    "linear_probe": {"strategy": "linear_probe"},
    "finetune": {"strategy": "finetune"},
    "lp_ft": {"strategy": "lp_ft"},
    "l2_sp": {"strategy": "finetune", "regularizer": {"kind": "l2_sp"}},
    "joint": {"strategy": "finetune", "joint": {"weight": 1.0}},
    "joint_iw": {"strategy": "finetune", "joint": {"weight": 1.0, "instance_weights": "domain"}},
}



class SweepDask(Strict):
    """Where `graft sweep`'s branches run with executor dask (flows/sweep.py)."""

    address: str | None = None  # a running Dask scheduler (tcp://host:8786); DASK_SCHEDULER_ADDRESS wins; null: a LocalCluster
    workers: int = Field(default=2, ge=1)                    # the LocalCluster's worker processes
    threads_per_worker: int | None = Field(default=None, ge=1)  # torch threads a branch uses; null: cores / workers

    def scheduler_address(self) -> str | None:
        return os.environ.get("DASK_SCHEDULER_ADDRESS") or self.address

    def threads(self) -> int:
        return self.threads_per_worker or max(1, (os.cpu_count() or 1) // self.workers)


class SweepParams(Strict):
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



class GateParams(Strict):
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
    max_ece: float | None = Field(default=0.05, gt=0, le=1)  # the served probabilities' test ECE; null: not gated


class ShadowGateParams(Strict):
    """The evidence a challenger needs from shadowing live traffic (serving.shadow) before it is promoted."""

    required: bool = False  # `graft promote` refuses a challenger without passing this gate (auto_promote: first only)
    min_requests: int = Field(default=500, ge=1)  # shadowed answers of this challenger against this champion
    min_agreement: float = Field(default=0.5, ge=0, le=1)  # share of them where both predicted the same class
    max_latency_ratio: float = Field(default=2.0, gt=0)  # the shadow's p95 model latency over the champion's
    min_labelled: int = Field(default=50, ge=1)  # of them with a feedback label: McNemar, gates.confidence/min_effect


class CanaryRampParams(Strict):
    """`graft promote --ramp`: the challenger answers a growing share of live traffic (serving.canary), judged on its
    captured answers (serving.capture) between steps; the last step, 100, ends in the champion alias moving to it."""

    steps: list[float] = Field(default=[5, 25, 100], min_length=1)  # percent, rising, the last 100
    min_requests: int = Field(default=200, ge=1)  # the canary's captured answers at a step before it is judged
    min_labelled: int = Field(default=0, ge=0)  # its labelled answers needed (0: judged on the labels that came)
    step_timeout_minutes: float = Field(default=60.0, gt=0)  # a step short of answers by then: refused, share 0
    poll_seconds: float = Field(default=10.0, gt=0)  # how often the ramp reads the capture folder

    @model_validator(mode="after")
    def _rising_to_all(self) -> CanaryRampParams:
        if any(not 0 < step <= 100 for step in self.steps) or self.steps != sorted(set(self.steps)) or self.steps[-1] != 100:
            raise ValueError(f"promotion.canary.steps {self.steps}: percents above 0, rising, the last 100 (the champion "
                             f"moves there), e.g. [5, 25, 100]")
        return self


class PromotionParams(Strict):
    auto_promote: bool = False  # the first model that passes every gate is always promoted
    shadow: ShadowGateParams = ShadowGateParams()
    canary: CanaryRampParams = CanaryRampParams()


class ScheduleParams(Strict):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    work_pool: str = "graft"
    deployment: str = "nightly-retrain"
    retries: int = Field(default=3, ge=0)           # transient failures only: bad data or params are never retried
    retry_delay_seconds: float = Field(default=30, ge=0)  # doubles on each retry
    lock_wait_seconds: float = Field(default=600, ge=0)   # a second run waits this long for the first, then refuses

    @model_validator(mode="after")
    def _cron_has_five_fields(self) -> ScheduleParams:
        _check_cron("schedule.cron", self.cron)
        return self


class RegistryParams(Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "graft"
    model_name: str = "graft-classifier"


class ModelCardParams(Strict):
    """What a person writes once about the model's purpose; the pipeline writes every other line of the card."""

    intended_use: str = Field(default="not stated: set model_card.intended_use in params.yaml", min_length=1)
    out_of_scope: str = Field(default="not stated: set model_card.out_of_scope in params.yaml", min_length=1)


class ProductionParams(Strict):
    """The production loop: `graft monitor` (drift over what the server captured), `graft data harvest` (captured
    requests become data) and the check that retrains on them (flows/production.py)."""

    # The first harvest of unlabelled production images turns this domain adaptation on when finetune.adaptation
    # is none, so the retrain aligns with what production sees; none: finetune.adaptation stays as it is.
    adaptation: Literal["none", "coral", "mmd", "dann"] = "coral"
    retrain_on_drift: bool = True  # the check retrains when the latest full drift window alarms
    min_new_labels: int = Field(default=50, ge=1)  # ... or when this many feedback labels wait to be harvested
    check_cron: str = "*/30 * * * *"  # `graft schedule` registers the check beside the nightly retrain
    deployment: str = "production-check"

    @model_validator(mode="after")
    def _cron_has_five_fields(self) -> ProductionParams:
        _check_cron("production.check_cron", self.check_cron)
        return self


def _check_cron(key: str, cron: str) -> None:
    if len(cron.split()) != 5:
        raise ValueError(f"{key} must have 5 fields (minute hour day month weekday), got {cron!r}")


class SearchRange(Strict):
    """One dimension of `graft tune`'s search space: a range (low, high; log: sampled on a log scale; integer:
    whole numbers) or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchRange:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either low and high (a range) or choices (a list), not both, not neither")
        if self.choices is None and not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.choices is None and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, not {self.low:g}")
        return self

    def values(self) -> list:
        """Its end points (a range) or its choices: what validating the space tries."""
        return self.choices if self.choices is not None else [self.low, self.high]

    def holds(self, value) -> bool:
        """Whether a trial can take `value`: one of the choices, or inside the range (a whole number if integer)."""
        if self.choices is not None:
            return value in self.choices
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high
                and (not self.integer or float(value).is_integer()))


class TuneParams(Strict):
    """`graft tune`: an Optuna study over `finetune` on the validation split (components/tune.py)."""

    trials: int = Field(default=20, ge=1)           # trials the study ends with (finished ones count: a resumed
                                                    # study runs only the rest)
    executor: Literal["sequential", "dask"] = "sequential"  # dask: trials in parallel on sweep.dask's cluster (flows/tune.py)
    timeout_minutes: float | None = Field(default=None, gt=0)  # stop starting trials after this long
    seed: int = 0                                   # the sampler's (TPE) seed
    # what a trial scores on the val split, and the pruner compares: balanced accuracy weighs each class the same
    objective: ValScore = "val_accuracy"
    startup_trials: int = Field(default=5, ge=1)    # random trials before TPE models the space; none pruned before
    prune_after_steps: int = Field(default=100, ge=0)  # no trial pruned before this training step (median pruner)
    prune_below: float | None = Field(default=None, ge=0)  # also prune a trial whose objective falls below this
    storage: str | None = None  # an Optuna storage URL (postgresql://..., sqlite:///...); null: .graft/tune/study.journal
    current_first: bool = True  # a new study's first trial: params.yaml's own values (when the space holds them)
    # dotted finetune key: its range or choices
    space: dict[str, SearchRange] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys_are_finetune(self) -> TuneParams:
        if bad := [key for key in self.space if not key.startswith("finetune.")]:
            raise ValueError(f"tune.space keys {bad} are not finetune keys: tune searches `finetune` (e.g. "
                             f"finetune.lr, finetune.augment.rotate_degrees)")
        return self

    @model_validator(mode="after")
    def _storage_serves_the_executor(self) -> TuneParams:
        if self.executor == "dask" and (self.storage or "").startswith("sqlite"):
            raise ValueError(f"tune.storage {self.storage!r} with tune.executor dask: SQLite cannot hand a queued trial "
                             f"to exactly one of the parallel workers (two can run it and the study fails); leave "
                             f"tune.storage null (a journal file in .graft/tune/, safe across processes) or name a "
                             f"database server (postgresql://...)")
        return self


def dotted_change(key: str, value) -> dict:
    """`finetune.augment.scale: x` as the nested change {augment: {scale: x}} of `finetune`."""
    change = value
    for part in reversed(key.split(".")[1:]):
        change = {part: change}
    return change


class StorageParams(Strict):
    dvc_remote: str | None = None  # a folder, ssh://..., s3://...: each successful run pushes there (dvc push)


class Settings(Params):
    """params.yaml, every section: what `graft` validates before any stage or server starts."""

    gates: GateParams = GateParams()
    promotion: PromotionParams = PromotionParams()
    registry: RegistryParams = RegistryParams()
    serving: ServingSettings = ServingSettings()
    schedule: ScheduleParams = ScheduleParams()
    sweep: SweepParams = SweepParams()
    storage: StorageParams = StorageParams()
    production: ProductionParams = ProductionParams()
    tune: TuneParams = TuneParams()
    model_card: ModelCardParams = ModelCardParams()

    @model_validator(mode="after")
    def _sweep_strategies_are_finetune_settings(self) -> Settings:
        for name in self.sweep.strategies:
            try:
                self.sweep_finetune(name)
            except ValidationError as error:
                raise ValueError(f"sweep.strategies.{name} is not a valid change of finetune:\n"
                                 f"{describe(error, FinetuneParams)}") from None
        return self

    @model_validator(mode="after")
    def _tune_space_is_finetune_settings(self) -> Settings:
        for key, values in self.tune.space.items():
            for value in values.values():
                try:
                    self.tuned_finetune({key: value})
                except ValidationError as error:
                    raise ValueError(f"tune.space.{key}: {value!r} is not a valid finetune setting:\n"
                                     f"{describe(error, FinetuneParams)}") from None
        return self

    def tuned_finetune(self, values: dict) -> FinetuneParams:
        """params.yaml's finetune with a trial's values (dotted finetune keys) in place."""
        changes: dict = {}
        for key, value in values.items():
            changes = merged(changes, dotted_change(key, value))
        return FinetuneParams.model_validate(merged(self.finetune.model_dump(), changes))

    def sweep_finetune(self, name: str) -> FinetuneParams:
        """The finetune params of one sweep strategy: params.yaml's, with the strategy's changes."""
        return FinetuneParams.model_validate(merged(self.finetune.model_dump(), self.sweep.strategies[name]))


def parse_settings(raw: dict) -> Settings:
    return validated(Settings, raw)


def load_settings(path: str | Path = "params.yaml") -> Settings:
    return parsed_params_file(path, parse_settings)
