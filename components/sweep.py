"""`graft sweep`: learning curves. Strategies x labels per class x seeds over one prepared data set and the
selected source, each branch an MLflow child run under one parent run.

The target is prepared once with every training label, before any branch starts; a branch keeps k labels a class drawn with its seed
(the same draw the pipeline makes with data.target.labels_per_class: k and seed) and trains with its strategy's
finetune params (sweep.strategies: changes to params.yaml's `finetune`). Val and test splits are the
pipeline's, for every branch. The parent run is found again by the sweep's identity (its params, the data
version, the source), so a sweep that stopped resumes: a branch with a finished child run is not redone.

A branch is a plain function of plain values (`run_logged_branch`: the plan, the params, the branch), so it runs
the same in this process (sweep.executor: sequential) or on any Dask worker (flows/sweep.py): it logs its own
child run straight to the tracking store, tagged with the worker that ran it.

Negative transfer, transfer below scratch, is marked only beyond the seed noise: on every seed, and by more on
average than the larger seed spread (standard deviation) of the two.
"""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from components import data as data_mod  # noqa: E402
from components.artifacts import atomic_path, read_json, save_png, sha256_json, write_json  # noqa: E402
from components.settings import Settings  # noqa: E402
from deploy.tags import SWEEP_BRANCH_TAG, SWEEP_ID_TAG, SWEEP_WORKER_TAG  # noqa: E402
from components.errors import GraftError  # noqa: E402
from components.evaluate import score  # noqa: E402
from components.layout import Layout  # noqa: E402
from components.objectives import require_source_data  # noqa: E402
from components.registry import use_experiment  # noqa: E402
from components.predict import predict_classes  # noqa: E402
from components.stages.train_target import train_target  # noqa: E402

POOL_FILE = "target-all-labels.npz"
REPORT = Path("reports/sweep.json")
MARKDOWN = Path("reports/sweep.md")
PLOT = Path("plots/sweep-learning-curves.png")


class SweepError(GraftError, ValueError):
    pass


@dataclass(frozen=True)
class Branch:
    strategy: str          # a sweep.strategies name
    labels: int | None     # labels a class; None: every training label
    seed: int

    @property
    def key(self) -> str:
        return f"{self.strategy}/k={self.labels or 'all'}/seed={self.seed}"


def branches(params: Settings) -> list[Branch]:
    """Fewest labels first, so the curve fills from the left; every strategy of a (k, seed) together."""
    return [Branch(strategy, labels, seed) for labels in params.sweep.labels_per_class for seed in params.sweep.seeds
            for strategy in params.sweep.strategies]


def labelled_subset(pool: data_mod.Splits, labels: int | None, seed: int) -> data_mod.Splits:
    """The pool's training split cut to `labels` a class with `seed`, as data.prepare cuts it."""
    if labels is None:
        return pool
    keep = data_mod.k_per_class(pool.y_train, labels, np.random.default_rng(seed))
    return replace(pool, x_train=pool.x_train[keep], y_train=pool.y_train[keep], origin_train=pool.origin_train[keep])


def prepare_pool(params: Settings, image_size: int, folder: Path) -> Path:
    """The target with every training label, at the selected source's input size (prepared once a sweep)."""
    target = params.data.target.model_copy(update={"labels_per_class": None})
    path = folder / POOL_FILE
    data_mod.prepare(target, params.data, params.data.channels, [image_size], params.seed, path, path.with_suffix(".json"))
    return path


@functools.lru_cache(maxsize=1)
def _read_pool(path: str, modified_ns: int) -> data_mod.Splits:
    return data_mod.load_splits(Path(path))


def load_pool(path: str | Path) -> data_mod.Splits:
    """The prepared pool, read once a process however many branches it runs (a rewritten file is read again)."""
    return _read_pool(str(path), os.stat(path).st_mtime_ns)


def sweep_identity(params: Settings, pool: data_mod.Splits, source: dict) -> str:
    # Where the branches run (executor, Dask) is not what they compute: a sweep resumes on another executor.
    return sha256_json({"sweep": params.sweep.model_dump(mode="json", exclude={"executor", "dask"}),
                        "finetune": params.finetune.model_dump(mode="json"), "data_version": pool.data_version,
                        "source": source})[:16]


def _finished_branches(client: MlflowClient, experiment_id: str, sweep_id: str) -> tuple[str | None, dict[str, dict]]:
    runs = client.search_runs([experiment_id], f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}'", max_results=10000)
    parent = next((r.info.run_id for r in runs if SWEEP_BRANCH_TAG not in r.data.tags), None)
    done = {r.data.tags[SWEEP_BRANCH_TAG]: {"run_id": r.info.run_id, **r.data.metrics}
            for r in runs if SWEEP_BRANCH_TAG in r.data.tags and r.info.status == "FINISHED"}
    return parent, done


