"""`graft stage NAME`: the pipeline's stages by name, in the order the flow runs them, and the runner of one.

Each stage is a function in a module of components/stages/, imported only when it runs: a stage's code is what its
module imports (dvc.yaml lists exactly that), not this table. The stages of a pipeline source are per candidate:
`prepare_source@NAME`, `pretrain@NAME` (dvc.yaml `foreach`). All paths are relative to the project folder.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

from components import distributed
from components.compute import resolve_compute
from components.config import Params, load_params
from components.errors import GraftError


class UnknownStage(GraftError):
    pass


# Stage name -> the module of components/stages/ that holds it, in run order; the function has the stage's name.
STAGE_MODULES: dict[str, str] = {
    "resolve_sources": "resolve_sources",
    "prepare_source": "prepare",
    "prepare_target": "prepare",
    "prepare_unlabeled": "prepare",
    "pretrain": "pretrain",
    "select_source": "select_source",
    "baseline": "train_target",
    "finetune": "train_target",
    "calibrate": "calibrate",
    "evaluate": "evaluate",
    "export": "export",
}
# Stages run once per named entry of a params mapping (dvc.yaml: foreach over it, STAGE@NAME).
PER_NAME: dict[str, str] = {"prepare_source": "sources.pipeline", "pretrain": "sources.pipeline",
                            "prepare_unlabeled": "data.unlabeled"}
# Stages that train, and so run data-parallel with compute.processes > 1 (components/distributed.py).
TRAINING_STAGES = ("pretrain", "baseline", "finetune")


def stage_module(stage: str) -> str:
    """The dotted name of the module that holds `stage`."""
    return f"components.stages.{STAGE_MODULES[stage]}"


def stage_function(stage: str) -> Callable[..., object]:
    return getattr(importlib.import_module(stage_module(stage)), stage)


def _names(params: Params, key: str) -> list[str]:
    section, _, entry = key.partition(".")
    return list(getattr(getattr(params, section), entry))


def stage_order(params: Params) -> list[str]:
    """Every stage of this configuration, in the order the flow runs them."""
    order = []
    for name in STAGE_MODULES:
        if name in PER_NAME:
            order += [f"{name}@{key}" for key in _names(params, PER_NAME[name])]
        else:
            order.append(name)
    return order


def run_stage(name: str, params_path: str | Path = "params.yaml", params: Params | None = None) -> object:
    """Run one stage with `params` (read from `params_path` when not given: the caller may have validated the whole
    file already); `params_path` is also what the data-parallel launcher hands each process."""
    stage, _, key = name.partition("@")
    if stage not in STAGE_MODULES:
        per_name = ", ".join(f"{s}@NAME ({mapping})" for s, mapping in PER_NAME.items())
        raise UnknownStage(f"unknown stage {name!r}; stages: {', '.join(STAGE_MODULES)} (once per entry of: {per_name})")
    params = params or load_params(params_path)
    if stage in PER_NAME:
        names = _names(params, PER_NAME[stage])
        if key not in names:
            raise UnknownStage(f"stage {name!r}: {key!r} is not an entry of {PER_NAME[stage]}; entries: {', '.join(names) or 'none'}")
    run = partial(stage_function(stage), params, *([key] if stage in PER_NAME else []))
    if stage not in TRAINING_STAGES:
        return run()
    if distributed.under_launcher():
        distributed.init(resolve_compute(params.compute).device)
        try:
            return run()
        finally:
            distributed.finish()
    if params.compute.processes > 1:
        return distributed.launch(["stage", name, "--params", str(params_path)], params.compute.processes)
    return run()
