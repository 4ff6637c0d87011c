"""`graft tune` in a real project after `dvc repro`: an Optuna study on the val split, each trial an MLflow child run,
resumed after a kill without redoing finished trials, pruned trials recorded as pruned, the test split never read,
the best values proposed and params.yaml left alone. Tiny data and a tiny model: nothing here depends on how a trial
turns out."""
import contextlib
import os
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from components.data import pixels_digest, load_splits, without_held_out
from components.layout import Layout
from components.config import ParamsError
from components.settings import load_settings, parse_settings
from components.tune import (BEST, MARKDOWN, current_recipe, markdown, open_tune, run_tune, study_location, suggest,
                             tuning_splits, val_noise, worker_shares)
from components.tune import _measured_as, _noise_lines
from components.tune import _storage as study_storage
from deploy.tags import TUNE_STATE_TAG, TUNE_STUDY_TAG, TUNE_TRIAL_TAG
from tests.conftest import copy_workspace, graft_cli, tiny_params

SPACE = {"finetune.lr": {"low": 0.001, "high": 0.01, "log": True},
         "finetune.label_smoothing": {"choices": [0.0, 0.1]}}


def _project(candidate_template, dest, **tune) -> tuple:
    template, _ = candidate_template
    root = copy_workspace(template, dest)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tune"] = {"trials": 2, "startup_trials": 5, "prune_after_steps": 0, "space": SPACE, **tune}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root, f"sqlite:///{root / 'mlflow.db'}"


