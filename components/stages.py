"""The pipeline's stages: each reads params.yaml and writes exactly the outputs dvc.yaml declares for it.

`graft stage NAME` runs one of these; DVC runs that command; the Prefect flow asks DVC to run it. The stages
of a pipeline source are per candidate: `prepare_source@NAME`, `pretrain@NAME` (dvc.yaml `foreach`). All paths
are relative to the project folder (the one holding dvc.yaml and params.yaml).
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np

from components import data as data_mod
from components import distributed
from components.artifacts import atomic_path, read_json, sha256_json, write_json
from components.compute import resolve_compute
from components.config import FinetuneParams, Params, load_params
from components.errors import GraftError
from components.evaluate import (
    classification_report,
    plot_confusion,
    plot_curves,
    read_history,
    score,
    write_history,
    write_predictions,
)
from components.export import (
    ParityFailed,
    build_variant,
    check_parity,
    export_onnx,
    score_onnx,
)
from components.layout import Layout
from components.model import (
    GraftNet,
    ModelSpec,
    build,
    graft,
    load_checkpoint,
    save_checkpoint,
)
from components.objectives import Alignment, Term, joint_term, require_source_data
from components.race import successive_halving
from components.selection import Selection, choose, lead_share, score_candidate, why_race, write_selection
from components.sources import (
    LoadedSource,
    SourceError,
    SourceIdentity,
    extract_features,
    load_source,
    pipeline_identity,
    resolve_pretrained_sources,
)
from components.train import (
    Normalizer,
    Phase,
    Resume,
    predict_features,
    predict_logits,
    strategy_phases,
    train,
)
from components.tuning import Tuning
from deploy.contract import COLOR_MODES, SOURCE_KEY, Contract
from deploy.variants import FP32, variant_path


class UnknownStage(GraftError):
    pass


# ---------------------------------------------------------------- sources


def resolve_sources(params: Params) -> dict:
    """The identity (weights sha256, normalisation, size) of every pretrained candidate; downloads named
    weights into the torch hub cache when online. DVC runs it every time (always_changed): a weights file that
    changed makes the stages that used it run again, an unchanged one changes nothing."""
    identities = resolve_pretrained_sources(params)
    write_json(Layout.pretrained_sources, identities)
    # Folders that per-name stages fill and a later stage depends on as a whole, also when no stage fills them.
    for folder in (Layout.sources, Layout.prepared_sources, Layout.prepared_unlabeled):
        folder.mkdir(parents=True, exist_ok=True)
    return identities


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


def pretrain(params: Params, name: str) -> dict:
    candidate = params.sources.pipeline[name]
    splits = data_mod.load_splits(Layout.source_data(name))
    contract = Contract(COLOR_MODES[candidate.channels], candidate.image_size, candidate.image_size,
                        tuple(candidate.mean), tuple(candidate.std))
    model = build(ModelSpec.own_resnet(splits.classes, contract, tuple(candidate.widths)), params.pretrain.seed)
    steps = params.pretrain.epochs * -(-len(splits.y_train) // params.pretrain.batch_size)
    training = {"pretrain": params.pretrain.model_dump(mode="json", exclude={"checkpoint_every_steps"}),
                "source": candidate.model_dump(mode="json"), "data_version": splits.data_version, "steps": steps}
    resume = Resume(Layout.resume_point(f"pretrain-{name}"), params.pretrain.checkpoint_every_steps,
                    sha256_json(training))
    compute = resolve_compute(params.compute, model)
    started = time.perf_counter()
    history = train(model, splits, params.pretrain, [Phase("pretrain", steps, 1.0)], params.pretrain.seed, desc=f"pretrain {name}",
                    resume=resume, compute=compute)
    seconds = time.perf_counter() - started
    if not distributed.current().writer:
        return {}  # the first process writes every output
    test = score(splits.y_test, predict_classes(model, splits.x_test), splits.classes)
    metrics = {"test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1, "steps": steps}
    # Timing goes with the checkpoint, not the metrics: metrics must be identical on a rerun.
    save_checkpoint(model, Layout.source_model(name), {"data_version": splits.data_version, "dataset": candidate.data.name,
                                                       "metrics": metrics, "train_seconds": seconds,
                                                       "compute": compute.to_dict()})
    write_history(history, Layout.pretrain_history(name))
    write_json(Layout.pretrain_metrics(name), metrics)
    resume.path.unlink(missing_ok=True)  # every output is written: the resume point has done its job
    return metrics


def predict_classes(model, x: np.ndarray) -> np.ndarray:
    return predict_logits(model, x, Normalizer.of(model.spec.contract)).argmax(1).numpy()


def candidate_identities(params: Params) -> list[SourceIdentity]:
    """Every candidate's identity, in params order: pipeline checkpoints hashed now, pretrained ones as resolved."""
    resolved = read_json(Layout.pretrained_sources) if Layout.pretrained_sources.exists() else {}
    identities = []
    for name in params.sources.names():
        if params.sources.kind(name) == "pipeline":
            identities.append(pipeline_identity(name, params.sources.pipeline[name], Layout.source_model(name)))
        elif name in resolved:
            identities.append(SourceIdentity.from_dict(resolved[name]))
        else:
            raise SourceError(f"source {name} is not resolved yet; run the resolve_sources stage first (graft run, or dvc repro)")
    return identities


