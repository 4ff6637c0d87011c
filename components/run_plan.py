"""What a run of a project would do, decided before any stage runs: the one answer for `graft run` (which says an
unchanged project is done without starting Prefect) and the retrain flow (which then runs what is pending)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from components.dvc_runner import ALWAYS_RUN, StageOutcome, dvc_status, pending_stages, reproduce_stage
from components.errors import CandidateRejected
from components.settings import Settings
from components.tracked_data import check_tracked_data, version_changed_data, versioned_note
from components.userdata import check_raw_data
from deploy.tags import gate_tag


@dataclass(frozen=True)
class AlreadyJudged:
    """The registry in use holds this very candidate (same data, params, code and source weights), judged with
    today's gates: a run would only repeat that verdict."""

    model_name: str
    version: str
    failed_gates: tuple[str, ...]  # with each gate's value and bound; empty: it passed every gate

    def message(self) -> str:
        unchanged = "data, params, code and source weights are unchanged since"
        if not self.failed_gates:
            return (f"nothing to do: {unchanged} the run that registered this candidate as {self.model_name} "
                    f"v{self.version}, which passed every gate")
        return (f"this candidate was judged already and rejected: {self.model_name} v{self.version} failed "
                f"{'; '.join(self.failed_gates)} ({unchanged} then). Change the data or the params that make the "
                "model (finetune, sources, data), or run `graft run --force` to judge it again (e.g. after the "
                "champion moved)")

    def enforce(self) -> None:
        """A rejected candidate ends the run as its first judging did (exit status 3), not as "done"."""
        if self.failed_gates:
            raise CandidateRejected(self.message())


def already_judged(root: str | Path, params) -> AlreadyJudged | None:
    """The registry's version of this candidate and the gates it failed, when it holds one judged with today's gates."""
    from mlflow import MlflowClient

    from components.registry import failed_gates, published_version, registry_call, tracking_uri

    version = published_version(root, params)
    if version is None:
        return None
    name = params.registry.model_name
    with registry_call("reading the candidate's verdict", tracking_uri(params.registry, root)):
        tags = MlflowClient().get_model_version(name, version).tags  # published_version pointed MLflow at the store
    return AlreadyJudged(name, version, tuple(
        f"{gate} ({tags.get(gate_tag(gate, 'value'), '')} vs {tags.get(gate_tag(gate, 'bound'), '')})" for gate in failed_gates(tags)))


@dataclass(frozen=True)
class RunPlan:
    """What a run would do. The stages that run every time have run (they look at files outside the project)."""

    always_ran: tuple[StageOutcome, ...]
    pending: tuple[str, ...]      # stages and tracked data whose inputs changed since the last run
    repaired: str                 # how DVC's cache was repaired from the project's own copy ("": nothing to repair)
    judged: AlreadyJudged | None  # nothing pending: the registry's version of this very candidate and its verdict
    versioned: tuple[str, ...] = ()  # data folders whose files changed, versioned again (`dvc add`) before the stages

    def notes(self) -> list[str]:
        """What the plan did to the project before any stage, a line each."""
        return [*([self.repaired] if self.repaired else []), *map(versioned_note, self.versioned)]

    @property
    def nothing_to_do(self) -> bool:
        return not self.pending and self.judged is not None


def plan_run(root: str | Path, params: Settings, force: bool = False) -> RunPlan:
    """Check the data folders (repair DVC's cache where the project holds an intact copy, version again the ones
    whose files changed), run the stages that run every time, ask DVC what changed and, unless `force`, ask the
    registry whether it holds this candidate judged with today's gates (on another thread, while DVC works: one
    answer in seconds). The caller holds the project lock; a RegistryUnavailable from the registry passes to it
    (the flow retries it)."""
    check_raw_data(root, params)
    keys = {path: key for key, path in params.raw_data_paths().items()}
    with ThreadPoolExecutor(1) as pool:
        verdict = None if force else pool.submit(already_judged, root, params)
        always_ran = tuple(reproduce_stage(root, name) for name in ALWAYS_RUN)
        status = dvc_status(root)
        repaired = check_tracked_data(root, status, keys) or ""
        versioned = tuple(version_changed_data(root, status, list(keys)))
        if repaired or versioned:
            status = dvc_status(root)
        pending = tuple(pending_stages(status, list(keys)))
        # With work pending the verdict is moot, and a registry that does not answer is the judge step's to retry.
        judged = verdict.result() if verdict is not None and not pending else None
    return RunPlan(always_ran, pending, repaired, judged, versioned)


def study_inputs(root: str | Path, params: Settings) -> list[str]:
    """Before a study that trains on the pipeline's prepared data and selected source (`graft sweep`, `graft tune`):
    the data folders checked, the tracked ones whose files changed versioned again, and the selected source and the
    unlabelled data brought up to date (DVC: nothing runs when they are). What was versioned, a line each."""
    check_raw_data(root, params)
    versioned = version_changed_data(root, dvc_status(root), list(params.raw_data_paths().values()))
    for stage in ("select_source", *(f"prepare_unlabeled@{name}" for name in params.data.unlabeled)):
        reproduce_stage(root, stage, with_upstream=True)
    return [versioned_note(path) for path in versioned]
