"""`graft tune`: an Optuna study over `finetune` (params.yaml `tune.space`) on the validation split, each trial an
MLflow child run under the study's parent run.

A trial trains as the pipeline's finetune stage does (train_target: the selected source, the strategy, the prepared
target data) with the trial's values in place, on that data with its test split taken out before any trial gets it:
the objective is the val split's accuracy or balanced accuracy (tune.objective; the restored best evaluation's when
early stopping is on), and the test split is never read. Each evaluation is reported to a median pruner (once
tune.startup_trials trials finished and after tune.prune_after_steps steps) and, with tune.prune_below, to a floor; a
pruned trial ends there and is recorded as pruned, in the study and on its run.

The study lives in an Optuna storage (tune.storage, a database; by default a journal file, .graft/tune/study.journal,
which parallel workers share safely: on SQLite two can run the same queued trial) under a name made of what it
computes (the space, the rest of finetune, the data version, the source), so running again resumes it: finished
trials (complete or pruned) are kept, and a trial a killed process left running is marked failed and its values are
queued again, so it is redone whole. A new study's first trial is params.yaml's own values (tune.current_first, where
the space holds them), so that the report can say whether the best leads them by more than the val split's noise. The
best values are proposed, never written into params.yaml: reports/tune.md (each key, current -> proposed),
reports/tune-best.yaml (the change, in params.yaml's shape), plots/tune-history.png and plots/tune-importance.png, all
on the parent run too.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import optuna
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

matplotlib.use("Agg")

from components import data as data_mod  # noqa: E402
from components.artifacts import atomic_path, read_json, save_png, sha256_json, write_json  # noqa: E402
from components.config import VAL_METRICS  # noqa: E402
from components.errors import GraftError  # noqa: E402
from components.layout import Layout  # noqa: E402
from components.registry import use_experiment  # noqa: E402
from components.settings import SearchRange, Settings, dotted_change, merged  # noqa: E402
from components.stages.train_target import train_target  # noqa: E402
from deploy.tags import TUNE_STATE_TAG, TUNE_STUDY_TAG, TUNE_TRIAL_TAG  # noqa: E402

REPORT = Path("reports/tune.json")
MARKDOWN = Path("reports/tune.md")
BEST = Path("reports/tune-best.yaml")
HISTORY_PLOT = Path("plots/tune-history.png")
IMPORTANCE_PLOT = Path("plots/tune-importance.png")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
BAND = 1.96 * math.sqrt(2)  # standard errors: a 95% band on the difference of two independent accuracies


class TuneError(GraftError, ValueError):
    pass


def tuning_splits(path: str | Path) -> data_mod.Splits:
    """The prepared target data as trials get it: its test split taken out, so that no trial can read it; only its
    images' digests stay, so that a trial's unlabelled images (FixMatch, adaptation) still leave them out."""
    splits = data_mod.load_splits(Path(path))
    return replace(splits, x_test=splits.x_test[:0], y_test=splits.y_test[:0], origin_test=splits.origin_test[:0],
                   held_out_digests=splits.held_out_digests | {data_mod.pixels_digest(image) for image in splits.x_test})


def study_name(params: Settings, splits: data_mod.Splits, source: dict) -> str:
    """What the study computes: its space and objective, the finetune it changes, the data and the source (not how
    many trials, nor where it is stored: a study resumes with more trials)."""
    return "tune-" + sha256_json({"space": params.tune.model_dump(mode="json")["space"],
                                  "objective": params.tune.objective,
                                  "finetune": params.finetune.model_dump(mode="json"), "seed": params.seed,
                                  "sampler_seed": params.tune.seed, "data_version": splits.data_version,
                                  "source": source})[:16]


def study_location(root: Path, params: Settings) -> str:
    """tune.storage (a database URL), or by default the journal file in .graft/tune/."""
    if params.tune.storage:
        return params.tune.storage
    folder = root / ".graft" / "tune"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / "study.journal")


def _storage(location: str) -> str | JournalStorage:
    """The Optuna storage at `location`: a database URL as it is, else a journal file, whose lock hands each queued
    trial to exactly one of the processes that ask for it (SQLite's rows take no lock: two can both take it)."""
    return location if "://" in location else JournalStorage(JournalFileBackend(location))


def suggest(trial: optuna.Trial, space: dict[str, SearchRange]) -> dict:
    """The trial's value for every key of the space."""
    values = {}
    for key, dimension in space.items():
        if dimension.choices is not None:
            values[key] = trial.suggest_categorical(key, dimension.choices)
        elif dimension.integer:
            values[key] = trial.suggest_int(key, int(dimension.low), int(dimension.high), log=dimension.log)
        else:
            values[key] = trial.suggest_float(key, dimension.low, dimension.high, log=dimension.log)
    return values


@dataclass(frozen=True)
class TunePlan:
    root: str
    tracking_uri: str
    experiment_id: str
    study_name: str
    storage: str
    parent_run_id: str
    data: str  # the prepared target data the trials train on (their test split taken out when read)


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _study(plan: TunePlan, params: Settings, worker: int = 0) -> optuna.Study:
    """The study in its storage, as worker `worker` of those running trials at once sees it: its sampler seeded
    tune.seed + worker (workers seeded alike would propose the same values), and, with tune.executor dask, TPE's
    constant liar (a running trial counts as a poor one, so parallel workers spread out)."""
    rules = params.tune
    pruner = optuna.pruners.MedianPruner(n_startup_trials=rules.startup_trials, n_warmup_steps=rules.prune_after_steps)
    if rules.prune_below is not None:
        pruner = _Floor(pruner, rules.prune_below, rules.prune_after_steps)
    sampler = optuna.samplers.TPESampler(seed=rules.seed + worker, n_startup_trials=rules.startup_trials,
                                         constant_liar=rules.executor == "dask")
    return optuna.create_study(study_name=plan.study_name, storage=_storage(plan.storage), load_if_exists=True,
                               direction="maximize", pruner=pruner, sampler=sampler)


class _Floor(optuna.pruners.BasePruner):
    """The median pruner's verdict, or below `floor` at an evaluation after `after_steps`: pruned."""

    def __init__(self, median: optuna.pruners.BasePruner, floor: float, after_steps: int) -> None:
        self.median, self.floor, self.after_steps = median, floor, after_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is not None and step >= self.after_steps and trial.intermediate_values[step] < self.floor:
            return True
        return self.median.prune(study, trial)


def open_tune(root: str | Path, params: Settings) -> tuple[TunePlan, optuna.Study]:
    """The study found again in its storage or created, trials a killed run left running queued again, and its
    parent run found again or created."""
    _quiet_optuna()
    root = Path(root).resolve()
    if not params.tune.space:
        raise TuneError("tune.space is empty: name what to search in params.yaml, e.g. "
                        "tune.space: {finetune.lr: {low: 0.0003, high: 0.01, log: true}}")
    if not (root / Layout.selected_source).exists():
        raise TuneError("no selected source yet: the study tunes the pipeline's; run `dvc repro select_source` first")
    source = read_json(root / Layout.selected_source)
    splits = tuning_splits(root / Layout.selected_data)
    if not len(splits.y_val):
        raise TuneError("the prepared target has no val split to tune on: set data.target.val_size above 0")
    experiment_id = use_experiment(params.registry, root)
    name = study_name(params, splits, source)
    plan = TunePlan(str(root), mlflow.get_tracking_uri(), experiment_id, name, study_location(root, params), "",
                    str(root / Layout.selected_data))
    study = _study(plan, params)
    current = current_recipe(params)
    if params.tune.current_first and current is not None and not study.get_trials(deepcopy=False):
        study.enqueue_trial(current)  # a new study: what params.yaml does now, scored by the same rules as the rest
    for left in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # its process was killed
        study.tell(left.number, state=TrialState.FAIL)
        study.enqueue_trial(left.params)
        print(f"tune: trial {left.number} was left running by a stopped run: it is run again", flush=True)
    client = MlflowClient()
    runs = client.search_runs([experiment_id], f"tags.`{TUNE_STUDY_TAG}` = '{name}'", max_results=10000)
    parent = next((r.info.run_id for r in runs if TUNE_TRIAL_TAG not in r.data.tags), None)
    if parent is None:
        parent = client.create_run(experiment_id, run_name=name, tags={TUNE_STUDY_TAG: name}).info.run_id
        client.log_batch(parent, params=[Param(k, str(v)) for k, v in {
            "source": source["name"], "data_version": splits.data_version, "storage": plan.storage,
            "space": ", ".join(params.tune.space)}.items()])
    return replace(plan, parent_run_id=parent), study


def run_trial(plan: TunePlan, params: Settings, trial: optuna.Trial) -> float:
    """One trial as an MLflow child run of the study's parent: its values in finetune, trained on the data without
    its test split; each evaluation reported to the pruner. Its objective: tune.objective's value it ends with."""
    values = suggest(trial, params.tune.space)
    finetune = params.tuned_finetune(values)
    client = MlflowClient(plan.tracking_uri)
    run_id = client.create_run(plan.experiment_id, run_name=f"trial {trial.number}", tags={
        TUNE_STUDY_TAG: plan.study_name, TUNE_TRIAL_TAG: str(trial.number),
        MLFLOW_PARENT_RUN_ID: plan.parent_run_id}).info.run_id
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in values.items()])

    objective = params.tune.objective

    def report(record: dict) -> None:
        step, value = int(record["step"]), record[objective]
        client.log_batch(run_id, metrics=[Metric(key, record[key], int(time.time() * 1000), step)
                                          for key in VAL_METRICS])
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{_said(objective)} {value:.4f} at step {step}")

    started = time.perf_counter()
    try:
        with contextlib.chdir(plan.root):  # the stages' paths (the selected source) are relative to the project
            _, history, extra = train_target(params.model_copy(update={"finetune": finetune}), finetune.strategy,
                                             tuning_splits(plan.data), on_evaluation=report)
    except optuna.TrialPruned as pruned:
        client.set_tag(run_id, TUNE_STATE_TAG, "pruned")
        client.set_terminated(run_id, "KILLED")
        _say_trial(trial, f"pruned ({pruned})", values, time.perf_counter() - started)
        raise
    except BaseException:
        client.set_tag(run_id, TUNE_STATE_TAG, "failed")
        client.set_terminated(run_id, "FAILED")
        raise
    value = history[-1][objective]
    client.log_batch(run_id, metrics=[Metric(f"objective_{objective}", value, int(time.time() * 1000), 0),
                                      Metric("train_seconds", time.perf_counter() - started, int(time.time() * 1000), 0)],
                     tags=[mlflow.entities.RunTag(TUNE_STATE_TAG, "complete")])
    client.set_terminated(run_id, "FINISHED")
    _say_trial(trial, f"{_said(objective)} {value:.4f}", values, time.perf_counter() - started)
    return value


