"""baseline and finetune: the target model trained from scratch (what transfer must beat) and grafted onto the
selected source, with the same data, steps and augmentation."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from components import data as data_mod
from components import distributed
from components.artifacts import read_json
from components.compute import Compute, resolve_compute
from components.config import Params, UnlabeledTerm
from components.evaluate import write_history
from components.layout import Layout
from components.network import GraftNet, ModelSpec, build, graft, save_checkpoint
from components.objectives import Alignment, FixMatch, ObjectiveError, Term, joint_term, require_source_data
from components.source_models import LoadedSource, SourceIdentity, load_source
from components.predict import Normalizer, predict_features, predict_logits
from components.self_training import confident_new_images, with_pseudo_labels
from components.train import strategy_phases, train
from components.tuning import Tuning

# Each unlabelled term's images, without the val and test images among them, and how many those were: loaded once a
# train_target, for every training run and self-training round it makes (the val and test splits do not change).
UnlabeledPools = dict[UnlabeledTerm, tuple[np.ndarray, int]]


def train_target(params: Params, strategy: str, splits: data_mod.Splits,
                 on_evaluation: Callable[[dict], None] | None = None) -> tuple[GraftNet, list[dict], dict]:
    """Train one target model on `splits` with params.finetune: from scratch, or grafted onto the selected source
    (then self-trained, where finetune.semi_supervised.self_training asks). Returns the model, its history and what
    its checkpoint records (strategy, data, source, objective, time). `on_evaluation`: the training loop's
    (components/train.py train); a self-training round's steps count on from the round before's."""
    spec = ModelSpec.from_dict(read_json(Layout.selected_architecture))
    extra = {"strategy": strategy, "data_version": splits.data_version}
    source, pools = None, {}
    if strategy != "scratch":
        source = load_source(SourceIdentity.from_dict(read_json(Layout.selected_source)))
        extra["source"] = source.identity.to_dict()
        pools = {key: _unlabeled_pool(params, key, splits) for key in params.unlabeled_terms()}
    started = time.perf_counter()
    model, history, terms, compute = _fit(params, strategy, spec, splits, source, pools, on_evaluation, strategy)
    if source is not None and params.finetune.semi_supervised.self_training.rounds:
        model, history, terms, extra["self_training"] = _self_train(params, strategy, spec, splits, source, pools,
                                                                    model, history, on_evaluation)
    if source is not None:
        extra["objective"] = [term.summary() for term in terms]
    extra["compute"] = compute.to_dict()
    extra["train_seconds"] = time.perf_counter() - started
    if history and history[-1]["phase"] == "restored":  # early stopping: where it stopped, whose weights it kept
        extra["early_stopping"] = {"stopped_step": history[-1]["step"], "restored_step": history[-1]["restored_step"]}
    return model, history, extra


def _fit(params: Params, strategy: str, spec: ModelSpec, splits: data_mod.Splits, source: LoadedSource | None,
         pools: UnlabeledPools, on_evaluation: Callable[[dict], None] | None, desc: str
         ) -> tuple[GraftNet, list[dict], tuple[Term, ...], Compute]:
    """One run of the training loop: a model built from scratch (`source` None) or grafted onto `source`."""
    model = build(spec, params.seed) if source is None else graft(source.backbone, spec, params.seed)
    # The backbone knobs (regulariser toward the source, unfreezing, lr decay) and the extra terms (the source's
    # data, unlabelled target images) are about transfer: the scratch baseline has neither.
    tuning, terms = Tuning(), ()
    if source is not None:
        tuning = Tuning.of(params.finetune, model, params.seed)
        terms = objective_terms(params, model, splits, source, pools)
    compute = resolve_compute(params.compute, model)
    history = train(model, splits, params.finetune, strategy_phases(params.finetune, strategy), params.seed, desc=desc,
                    tuning=tuning, terms=terms, compute=compute, on_evaluation=on_evaluation)
    return model, history, terms, compute


def _self_train(params: Params, strategy: str, spec: ModelSpec, splits: data_mod.Splits, source: LoadedSource,
                pools: UnlabeledPools, teacher: GraftNet, history: list[dict],
                on_evaluation: Callable[[dict], None] | None) -> tuple[GraftNet, list[dict], tuple[Term, ...], list[dict]]:
    """finetune.semi_supervised.self_training's rounds after the first model (`teacher`, trained with `history`):
    the last student, its history and terms, and what each round did."""
    chosen = params.finetune.semi_supervised.self_training
    pool_name = params.unlabeled_for("semi_supervised")
    pool, _ = pools["semi_supervised"]
    rounds = []
    for number in range(1, chosen.rounds + 1):
        probabilities = torch.softmax(predict_logits(teacher, pool, Normalizer.of(teacher.spec.contract)), 1).numpy()
        confident = confident_new_images(splits, pool, probabilities, chosen.confidence)
        student_data, record = with_pseudo_labels(splits, pool, probabilities, confident, pool_name)
        last = history[-1]
        record = {"round": number, "teacher_val_accuracy": last["val_accuracy"],
                  "teacher_val_balanced_accuracy": last["val_balanced_accuracy"], **record}
        print(f"self-training round {number}: the teacher (val accuracy {last['val_accuracy']:.4f}) labels "
              f"{record['pseudo_labelled']} of {record['pool']} images of data.unlabeled.{pool_name} at "
              f">= {chosen.confidence} confidence; a fresh graft trains on them", file=sys.stderr)
        offset = number * params.finetune.steps
        counted_on = None if on_evaluation is None else (lambda r, offset=offset: on_evaluation({**r, "step": r["step"] + offset}))
        teacher, history, terms, _ = _fit(params, strategy, spec, student_data, source, pools, counted_on,
                                          f"{strategy} student {number}")
        rounds.append(record)
    return teacher, history, terms, rounds


def _train_target(params: Params, strategy: str, out: Path, history_path: Path) -> dict:
    model, history, extra = train_target(params, strategy, data_mod.load_splits(Layout.selected_data))
    if not distributed.current().writer:
        return extra  # the first process writes every output
    save_checkpoint(model, out, extra)
    write_history(history, history_path)
    return extra


def objective_terms(params: Params, model: GraftNet, splits: data_mod.Splits, source: LoadedSource,
                    pools: UnlabeledPools) -> tuple[Term, ...]:
    """The joint objective's source term, and the domain-adaptation and semi-supervised terms, that params.finetune
    asks for, the latter on their `pools`; `model` was just grafted from `source`."""
    terms: list[Term] = []
    featurize = partial(predict_features, model, normalize=Normalizer.of(model.spec.contract))
    if params.finetune.joint.weight > 0:
        identity = source.identity
        require_source_data(identity.name, identity.kind, list(params.sources.pipeline), "finetune.joint",
                            "set finetune.joint.weight: 0")
        source_data = data_mod.load_splits(Layout.source_data(identity.name), identity.image_size)
        terms.append(joint_term(params.finetune.joint, source_data, splits, source.head, featurize, params.seed))
    for key in params.unlabeled_terms():
        if getattr(params.finetune, key).method == "none":
            continue  # semi_supervised on for self-training alone: no term of the loop
        unlabeled, dropped = pools[key]
        about = {"unlabeled": params.unlabeled_for(key), "dropped_as_val_or_test": dropped}
        if key == "adaptation":
            terms.append(Alignment(params.finetune.adaptation, unlabeled, model.head.in_features, params.seed, about))
        else:
            terms.append(FixMatch(params.finetune.semi_supervised, unlabeled, model.head, about))
    return tuple(terms)


def _unlabeled_pool(params: Params, key: UnlabeledTerm, splits: data_mod.Splits) -> tuple[np.ndarray, int]:
    """The images of the data.unlabeled entry finetune.<key> feeds on, at the splits' size, without the val and test
    images among them, and how many those were."""
    name = params.unlabeled_for(key)
    unlabeled, dropped = data_mod.without_held_out(data_mod.load_unlabeled(Layout.unlabeled_data(name), splits.image_size), splits)
    if dropped:
        print(f"finetune.{key}: {dropped} image(s) of data.unlabeled.{name} are also val or test images; "
              "left out (training on them would flatter the evaluation)", file=sys.stderr)
    if not len(unlabeled):
        raise ObjectiveError(f"finetune.{key}: every image of data.unlabeled.{name} is also a val or test image; "
                             "give it images outside the target's evaluation splits")
    return unlabeled, dropped


def baseline(params: Params) -> dict:
    """The from-scratch model: the chosen source's architecture without its weights, on the same target data,
    steps and augmentation: what transfer must beat."""
    return _train_target(params, "scratch", Layout.scratch_model, Layout.scratch_history)


def finetune(params: Params) -> dict:
    return _train_target(params, params.finetune.strategy, Layout.transfer_model, Layout.transfer_history)