def run_branch(params: Settings, branch: Branch, pool: data_mod.Splits) -> dict:
    finetune = params.sweep_finetune(branch.strategy)
    branch_params = params.model_copy(update={"finetune": finetune, "seed": branch.seed})
    splits = labelled_subset(pool, branch.labels, branch.seed)
    model, history, extra = train_target(branch_params, finetune.strategy, splits)
    test = score(splits.y_test, predict_classes(model, splits.x_test), splits.classes)
    metrics = {"test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1,
               "val_accuracy": history[-1].get("val_accuracy", float("nan")), "train_examples": int(len(splits.y_train)),
               "train_seconds": extra["train_seconds"]}
    for term in extra.get("objective", []):
        if "weights" in term:  # instance weights: how many source examples the weighted pool is worth
            metrics["source_effective_sample_size"] = term["weights"]["effective_sample_size"]
    return metrics


@dataclass(frozen=True)
class SweepPlan:
    """What every branch needs, wherever it runs: plain values, sent to Dask workers as they are."""

    root: str               # the project folder, absolute (a worker on another machine needs it on shared storage)
    tracking_uri: str
    experiment_id: str
    sweep_id: str
    parent_run_id: str
    pool: str               # the target with every label, prepared once for all branches
    todo: tuple[Branch, ...]
    done: dict[str, dict]   # branch key -> its metrics and run id, for branches finished before


def open_sweep(root: str | Path, params: Settings) -> SweepPlan:
    """The sweep's data prepared once, its parent run found again or created, and the branches still to run."""
    root = Path(root).resolve()
    if not (root / Layout.selected_source).exists():
        raise SweepError("no selected source yet: the sweep reuses the pipeline's; run `dvc repro select_source` first")
    source = read_json(root / Layout.selected_source)
    if needs_data := [name for name in params.sweep.strategies if params.sweep_finetune(name).joint.weight > 0]:
        require_source_data(source["name"], source["kind"], list(params.sources.pipeline),
                            f"sweep.strategies {', '.join(needs_data)} (finetune.joint)", "drop those strategies")
    experiment_id = use_experiment(params.registry, root)
    client = MlflowClient()
    folder = root / ".graft" / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    pool_path = prepare_pool(params, source["image_size"], folder)
    pool = load_pool(pool_path)
    sweep_id = sweep_identity(params, pool, source)
    parent_id, done = _finished_branches(client, experiment_id, sweep_id)
    if parent_id is None:
        parent_id = client.create_run(experiment_id, run_name=f"sweep-{sweep_id}", tags={SWEEP_ID_TAG: sweep_id}).info.run_id
        client.log_batch(parent_id, params=[Param(k, str(v)) for k, v in {
            "source": source["name"], "data_version": pool.data_version, "labels_per_class": params.sweep.labels_per_class,
            "seeds": params.sweep.seeds, "strategies": ", ".join(params.sweep.strategies)}.items()])
    plan = branches(params)
    todo = tuple(b for b in plan if b.key not in done)
    print(f"sweep {sweep_id}: {len(plan)} branches ({len(params.sweep.strategies)} strategies x "
          f"{len(params.sweep.labels_per_class)} label counts x {len(params.sweep.seeds)} seeds) on source "
          f"{source['name']}; {len(plan) - len(todo)} finished before, {len(todo)} to run", flush=True)
    return SweepPlan(str(root), mlflow.get_tracking_uri(), experiment_id, sweep_id, parent_id, str(pool_path), todo, done)


def run_logged_branch(plan: SweepPlan, params: Settings, branch: Branch) -> dict:
    """One branch as an MLflow child run of the sweep's parent, in this process (the sweep's own, or a Dask
    worker's): its metrics, run id and the worker that ran it."""
    client = MlflowClient(plan.tracking_uri)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    run_id = client.create_run(plan.experiment_id, run_name=branch.key, tags={
        SWEEP_ID_TAG: plan.sweep_id, SWEEP_BRANCH_TAG: branch.key, SWEEP_WORKER_TAG: worker,
        MLFLOW_PARENT_RUN_ID: plan.parent_run_id}).info.run_id
    try:
        client.log_batch(run_id, params=[Param("strategy", branch.strategy), Param("labels_per_class", str(branch.labels or "all")),
                                         Param("seed", str(branch.seed)),
                                         Param("changes", str(params.sweep.strategies[branch.strategy]))])
        with contextlib.chdir(plan.root):  # the stages' paths (the selected source) are relative to the project
            metrics = run_branch(params, branch, load_pool(plan.pool))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "worker": worker, **metrics}


