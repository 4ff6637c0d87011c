"""prepare_source@NAME, prepare_target, prepare_unlabeled@NAME: raw images checked, decoded, split and saved as arrays."""
from __future__ import annotations

from pathlib import Path

from components import data as data_mod
from components.config import Params
from components.layout import Layout


def prepare_source(params: Params, name: str) -> data_mod.PrepareResult:
    candidate = params.sources.pipeline[name]
    # The source's optional k-a-class cut follows split_seed: the target's seed must not touch pretraining.
    return data_mod.prepare(candidate.data, params.data, candidate.channels, [candidate.image_size], params.data.split_seed,
                            Layout.source_data(name), Layout.source_report(name))


def prepare_target(params: Params) -> data_mod.PrepareResult:
    """The target at every candidate's input size, so each is scored on pixels the server would give it."""
    return data_mod.prepare(params.data.target, params.data, params.data.channels, params.sources.image_sizes(), params.seed,
                            Layout.target_data, Layout.target_report)


def prepare_unlabeled(params: Params, name: str) -> data_mod.PrepareResult:
    """Unlabelled target images (data.unlabeled.NAME) at every candidate's input size, for domain adaptation."""
    return data_mod.prepare_unlabeled(Path(params.data.unlabeled[name].path), params.data, params.sources.image_sizes(),
                                      Layout.unlabeled_data(name), Layout.unlabeled_report(name))