@contextlib.contextmanager
def _in(root, url):
    """This process pointed at the project and its registry, as `graft tune` is."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = url
    try:
        with contextlib.chdir(root):
            yield load_settings("params.yaml")
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def _trial_runs(url: str, study: str) -> dict[str, list]:
    client = MlflowClient(url)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{TUNE_STUDY_TAG}` = '{study}'", max_results=1000)
    trials: dict[str, list] = {}
    for run in runs:
        if TUNE_TRIAL_TAG in run.data.tags:
            trials.setdefault(run.data.tags[TUNE_TRIAL_TAG], []).append(run)
    return trials


def test_a_study_runs_trials_as_child_runs_proposes_the_best_and_resumes_a_killed_one(candidate_template, tmp_path):
    root, url = _project(candidate_template, tmp_path / "ws")
    before = (root / "params.yaml").read_bytes()
    done = graft_cli(root, url, "tune")
    assert "2 to run" in done.stdout and "| finetune.lr |" in done.stdout and "(one standard error)" in done.stdout
    assert (root / "params.yaml").read_bytes() == before, "the proposal is never written into params.yaml"
    with _in(root, url) as params:
        plan, study = open_tune(".", params)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        assert study.trials[0].params == {"finetune.lr": 0.003, "finetune.label_smoothing": 0.0}, "params.yaml's first"
        assert "params.yaml's own values (trial 0)" in done.stdout
        for trial in study.trials:  # a line a trial as it ends, between the training bars
            assert (f"tune: trial {trial.number} val accuracy {trial.value:.4f} in "
                    in done.stdout), done.stdout
        assert "s (lr 0.003, label_smoothing 0)" in done.stdout
        best = yaml.safe_load((root / BEST).read_text())["finetune"]
        assert best == {"lr": study.best_params["finetune.lr"],
                        "label_smoothing": study.best_params["finetune.label_smoothing"]}
        assert f"| {study.best_trial.number} | complete |" in (root / MARKDOWN).read_text()

        # A run killed in the middle of a trial leaves it running in the storage: the next run redoes it (its
        # values queued again), keeps the two finished ones, and ends with tune.trials finished.
        killed = study.ask()
        left = suggest(killed, params.tune.space)
        report = run_tune(".", params, trials=3)
    states = [t["state"] for t in report["trials"]]
    assert states == ["complete", "complete", "fail", "complete"]
    assert report["trials"][3]["params"] == left, "the killed trial's values, run again whole"
    runs = _trial_runs(url, plan.study_name)
    assert sorted(runs) == ["0", "1", "3"] and all(len(r) == 1 for r in runs.values()), "no finished trial redone"
    assert {r[0].data.tags[TUNE_STATE_TAG] for r in runs.values()} == {"complete"}
    assert all(r[0].data.tags["mlflow.parentRunId"] == plan.parent_run_id for r in runs.values())


def test_a_study_on_balanced_accuracy_scores_each_trial_by_it(candidate_template, tmp_path, capsys):
    root, url = _project(candidate_template, tmp_path / "ws", trials=1, objective="val_balanced_accuracy")
    with _in(root, url) as params:
        report = run_tune(".", params)
    (trial,) = report["trials"]
    (run,) = _trial_runs(url, report["study"])["0"]
    assert trial["value"] == run.data.metrics["val_balanced_accuracy"] == \
        run.data.metrics["objective_val_balanced_accuracy"], "the last evaluation's balanced accuracy is the value"
    assert f"tune: trial 0 val balanced accuracy {trial['value']:.4f} in " in capsys.readouterr().out
    assert "| trial | state | val balanced accuracy |" in (root / MARKDOWN).read_text()


def test_on_dask_each_worker_runs_its_share_of_the_trials_of_the_one_study(candidate_template, tmp_path):
    root, url = _project(candidate_template, tmp_path / "ws", executor="dask", trials=3)
    done = graft_cli(root, url, "tune")
    said = done.stdout + done.stderr  # the flow's prints go through Prefect's logger
    assert "tune: trials on a local Dask cluster of 2 worker processes" in said and "3 to run" in said
    with _in(root, url) as params:
        plan, study = open_tune(".", params)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    # The workers' samplers are seeded apart: seeded alike, their first (random) proposals would be the same.
    assert len({t.params["finetune.lr"] for t in study.trials}) == 3
    runs = _trial_runs(url, plan.study_name)
    assert sorted(runs) == ["0", "1", "2"] and all(r[0].data.tags["mlflow.parentRunId"] == plan.parent_run_id
                                                   for r in runs.values())
    assert yaml.safe_load((root / BEST).read_text())["finetune"]["lr"] == study.best_params["finetune.lr"]


def test_a_queued_trial_goes_to_one_worker_only_even_one_whose_view_is_stale(tmp_path):
    """The default storage (a journal file) hands a queued trial to one worker: one that saw it queued before
    another took it is given a new trial. (On SQLite two workers taking it at the same instant could both get it,
    and the second's result was refused, 'Cannot tell a COMPLETE trial': a race no sequential test can build; the
    Dask test above runs the real thing.)"""
    location = study_location(tmp_path, parse_settings(tiny_params()))
    assert Path(location).parent == tmp_path / ".graft" / "tune" and "://" not in location
    optuna.create_study(study_name="s", storage=study_storage(location)).enqueue_trial({"x": 0.5})
    first, second = (optuna.load_study(study_name="s", storage=study_storage(location)) for _ in range(2))
    assert [t.state for t in first.trials] == [t.state for t in second.trials] == [TrialState.WAITING]
    assert first.ask().number == 0
    assert second.ask().number == 1, "the stale worker was handed the trial the first one runs"


def test_sqlite_storage_is_refused_for_parallel_trials_with_the_way_out():
    with pytest.raises(ParamsError, match=r"tune.storage 'sqlite:////tmp/s.db' with tune.executor dask: SQLite cannot "
                                          r"hand a queued trial to exactly one of the parallel workers.*leave "
                                          r"tune.storage null"):
        parse_settings(tiny_params(**{"tune.executor": "dask", "tune.storage": "sqlite:////tmp/s.db"}))
    assert parse_settings(tiny_params(**{"tune.storage": "sqlite:////tmp/s.db"})).tune.storage  # one process: fine


def test_trials_split_evenly_over_the_workers():
    assert worker_shares(5, 2) == [3, 2] and worker_shares(1, 4) == [1] and worker_shares(0, 2) == []


def test_pruned_trials_are_recorded_as_pruned_and_a_study_with_none_complete_says_so(candidate_template, tmp_path):
    # By construction: no val accuracy reaches 1.01, so every trial is pruned at its first evaluation.
    root, url = _project(candidate_template, tmp_path / "ws", prune_below=1.01)
    refused = graft_cli(root, url, "tune", check=False)
    assert refused.returncode == 2 and "no trial of study" in refused.stderr and "Traceback" not in refused.stderr
    with _in(root, url) as params:
        plan, study = open_tune(".", params)
    assert [(t.state, t.last_step) for t in study.trials] == [(TrialState.PRUNED, 4)] * 2
    assert "tune: trial 1 pruned (val accuracy " in refused.stdout and " at step 4) in " in refused.stdout
    runs = _trial_runs(url, plan.study_name)
    assert {(r[0].data.tags[TUNE_STATE_TAG], r[0].info.status) for r in runs.values()} == {("pruned", "KILLED")}


def test_the_test_split_is_never_read(candidate_template, tmp_path):
    """Trials get the data without its test split; and a project whose test images are noise and labels shuffled
    tunes to exactly the same trials."""
    studies = []
    for name in ("as-prepared", "test-split-scrambled"):
        root, url = _project(candidate_template, tmp_path / name, trials=1)
        path = root / Layout.selected_data
        if name == "test-split-scrambled":
            with np.load(path) as npz:
                arrays = dict(npz)
            rng = np.random.default_rng(0)
            for key in [k for k in arrays if k.startswith("x_test")]:
                arrays[key] = rng.integers(0, 256, arrays[key].shape, dtype=arrays[key].dtype)
            arrays["y_test"] = rng.permutation(arrays["y_test"])
            path.unlink()  # a DVC link into the cache: replaced, not written through
            np.savez(path, **arrays)
        assert len(tuning_splits(path).y_test) == 0
        with _in(root, url) as params:
            report = run_tune(".", params)
        studies.append([(t["params"], t["value"]) for t in report["trials"]])
    assert studies[0] == studies[1]


def test_a_trials_unlabelled_images_still_leave_the_test_split_out(candidate_template):
    """Trials get no test split, yet unlabelled images that are test images (data.unlabeled pointing at the target's
    own folder) are still left out of FixMatch's and adaptation's pools, by the test images' digests."""
    template, _ = candidate_template
    path = template / Layout.selected_data
    full, trials_get = load_splits(path), tuning_splits(path)
    unlabeled, _ = without_held_out(np.concatenate([full.x_train, full.x_test]), trials_get)
    test_images = {pixels_digest(image) for image in full.x_test}
    assert len(trials_get.x_test) == 0 and test_images
    assert not test_images & {pixels_digest(image) for image in unlabeled}
    held_out = test_images | {pixels_digest(image) for image in full.x_val}
    assert len(unlabeled) == sum(pixels_digest(image) not in held_out for image in full.x_train) > 0