def _said(objective: str) -> str:
    """tune.objective as a report says it: val_balanced_accuracy, "val balanced accuracy"."""
    return objective.replace("_", " ")


def _say_trial(trial: optuna.Trial, outcome: str, values: dict, seconds: float) -> None:
    """One line a trial, as it ends: between the training bars, what it tried and what it scored."""
    tried = ", ".join(f"{key.removeprefix('finetune.')} {value:.4g}" if isinstance(value, float)
                      else f"{key.removeprefix('finetune.')} {value}" for key, value in values.items())
    print(f"tune: trial {trial.number} {outcome} in {seconds:.0f} s ({tried})", flush=True)


def start_tune(root: str | Path, params: Settings, trials: int | None = None) -> tuple[TunePlan, int]:
    """The study opened (open_tune) and how many trials it still needs to end with `trials` finished ones
    (default tune.trials)."""
    plan, study = open_tune(root, params)
    wanted = trials or params.tune.trials
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    todo = max(0, wanted - finished)
    print(f"tune: study {plan.study_name} ({plan.storage}): {finished} trials finished before, {todo} to run; "
          f"the val split only ({len(tuning_splits(plan.data).y_val)} images)", flush=True)
    return plan, todo


def run_trials(plan: TunePlan, params: Settings, count: int, worker: int = 0) -> None:
    """`count` trials of the study, one after another in this process, as worker `worker` (_study); other
    processes may run trials of the same study at the same time, through its storage."""
    _quiet_optuna()
    logging.getLogger("optuna").setLevel(logging.WARNING)
    timeout = params.tune.timeout_minutes * 60 if params.tune.timeout_minutes else None
    _study(plan, params, worker).optimize(lambda trial: run_trial(plan, params, trial), n_trials=count,
                                          timeout=timeout, catch=(), gc_after_trial=True)