def select_source(params: Params) -> dict:
    """Score every candidate's frozen features on the target's training split; when the scores cannot decide (auto
    mode), race the best few on the validation split; keep the chosen source's identity, architecture and
    input-size data for the stages after it."""
    scores, identities, scored = [], {}, {}
    for identity in candidate_identities(params):
        splits = data_mod.load_splits(Layout.target_data, identity.image_size)
        source = load_source(identity)
        features = extract_features(source, identity.contract(params.data.channels), splits.x_train, params.selection.batch_size)
        scores.append(score_candidate(identity.name, identity.kind, identity.origin(), identity.image_size, features.features, features.source_probabilities, splits.y_train,
                                      features.seconds))
        identities[identity.name] = identity
        scored[identity.name] = (features.features, features.source_probabilities)
    selection = choose(scores, params.selection.mode, params.selection.score, params.chosen_in_report_mode(),
                       examples=int(len(splits.y_train)))
    if params.selection.mode == "auto" and len(scores) > 1:
        selection = settle_by_race(params, selection, identities, scored, splits.y_train)
    write_selection(selection, Layout.selection_report, Layout.selection_markdown, Layout.selection_plot)
    chosen = identities[selection.chosen]
    splits = data_mod.load_splits(Layout.target_data, chosen.image_size)
    spec = chosen.model_spec(splits.classes, params.data.channels, params.finetune.channel_adapter)
    write_json(Layout.selected_source, chosen.to_dict())
    write_json(Layout.selected_architecture, spec.to_dict())
    data_mod.save_splits(splits, Layout.selected_data)
    return selection.to_dict()


def settle_by_race(params: Params, selection: Selection, identities: dict[str, SourceIdentity],
                   scored: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray) -> Selection:
    """The scores' choice when they agree with a lead beyond their noise; else the winner of a fine-tuning race."""
    race = params.selection.race
    ranked = [c.name for c in selection.ranking()]
    share = lead_share(scored[ranked[0]], scored[ranked[1]], labels, selection.score, race.bootstrap, params.seed)
    reason = why_race(selection.candidates, selection.score, share, race.min_lead_share, race.bootstrap)
    if race.when == "never" or (race.when == "auto" and not reason):
        why = (f"{reason} (selection.race.when: never)" if reason else
               f"LogME, LEEP and NCE agree, and the lead held in {share:.0%} of {race.bootstrap} bootstrap resamples")
        return replace(selection, decided_by=f"{selection.decided_by}: {why}")
    racers = ranked[: race.candidates]
    result = successive_halving(racers, partial(race_fine_tune, params, identities), race.first_steps, race.budget_seconds)
    why = reason or "selection.race.when: always"
    return replace(selection, chosen=result.winner, race=result.to_dict(),
                   decided_by=f"a fine-tuning race on the validation split, because {why}: {result.summary()}")


def race_fine_tune(params: Params, identities: dict[str, SourceIdentity], name: str, steps: int) -> float:
    """Candidate `name` grafted and fine-tuned for `steps` with params.finetune's recipe, shortened (the extra
    objective terms left out); its accuracy on the target's validation split."""
    identity = identities[name]
    splits = data_mod.load_splits(Layout.target_data, identity.image_size)
    if not len(splits.y_val):
        raise GraftError("selection.race needs a validation split: set data.target.val_size > 0, or "
                         "selection.race.when: never")
    recipe = short_recipe(params.finetune, steps)
    spec = identity.model_spec(splits.classes, params.data.channels, recipe.channel_adapter)
    model = graft(load_source(identity).backbone, spec, params.seed)
    history = train(model, splits, recipe, strategy_phases(recipe), params.seed, desc=f"race {name}, {steps} steps",
                    tuning=Tuning.of(recipe, model, params.seed), compute=resolve_compute(params.compute, model))
    return float(history[-1]["val_accuracy"])


def short_recipe(finetune: FinetuneParams, steps: int) -> FinetuneParams:
    """The fine-tuning recipe over `steps` steps: its phases and unfreezing scaled alike, one evaluation at the end."""
    scale = steps / finetune.steps
    return FinetuneParams.model_validate({
        **finetune.model_dump(), "steps": steps, "eval_every_steps": steps,
        "lp_steps": min(steps - 1, max(1, round(finetune.lp_steps * scale))),
        "unfreeze_every_steps": round(finetune.unfreeze_every_steps * scale),
        "joint": {"weight": 0.0}, "adaptation": {"method": "none"},
    })