@pytest.mark.parametrize("space, message", [
    ({"lr": {"low": 0.001, "high": 0.01}}, "are not finetune keys"),
    ({"finetune.lr": {"low": 0.01, "high": 0.001}}, "must be below high"),
    ({"finetune.steps": {"choices": [0]}}, "tune.space.finetune.steps: 0 is not a valid finetune setting"),
    ({"finetune.no_such_knob": {"choices": [1]}}, "tune.space.finetune.no_such_knob"),
])
def test_a_bad_search_space_is_refused_by_its_key(space, message):
    from components.config import ParamsError
    from components.settings import parse_settings
    from tests.conftest import tiny_params

    with pytest.raises(ParamsError, match=message):
        parse_settings({**tiny_params(), "tune": {"space": space}})


def test_the_report_says_which_trials_the_val_split_cannot_tell_from_the_best():
    scores = {0: 0.60, 1: 0.567, 2: 0.45, 3: 0.595}
    small = val_noise(scores, val_images=180)
    assert small["standard_error"] == pytest.approx((0.6 * 0.4 / 180) ** 0.5, rel=0.02)
    assert small["not_told_apart"] == [3, 1], "within the band, nearest first; 15 points below is told apart"
    assert val_noise(scores, val_images=20_000)["not_told_apart"] == [3], "more images tell more apart"
    assert 0.001 < val_noise({0: 1.0, 1: 0.9}, val_images=500)["standard_error"] < 0.01, "a perfect score has noise too"
    alone = _noise_lines(val_noise({0: 0.9231}, val_images=13), "val_accuracy")[0]
    assert "no other trial completed to compare it with" in alone and "below the best" not in alone


