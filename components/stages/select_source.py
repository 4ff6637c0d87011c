"""select_source: every candidate scored on the target's frozen features; a short fine-tuning race when the scores
cannot decide; the chosen source's identity, architecture and input-size data kept for the stages after it."""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np

from components import data as data_mod
from components.artifacts import read_json, write_json
from components.compute import resolve_compute
from components.config import FinetuneParams, Params
from components.errors import GraftError
from components.layout import Layout
from components.network import graft
from components.race import successive_halving
from components.selection import Selection, choose_source, lead_share, score_candidate, why_race, write_selection
from components.source_models import SourceModelError, SourceIdentity, extract_features, load_source, pipeline_identity
from components.train import strategy_phases, train
from components.tuning import Tuning


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
            raise SourceModelError(f"source {name} is not resolved yet; run the resolve_sources stage first (graft run, or dvc repro)")
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
    selection = choose_source(scores, params.selection.mode, params.selection.score, params.chosen_in_report_mode(),
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
        "joint": {"weight": 0.0}, "adaptation": {"method": "none"}, "semi_supervised": {"method": "none"},
    })