# ---------------------------------------------------------------- target training and evaluation


def train_target(params: Params, strategy: str, splits: data_mod.Splits) -> tuple[GraftNet, list[dict], dict]:
    """Train one target model on `splits` with params.finetune: from scratch, or grafted onto the selected source.
    Returns the model, its history and what its checkpoint records (strategy, data, source, objective, time)."""
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
                    tuning=tuning, terms=terms, compute=compute)
    extra["train_seconds"] = time.perf_counter() - started
    return model, history, extra


def _train_target(params: Params, strategy: str, out: Path, history_path: Path) -> dict:
    model, history, extra = train_target(params, strategy, data_mod.load_splits(Layout.selected_data))
    if not distributed.current().writer:
        return extra  # the first process writes every output
    save_checkpoint(model, out, extra)
    write_history(history, history_path)
    return extra


def objective_terms(params: Params, model: GraftNet, splits: data_mod.Splits, source: LoadedSource) -> tuple[Term, ...]:
    """The joint objective's source term and the domain-adaptation term that params.finetune asks for; `model` was
    just grafted from `source`."""
    terms: list[Term] = []
    featurize = partial(predict_features, model, normalize=Normalizer.of(model.spec.contract))
    if params.finetune.joint.weight > 0:
        identity = source.identity
        require_source_data(identity.name, identity.kind, list(params.sources.pipeline), "finetune.joint",
                            "set finetune.joint.weight: 0")
        source_data = data_mod.load_splits(Layout.source_data(identity.name), identity.image_size)
        terms.append(joint_term(params.finetune.joint, source_data, splits, source.head, featurize, params.seed))
    if params.finetune.adaptation.method != "none":
        name = params.unlabeled_for_adaptation()
        unlabeled = data_mod.load_unlabeled(Layout.unlabeled_data(name), splits.image_size)
        terms.append(Alignment(params.finetune.adaptation, unlabeled, model.head.in_features, params.seed))
    return tuple(terms)


def baseline(params: Params) -> dict:
    """The from-scratch model: the chosen source's architecture without its weights, on the same target data,
    steps and augmentation: what transfer must beat."""
    return _train_target(params, "scratch", Layout.scratch_model, Layout.scratch_history)


def finetune(params: Params) -> dict:
    return _train_target(params, params.finetune.strategy, Layout.transfer_model, Layout.transfer_history)


def evaluate(params: Params) -> dict:  # noqa: ARG001 - every stage takes params
    splits = data_mod.load_splits(Layout.selected_data)
    results, strategies, per_class, correct = {}, {}, {}, {}
    for label, path, plot in (("transfer", Layout.transfer_model, Layout.confusion_transfer),
                              ("scratch", Layout.scratch_model, Layout.confusion_scratch)):
        model, meta = load_checkpoint(path)
        predicted = predict_classes(model, splits.x_test)
        evaluation = score(splits.y_test, predicted, splits.classes)
        plot_confusion(evaluation, splits.classes, f"{label} ({meta['strategy']}) on the test split", plot)
        strategies[label] = meta["strategy"]
        results[label] = {"accuracy": evaluation.accuracy, "macro_f1": evaluation.macro_f1}
        per_class[label] = evaluation.per_class
        correct[label] = predicted == splits.y_test
        if label == "transfer":
            write_predictions(splits.y_test, predicted, splits.classes, Layout.predictions)
    results["transfer_gain"] = results["transfer"]["accuracy"] - results["scratch"]["accuracy"]
    results["test_examples"] = int(len(splits.y_test))
    # The gate's paired test needs only the examples the two models disagree on.
    results["paired"] = {"transfer_only": int((correct["transfer"] & ~correct["scratch"]).sum()),
                         "scratch_only": int((correct["scratch"] & ~correct["transfer"]).sum())}
    plot_curves({"transfer": read_history(Layout.transfer_history), "scratch": read_history(Layout.scratch_history)},
                Layout.curves, f"target training ({strategies['transfer']} vs scratch)")
    write_json(Layout.per_class, per_class)
    with atomic_path(Layout.classification_report) as tmp:
        tmp.write_text("".join(f"{label} ({strategies[label]}), test split\n\n"
                               f"{classification_report(per_class[label], results[label]['accuracy'])}\n"
                               for label in ("transfer", "scratch")))
    write_json(Layout.evaluate_metrics, results)
    return results


