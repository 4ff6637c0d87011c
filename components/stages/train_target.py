"""baseline and finetune: the target model trained from scratch (what transfer must beat) and grafted onto the
selected source, with the same data, steps and augmentation."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from components import data as data_mod
from components import distributed
from components.artifacts import read_json
from components.compute import resolve_compute
from components.config import Params
from components.evaluate import write_history
from components.layout import Layout
from components.network import GraftNet, ModelSpec, build, graft, save_checkpoint
from components.objectives import Alignment, FixMatch, ObjectiveError, Term, joint_term, require_source_data
from components.source_models import LoadedSource, SourceIdentity, load_source
from components.predict import Normalizer, predict_features
from components.train import strategy_phases, train
from components.tuning import Tuning


def train_target(params: Params, strategy: str, splits: data_mod.Splits,
                 on_evaluation: Callable[[dict], None] | None = None) -> tuple[GraftNet, list[dict], dict]:
    """Train one target model on `splits` with params.finetune: from scratch, or grafted onto the selected source.
    Returns the model, its history and what its checkpoint records (strategy, data, source, objective, time).
    `on_evaluation`: the training loop's (components/train.py train)."""
    spec = ModelSpec.from_dict(read_json(Layout.selected_architecture))
    extra = {"strategy": strategy, "data_version": splits.data_version}
    if strategy == "scratch":
        model = build(spec, params.seed)
    else:
        source = load_source(SourceIdentity.from_dict(read_json(Layout.selected_source)))
        model = graft(source.backbone, spec, params.seed)
        extra["source"] = source.identity.to_dict()
    started = time.perf_counter()
    # The backbone knobs (regulariser toward the source, unfreezing, lr decay) and the extra terms (the source's
    # data, unlabelled target images) are about transfer: the scratch baseline has neither.
    tuning, terms = Tuning(), ()
    if strategy != "scratch":
        tuning = Tuning.of(params.finetune, model, params.seed)
        terms = objective_terms(params, model, splits, source)
        extra["objective"] = [term.summary() for term in terms]
    compute = resolve_compute(params.compute, model)
    extra["compute"] = compute.to_dict()
    history = train(model, splits, params.finetune, strategy_phases(params.finetune, strategy), params.seed, desc=strategy,
                    tuning=tuning, terms=terms, compute=compute, on_evaluation=on_evaluation)
    extra["train_seconds"] = time.perf_counter() - started
    if history and history[-1]["phase"] == "restored":  # early stopping: where it stopped, whose weights it kept
        extra["early_stopping"] = {"stopped_step": history[-1]["step"], "restored_step": history[-1]["restored_step"]}
    return model, history, extra


def _train_target(params: Params, strategy: str, out: Path, history_path: Path) -> dict:
    model, history, extra = train_target(params, strategy, data_mod.load_splits(Layout.selected_data))
    if not distributed.current().writer:
        return extra  # the first process writes every output
    save_checkpoint(model, out, extra)
    write_history(history, history_path)
    return extra


def objective_terms(params: Params, model: GraftNet, splits: data_mod.Splits, source: LoadedSource) -> tuple[Term, ...]:
    """The joint objective's source term, and the domain-adaptation and semi-supervised terms, that params.finetune
    asks for; `model` was just grafted from `source`. Unlabelled images that are also val or test images are left out."""
    terms: list[Term] = []
    featurize = partial(predict_features, model, normalize=Normalizer.of(model.spec.contract))
    if params.finetune.joint.weight > 0:
        identity = source.identity
        require_source_data(identity.name, identity.kind, list(params.sources.pipeline), "finetune.joint",
                            "set finetune.joint.weight: 0")
        source_data = data_mod.load_splits(Layout.source_data(identity.name), identity.image_size)
        terms.append(joint_term(params.finetune.joint, source_data, splits, source.head, featurize, params.seed))
    for key in params.unlabeled_terms():
        name = params.unlabeled_for(key)
        unlabeled, dropped = data_mod.without_held_out(data_mod.load_unlabeled(Layout.unlabeled_data(name), splits.image_size), splits)
        if dropped:
            print(f"finetune.{key}: {dropped} image(s) of data.unlabeled.{name} are also val or test images; "
                  "left out (training on them would flatter the evaluation)", file=sys.stderr)
        if not len(unlabeled):
            raise ObjectiveError(f"finetune.{key}: every image of data.unlabeled.{name} is also a val or test image; "
                                 "give it images outside the target's evaluation splits")
        about = {"unlabeled": name, "dropped_as_val_or_test": dropped}
        if key == "adaptation":
            terms.append(Alignment(params.finetune.adaptation, unlabeled, model.head.in_features, params.seed, about))
        else:
            terms.append(FixMatch(params.finetune.semi_supervised, unlabeled, model.head, about))
    return tuple(terms)


def baseline(params: Params) -> dict:
    """The from-scratch model: the chosen source's architecture without its weights, on the same target data,
    steps and augmentation: what transfer must beat."""
    return _train_target(params, "scratch", Layout.scratch_model, Layout.scratch_history)


def finetune(params: Params) -> dict:
    return _train_target(params, params.finetune.strategy, Layout.transfer_model, Layout.transfer_history)