def close_sweep(plan: SweepPlan, params: Settings, results: dict[str, dict]) -> dict:
    """The table, the plot and the report from every branch (earlier ones and `results`), also on the parent run."""
    root = Path(plan.root)
    done = {**plan.done, **results}
    pool = load_pool(plan.pool)  # in the process that opened the sweep: already read
    report = summarise(params, branches(params), done, pool)
    report.update(sweep_id=plan.sweep_id, parent_run_id=plan.parent_run_id, source=read_json(root / Layout.selected_source)["name"],
                  data_version=pool.data_version, workers=sorted({r["worker"] for r in results.values()}))
    write_json(root / REPORT, report)
    with atomic_path(root / MARKDOWN) as tmp:
        tmp.write_text(markdown_table(report))
    plot_learning_curves(report, root / PLOT)
    client = MlflowClient(plan.tracking_uri)
    for path in (REPORT, MARKDOWN, PLOT):
        client.log_artifact(plan.parent_run_id, str(root / path), "sweep")
    client.set_terminated(plan.parent_run_id, "FINISHED")
    return report


def run_sweep(root: str | Path, params: Settings) -> dict:
    """The whole sweep in this process, one branch after another (`graft sweep` with sweep.executor: sequential;
    flows/sweep.py runs the same branches in parallel on Dask)."""
    plan = open_sweep(root, params)
    results = {branch.key: run_logged_branch(plan, params, branch) for branch in tqdm(plan.todo, desc="sweep", unit="branch")}
    return close_sweep(plan, params, results)


def summarise(params: Settings, plan: list[Branch], done: dict[str, dict], pool: data_mod.Splits) -> dict:
    """Per strategy and label count: the test accuracy of each seed, mean, spread, and against scratch."""
    reference = next((name for name in params.sweep.strategies if params.sweep_finetune(name).strategy == "scratch"), None)
    per_class_all = len(pool.y_train) / len(pool.classes)
    rows = []
    for strategy in params.sweep.strategies:
        for labels in params.sweep.labels_per_class:
            seeds = [b.seed for b in plan if (b.strategy, b.labels) == (strategy, labels)]
            accuracy = [done[Branch(strategy, labels, s).key]["test_accuracy"] for s in seeds]
            row = {"strategy": strategy, "labels_per_class": labels, "x": labels or per_class_all, "seeds": seeds,
                   "accuracy": accuracy, "mean": statistics.mean(accuracy),
                   "std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0}
            if reference and strategy != reference:
                scratch = [done[Branch(reference, labels, s).key]["test_accuracy"] for s in seeds]
                gaps = [a - b for a, b in zip(accuracy, scratch)]
                noise = max(row["std"], statistics.stdev(scratch) if len(scratch) > 1 else 0.0)
                row["minus_scratch"] = gaps
                # One seed has no noise estimate: never called negative.
                row["negative_transfer"] = len(gaps) > 1 and max(gaps) < 0 and -statistics.mean(gaps) > noise
            rows.append(row)
    return {"reference": reference, "classes": len(pool.classes), "test_examples": int(len(pool.y_test)), "rows": rows}


def markdown_table(report: dict) -> str:
    labels = sorted({r["x"] for r in report["rows"]})
    heads = [f"{next(r['labels_per_class'] for r in report['rows'] if r['x'] == x) or f'all ({x:.0f})'}" for x in labels]
    lines = [f"test accuracy % (mean ± std over seeds) by labels a class; ▼ transfer below {report['reference']} "
             "beyond the seed noise\n", f"| strategy | {' | '.join(heads)} |", f"| --- |{' --- |' * len(heads)}"]
    for strategy in dict.fromkeys(r["strategy"] for r in report["rows"]):
        cells = []
        for x in labels:
            row = next(r for r in report["rows"] if r["strategy"] == strategy and r["x"] == x)
            cells.append(f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}{' ▼' if row.get('negative_transfer') else ''}")
        lines.append(f"| {strategy} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot_learning_curves(report: dict, path: Path) -> Path:
    """Accuracy vs labels a class (log scale), a line per strategy, a band from the lowest to the highest seed."""
    figure, axis = plt.subplots(figsize=(8, 5))
    for strategy in dict.fromkeys(r["strategy"] for r in report["rows"]):
        rows = sorted((r for r in report["rows"] if r["strategy"] == strategy), key=lambda r: r["x"])
        x = [r["x"] for r in rows]
        line, = axis.plot(x, [100 * r["mean"] for r in rows], marker="o", label=strategy,
                          linestyle="--" if strategy == report["reference"] else "-")
        axis.fill_between(x, [100 * min(r["accuracy"]) for r in rows], [100 * max(r["accuracy"]) for r in rows],
                          color=line.get_color(), alpha=0.15)
        negative = [r for r in rows if r.get("negative_transfer")]
        axis.scatter([r["x"] for r in negative], [100 * r["mean"] for r in negative], marker="x", s=90, color="red", zorder=5,
                     label="negative transfer (beyond seed noise)" if negative and strategy == rows[0]["strategy"] else None)
    axis.set_xscale("log")
    axis.set_xlabel("labelled training images a class (log scale; the last point: all)")
    axis.set_ylabel(f"test accuracy % ({report['test_examples']} images)")
    axis.set_title("learning curves: a line per strategy, the band spans the seeds")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(figure, path)