def test_a_balanced_accuracy_objective_is_as_noisy_as_its_smallest_classes_make_it():
    equal, unequal = np.repeat([0, 1], 90), np.repeat([0, 1], [170, 10])  # 180 images either way
    assert _measured_as(equal, "val_balanced_accuracy") == pytest.approx(180)
    assert _measured_as(unequal, "val_accuracy") == 180
    worth = _measured_as(unequal, "val_balanced_accuracy")
    assert worth == pytest.approx(4 / (1 / 170 + 1 / 10)) and worth < 40, "10 dogs set the noise of their recall"
    noise = val_noise({0: 0.80, 1: 0.70}, val_images=180, measured_as=worth)
    assert noise["not_told_apart"] == [1] and val_noise({0: 0.80, 1: 0.70}, val_images=180)["not_told_apart"] == []
    line = _noise_lines(noise, "val_balanced_accuracy")[0]
    assert "180 images (its unequal classes count as 38 equal-class images would) measure a balanced accuracy" in line


def test_params_yamls_own_values_are_a_trial_only_where_the_space_holds_them():
    from components.settings import parse_settings
    from tests.conftest import tiny_params

    inside = parse_settings({**tiny_params(), "tune": {"space": SPACE}})
    assert current_recipe(inside) == {"finetune.lr": 0.003, "finetune.label_smoothing": 0.0}
    for outside in ({"finetune.lr": {"low": 0.01, "high": 0.1}}, {"finetune.steps": {"choices": [600, 1200]}},
                    {"finetune.steps": {"low": 1, "high": 1000, "integer": True}, "finetune.lr": {"low": 0.1, "high": 1}}):
        assert current_recipe(parse_settings({**tiny_params(), "tune": {"space": outside}})) is None, outside


@pytest.mark.parametrize("own_value, said", [
    (0.58, "leads them by 2.0 points, inside that band: this split gives no reason to change them"),
    (0.40, "leads them by 20.0 points, beyond that band"),
    (0.60, "The best trial is params.yaml's own values (trial 0): keep them"),
    (None, "params.yaml's own values are not among the trials"),
    ("pruned", "params.yaml's own values (trial 0) were pruned")])
def test_the_report_measures_the_proposal_against_params_yamls_own_values(own_value, said):
    # Trial 0 is params.yaml's own values (None: not run), trial 1 another; the best scored 0.60 on 180 images.
    best = 0 if own_value == 0.60 else 1
    values = {best: 0.60, **({0: own_value} if isinstance(own_value, float) and own_value != 0.60 else {})}
    report = {"study": "s", "trials": [{"number": n, "state": "complete", "value": v, "params": {"finetune.lr": n},
                                        "last_step": 4} for n, v in values.items()],
              "objective": "val_accuracy", "best": {"number": best, "value": 0.60, "params": {"finetune.lr": best}},
              "noise": val_noise(values, val_images=180), "current": {"finetune.lr": 0},
              "current_trial": None if own_value is None else {
                  "number": 0, "state": "pruned" if own_value == "pruned" else "complete",
                  "value": None if own_value == "pruned" else own_value}}
    assert said in markdown(report)