def worker_shares(todo: int, workers: int) -> list[int]:
    """`todo` trials split as evenly as they go over at most `workers` workers."""
    return [share for share in (todo // workers + (i < todo % workers) for i in range(workers)) if share]


def run_tune(root: str | Path, params: Settings, trials: int | None = None) -> dict:
    """The study to `trials` finished trials (default tune.trials), one trial after another in this process; then
    its report and proposal. flows/tune.py runs the trials on Dask instead."""
    plan, todo = start_tune(root, params, trials)
    started = time.perf_counter()
    if todo:
        run_trials(plan, params, todo)
    return close_tune(plan, params, time.perf_counter() - started)


def close_tune(plan: TunePlan, params: Settings, seconds: float) -> dict:
    """The study's report, proposal and plots, written and logged on the parent run, which ends."""
    root = Path(plan.root)
    study = _study(plan, params)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise TuneError(f"no trial of study {plan.study_name} completed ({len(trials)} tried, "
                        f"{sum(t.state == TrialState.PRUNED for t in trials)} pruned): nothing to propose; raise "
                        f"tune.trials or loosen the pruner (tune.prune_after_steps, tune.prune_below)")
    best = study.best_trial
    current = _current_values(params)
    own = next((t for t in trials if t.params == current and t.state in FINISHED), None)
    objective, y_val = params.tune.objective, tuning_splits(plan.data).y_val
    report = {"study": plan.study_name, "storage": plan.storage, "parent_run_id": plan.parent_run_id,
              "objective": objective,
              "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                          "last_step": t.last_step} for t in trials],
              "best": {"number": best.number, "value": best.value, "params": best.params},
              "noise": val_noise({t.number: t.value for t in complete}, len(y_val), _measured_as(y_val, objective)),
              "current": current, "seconds_this_run": round(seconds, 1),
              "current_trial": None if own is None else {"number": own.number, "state": own.state.name.lower(),
                                                         "value": own.value}}
    write_json(root / REPORT, report)
    change: dict = {}
    for key, value in best.params.items():
        change = merged(change, {"finetune": dotted_change(key, value)})
    with atomic_path(root / BEST) as tmp:
        tmp.write_text("# graft tune's proposal: the best trial's values (val split only). Not applied: copy what you\n"
                       f"# want into params.yaml. Study {plan.study_name}, trial {best.number}, {_said(objective)} "
                       f"{best.value:.4f}\n" + yaml.safe_dump(change, sort_keys=False))
    with atomic_path(root / MARKDOWN) as tmp:
        tmp.write_text(markdown(report))
    _plots(study, root)
    client = MlflowClient(plan.tracking_uri)
    client.log_metric(plan.parent_run_id, f"best_{objective}", best.value)
    for path in (REPORT, MARKDOWN, BEST, HISTORY_PLOT, IMPORTANCE_PLOT):
        if (root / path).exists():
            client.log_artifact(plan.parent_run_id, str(root / path), "tune")
    client.set_terminated(plan.parent_run_id, "FINISHED")
    return report


def val_noise(values: dict[int, float], val_images: int, measured_as: float | None = None) -> dict:
    """How far the val split can rank the trials: one standard error of an accuracy at the best's level
    on `val_images` images (or as many as the objective is worth: _measured_as), and the other trials the best does
    not lead by more than BAND of them (as if independent: an upper bound, as trials scored on the same images err
    together). On a small val split the best is often one of several a rerun could reorder."""
    best_number = max(values, key=values.get)
    best, images = values[best_number], measured_as or val_images
    adjusted = (best * images + 2) / (images + 4)  # Agresti-Coull: a perfect score is not exact either
    error = math.sqrt(adjusted * (1 - adjusted) / (images + 4))
    tied = sorted((n for n, v in values.items() if n != best_number and best - v <= BAND * error),
                  key=lambda n: -values[n])
    return {"val_images": val_images, "measured_as": images, "standard_error": error, "not_told_apart": tied,
            "compared": len(values) - 1}


def _measured_as(y_val: np.ndarray, objective: str) -> float:
    """How many images the objective is measured on, as far as its noise goes: all of them for accuracy; for balanced
    accuracy, the size of a split of equal classes that measures it as closely, K^2 / sum(1 / n_c) (each class's
    recall weighs 1/K, so the small classes set the noise)."""
    sizes = np.bincount(y_val)
    sizes = sizes[sizes > 0]
    return float(len(y_val)) if objective == "val_accuracy" else float(len(sizes) ** 2 / (1 / sizes).sum())


def current_recipe(params: Settings) -> dict | None:
    """params.yaml's own values of the space's keys, as a trial would take them; None where the space does not
    hold one of them (a trial cannot take it)."""
    values = _current_values(params)
    return values if all(params.tune.space[key].holds(value) for key, value in values.items()) else None


def _current_values(params: Settings) -> dict:
    return {key: _current(params, key) for key in params.tune.space}


def _current(params: Settings, key: str):
    node = params.finetune.model_dump()
    for part in key.split(".")[1:]:
        node = node[part]
    return node


def markdown(report: dict) -> str:
    states = [t["state"] for t in report["trials"]]
    best = report["best"]
    said = _said(report["objective"])
    lines = [f"Study {report['study']}: {len(states)} trials ({states.count('complete')} complete, "
             f"{states.count('pruned')} pruned, {states.count('fail')} failed); best: trial {best['number']}, "
             f"{said} {best['value']:.4f}. Proposed, not applied (reports/tune-best.yaml):", "",
             *_noise_lines(report["noise"], report["objective"]), *_current_lines(report),
             "| key | params.yaml now | proposed |", "| --- | --- | --- |"]
    for key, value in best["params"].items():
        lines.append(f"| {key} | {report['current'][key]} | {_shown(value)} |")
    lines += ["", f"| trial | state | {said} | last step | " + " | ".join(best["params"]) + " |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in best["params"]) + " |"]
    for t in report["trials"]:
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        lines.append(f"| {t['number']} | {t['state']} | {value} | {t['last_step'] if t['last_step'] is not None else ''} | "
                     + " | ".join(_shown(t["params"].get(key, "")) for key in best["params"]) + " |")
    return "\n".join(lines) + "\n"


def _noise_lines(noise: dict, objective: str) -> list[str]:
    tied = noise["not_told_apart"]
    if tied:
        verdict = (f"trial(s) {', '.join(map(str, tied))} within {BAND:.1f} standard errors of the best (a 95% band "
                   f"on a difference): this split cannot rank them apart, more val images (data.target.val_size) "
                   f"would")
    elif noise["compared"]:
        verdict = f"every other trial more than {BAND:.1f} standard errors below the best (a 95% band on a difference)"
    else:
        verdict = "no other trial completed to compare it with"
    images, worth = noise["val_images"], noise["measured_as"]
    unequal = f" (its unequal classes count as {worth:.0f} equal-class images would)" if worth < images - 0.5 else ""
    measured = "a balanced accuracy" if objective == "val_balanced_accuracy" else "an accuracy"
    return [f"The val split's {images} images{unequal} measure {measured} at the best's level to "
            f"+-{100 * noise['standard_error']:.1f} points (one standard error); {verdict}.", ""]


def _current_lines(report: dict) -> list[str]:
    own, best = report["current_trial"], report["best"]
    if own is None:
        said = ("params.yaml's own values are not among the trials (outside the space, or tune.current_first off): "
                "the proposal is not measured against them")
    elif own["state"] == "pruned":
        said = (f"params.yaml's own values (trial {own['number']}) were pruned: stopped early, behind the other "
                f"trials at the same step or below tune.prune_below")
    elif own["number"] == best["number"]:
        said = f"The best trial is params.yaml's own values (trial {own['number']}): keep them"
    else:
        lead = f"by {100 * (best['value'] - own['value']):.1f} points"
        said = (f"params.yaml's own values (trial {own['number']}) scored {own['value']:.4f}: the proposal "
                + (f"leads them {lead}, inside that band: this split gives no reason to change them"
                   if own["number"] in report["noise"]["not_told_apart"] else f"leads them {lead}, beyond that band"))
    return [said + ".", ""]


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(study: optuna.Study, root: Path) -> None:
    """The optimisation history and (with two complete trials or more) each key's importance (Optuna's default
    evaluator: PED-ANOVA in Optuna 5; with few trials it warns that it cannot tell them apart, and says so by
    drawing them equal)."""
    for path, draw, needed in ((HISTORY_PLOT, optuna.visualization.matplotlib.plot_optimization_history, 1),
                               (IMPORTANCE_PLOT, optuna.visualization.matplotlib.plot_param_importances, 2)):
        if sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) < needed:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            axis = draw(study)
        axis.figure.set_size_inches(8, 4.5)
        axis.figure.tight_layout()
        save_png(axis.figure, root / path)