def export(params: Params) -> dict:
    model, meta = load_checkpoint(Layout.transfer_model)
    export_onnx(model, Layout.onnx_model, params.export.opset, {
        "graft.strategy": meta["strategy"], "graft.data_version": meta["data_version"],
        SOURCE_KEY: json.dumps(meta.get("source", {}), sort_keys=True),
    })
    splits = data_mod.load_splits(Layout.selected_data)
    parity = check_parity(model, Layout.onnx_model, splits.x_test, params.export.parity_atol, params.export.parity_rtol)
    # Metrics only: the exporter's bytes are not reproducible (DVC's lock keeps the file's hash).
    result = {**asdict(parity), "passed": parity.passed, "onnx_bytes": Layout.onnx_model.stat().st_size}
    if not parity.passed:
        write_json(Layout.export_metrics, result)
        raise ParityFailed(
            f"ONNX parity failed: max |diff| {parity.max_abs_diff:.2e} is {parity.worst_tolerance_ratio:.2f}x the allowed "
            f"atol {parity.atol:.0e} + rtol {parity.rtol:.0e} * |logit|, "
            f"top-1 agreement {parity.argmax_agreement:.4f} (need 1.0); the model is not registered"
        )
    result["variants"] = export_variants(params, model.spec.contract, splits)
    write_json(Layout.export_metrics, result)
    return result


def export_variants(params: Params, contract, splits: data_mod.Splits) -> dict[str, dict]:
    """Every configured variant built from the FP32 file, scored on the test split beside it, and written to
    models/variants/ only when it loses at most export.max_accuracy_drop: a variant that exists is published."""
    settings = params.export
    fp32 = score_onnx(Layout.onnx_model, contract, splits.x_test, splits.y_test)
    scores = {FP32: {**asdict(fp32), "accuracy_drop": 0.0, "published": True}}
    calibration = contract.normalize(np.concatenate([splits.x_train, splits.x_val])[: settings.calibration_images])
    if Layout.onnx_variants.exists():
        shutil.rmtree(Layout.onnx_variants)
    Layout.onnx_variants.mkdir(parents=True)
    for variant in settings.variants:
        path = variant_path(Layout.onnx_model, variant)
        build_variant(variant, Layout.onnx_model, path, calibration, settings.calibration_method,
                      settings.calibration_percentile)
        measured = score_onnx(path, contract, splits.x_test, splits.y_test)
        drop = fp32.accuracy - measured.accuracy
        published = drop <= settings.max_accuracy_drop
        scores[variant] = {**asdict(measured), "accuracy_drop": drop, "published": published,
                           "speedup_batch64_cpu": fp32.latency_ms_batch64 / measured.latency_ms_batch64}
        if not published:
            path.unlink()
            scores[variant]["why_not"] = (f"{100 * drop:.2f} points below FP32 on the test split, more than "
                                          f"export.max_accuracy_drop {100 * settings.max_accuracy_drop:g}")
    return scores


STAGES: dict[str, Callable[..., object]] = {
    "resolve_sources": resolve_sources,
    "prepare_source": prepare_source,
    "prepare_target": prepare_target,
    "prepare_unlabeled": prepare_unlabeled,
    "pretrain": pretrain,
    "select_source": select_source,
    "baseline": baseline,
    "finetune": finetune,
    "evaluate": evaluate,
    "export": export,
}
# Stages run once per named entry of a params mapping (dvc.yaml: foreach over it, STAGE@NAME).
PER_NAME: dict[str, str] = {"prepare_source": "sources.pipeline", "pretrain": "sources.pipeline",
                            "prepare_unlabeled": "data.unlabeled"}
# Stages that train, and so run data-parallel with compute.processes > 1 (components/distributed.py).
TRAINING_STAGES = ("pretrain", "baseline", "finetune")


def _names(params: Params, key: str) -> list[str]:
    section, _, entry = key.partition(".")
    return list(getattr(getattr(params, section), entry))


def stage_order(params: Params) -> list[str]:
    """Every stage of this configuration, in the order the flow runs them."""
    order = []
    for name in STAGES:
        if name in PER_NAME:
            order += [f"{name}@{key}" for key in _names(params, PER_NAME[name])]
        else:
            order.append(name)
    return order


def run_stage(name: str, params_path: str | Path = "params.yaml") -> object:
    stage, _, key = name.partition("@")
    if stage not in STAGES:
        per_name = ", ".join(f"{s}@NAME ({mapping})" for s, mapping in PER_NAME.items())
        raise UnknownStage(f"unknown stage {name!r}; stages: {', '.join(STAGES)} (once per entry of: {per_name})")
    params = load_params(params_path)
    if stage in PER_NAME:
        names = _names(params, PER_NAME[stage])
        if key not in names:
            raise UnknownStage(f"stage {name!r}: {key!r} is not an entry of {PER_NAME[stage]}; entries: {', '.join(names) or 'none'}")
    run = partial(STAGES[stage], params, key) if stage in PER_NAME else partial(STAGES[stage], params)
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
