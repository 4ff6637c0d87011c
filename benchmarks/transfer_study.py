"""Which source, and does transfer pay? Every candidate source x strategy against scratch, over seeds.

Run by hand after `graft run` (it reuses the pipeline sources' checkpoints and params.yaml):

    .venv/bin/python benchmarks/transfer_study.py --seeds 0 1 2 --labels-per-class 10 \
        --extra-sources benchmarks/study_sources.yaml

Protocol: the test and val splits are fixed by data.split_seed; each seed draws its own k labelled images a
class and its own initialisation; every run, scratch included, gets the same steps, batch size, optimizer,
learning rate and augmentation (params.yaml `finetune`); scratch is trained once per architecture (the same
network without the source's weights); the test split is never used for selection. Before any training, each
candidate's frozen features on the seed's training split are scored (LogME, LEEP, NCE), and the study reports
how well each score ranks the candidates by their fine-tuned test accuracy (Kendall tau) and whether
`selection: auto` (LogME) picked the candidate that fine-tuned best.

With `--set finetune.semi_supervised.method=fixmatch` the transfers (not scratch) also learn from unlabelled images:
the target's whole training pool (every image outside val and test, labels dropped; the same for every seed, and
holding that seed's labelled images, as in FixMatch's own protocol).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from components.config import STRATEGIES, parse_params
from components.data import load_splits, prepare, without_held_out
from components.evaluate import score
from components.layout import Layout
from components.network import build, graft
from components.objectives import FixMatch
from components.config import SCORES
from components.selection import kendall_tau, score_candidate
from components.source_models import (
    LoadedSource,
    SourceIdentity,
    extract_features,
    load_source,
    pipeline_identity,
    resolve_pretrained,
)
from components.predict import Normalizer, predict_logits
from components.calibrate import CalibrationScores, fit_temperature
from components.train import strategy_phases, train


def _override(raw: dict, assignments: list[str]) -> dict:
    for assignment in assignments:
        dotted, value = assignment.split("=", 1)
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = yaml.safe_load(value)
    return raw


def _evaluate(model, splits, bins: int) -> dict:
    """Val and test accuracy, and the test split's calibration before and after a temperature fitted on val (the
    pipeline's calibrate stage)."""
    logits = {split: predict_logits(model, splits.split(split)[0], Normalizer.of(model.spec.contract)).numpy()
              for split in ("val", "test")}
    accuracy = {split: score(splits.split(split)[1], logits[split].argmax(1), splits.classes).accuracy for split in logits}
    temperature = fit_temperature(logits["val"], splits.y_val)
    before, after = (CalibrationScores.of(logits["test"], splits.y_test, t, bins) for t in (1.0, temperature))
    return {**accuracy, "calibration": {"temperature": temperature, "before": before.to_dict(), "after": after.to_dict()}}


def run_study(params_path: Path, seeds: list[int], labels_per_class: int, strategies: list[str], overrides: list[str],
              extra_sources: Path | None, only: list[str] | None = None, with_scratch: bool = True) -> dict:
    raw = _override(yaml.safe_load(params_path.read_text()), overrides)
    if extra_sources:
        raw["sources"]["pretrained"].update(yaml.safe_load(extra_sources.read_text()))
    if raw["finetune"]["semi_supervised"]["method"] != "none" and not raw["data"]["unlabeled"]:
        # The study prepares its unlabelled images itself (the training pool, below): this entry only names them.
        raw["data"]["unlabeled"] = {"training-pool": {"path": raw["data"]["target"]["path"]}}
    params = parse_params(raw)
    target = params.data.target.model_copy(update={"labels_per_class": labels_per_class or None})
    sources: dict[str, LoadedSource] = {}
    for name in params.sources.names():
        if only and name not in only:
            continue
        identity = (pipeline_identity(name, params.sources.pipeline[name], Layout.source_model(name))
                    if params.sources.kind(name) == "pipeline" else resolve_pretrained(name, params.sources.pretrained[name]))
        sources[name] = load_source(identity)
    runs: list[dict] = []
    semi_supervised = params.finetune.semi_supervised
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.npz"
        if semi_supervised.method == "fixmatch":
            prepare(target.model_copy(update={"labels_per_class": None}), params.data, params.data.channels,
                    params.sources.image_sizes(), 0, pool, Path(tmp) / "pool.json")
        for seed in seeds:
            data = Path(tmp) / f"target-{seed}.npz"
            prepare(target, params.data, params.data.channels, params.sources.image_sizes(), seed, data, Path(tmp) / "report.json")
            scratch_done: dict[tuple, dict] = {}
            for name, source in sources.items():
                identity: SourceIdentity = source.identity
                splits = load_splits(data, identity.image_size)
                features = extract_features(source, identity.contract(params.data.channels), splits.x_train,
                                            params.selection.batch_size, cache_dir=None)
                scores = score_candidate(name, identity.kind, identity.origin(), identity.image_size, features.features,
                                         features.source_probabilities, splits.y_train, features.seconds)
                spec = identity.model_spec(splits.classes, params.data.channels, params.finetune.channel_adapter)
                architecture = (spec.architecture, spec.widths, identity.image_size, spec.channel_adapter)
                first = with_scratch and architecture not in scratch_done
                for strategy in (["scratch"] if first else []) + strategies:
                    model = build(spec, seed) if strategy == "scratch" else graft(source.backbone, spec, seed)
                    terms = ()
                    if strategy != "scratch" and semi_supervised.method == "fixmatch":
                        unlabeled, _ = without_held_out(load_splits(pool, identity.image_size).x_train, splits)
                        terms = (FixMatch(semi_supervised, unlabeled, model.head),)
                    started = time.perf_counter()
                    history = train(model, splits, params.finetune, strategy_phases(params.finetune, strategy), seed,
                                    desc=f"{name} {strategy} seed {seed}", terms=terms)
                    run = {"seed": seed, "source": name if strategy != "scratch" else f"scratch ({spec.architecture} @{identity.image_size})",
                           "architecture": spec.architecture, "strategy": strategy,
                           "train_seconds": time.perf_counter() - started, **_evaluate(model, splits, params.calibration.bins)}
                    if terms:
                        run["fixmatch_mask_last"] = next(r for r in reversed(history) if "fixmatch_mask" in r)["fixmatch_mask"]
                    if strategy == "scratch":
                        scratch_done[architecture] = run
                    else:
                        run["scores"] = {s: getattr(scores, s) for s in SCORES}
                        if architecture in scratch_done:
                            run["scratch"] = scratch_done[architecture]["test"]
                    runs.append(run)
                    print(f"seed {seed} {run['source']:40s} {strategy:13s} val {run['val']:.4f} test {run['test']:.4f} "
                          f"({run['train_seconds']:.0f} s)", flush=True)
    return {"seeds": seeds, "labels_per_class": labels_per_class, "strategies": strategies, "overrides": overrides,
            "sources": {name: s.identity.to_dict() for name, s in sources.items()}, "runs": runs,
            "selection": selection_quality(runs, seeds)}


def selection_quality(runs: list[dict], seeds: list[int]) -> dict:
    """Per seed: Kendall tau of each score against the candidates' fine-tuned test accuracy, and whether the
    best-LogME candidate is the one that fine-tuned best."""
    per_seed = []
    for seed in seeds:
        tuned = [r for r in runs if r["seed"] == seed and r["strategy"] == "finetune"]
        if len(tuned) < 2:
            continue
        accuracy = [r["test"] for r in tuned]
        best = max(tuned, key=lambda r: r["test"])["source"]
        picked = max(tuned, key=lambda r: r["scores"]["logme"])["source"]
        per_seed.append({"seed": seed, **{f"tau_{s}": kendall_tau([r["scores"][s] for r in tuned], accuracy) for s in SCORES},
                         "picked_by_logme": picked, "best_finetuned": best, "picked_best": picked == best})
    return {"per_seed": per_seed}


def _mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f} ± {100 * (statistics.stdev(values) if len(values) > 1 else 0.0):.1f}"


def markdown(study: dict) -> str:
    runs = study["runs"]
    lines = [f"k={study['labels_per_class']} labels a class, seeds {study['seeds']}, overrides: {study['overrides'] or 'none'}", "",
             "| source | strategy | test accuracy % (mean ± std) | per seed | minus same-architecture scratch, per seed | val % | train s "
             "| test ECE, uncalibrated -> temperature on val, per seed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = list(dict.fromkeys((r["source"], r["strategy"]) for r in runs))
    for source, strategy in keys:
        rows = [r for r in runs if (r["source"], r["strategy"]) == (source, strategy)]
        tests = [r["test"] for r in rows]
        gains = ", ".join(f"{100 * (r['test'] - r['scratch']):+.1f}" for r in rows if "scratch" in r)
        lines.append(f"| {source} | {strategy} | {_mean_std(tests)} | {', '.join(f'{100 * t:.1f}' for t in tests)} | {gains} | "
                     f"{100 * statistics.mean(r['val'] for r in rows):.1f} | {statistics.mean(r['train_seconds'] for r in rows):.0f} | "
                     + ", ".join(f"{r['calibration']['before']['ece']:.3f} -> {r['calibration']['after']['ece']:.3f}"
                                 for r in rows if "calibration" in r) + " |")
    quality = study["selection"]["per_seed"]
    if quality:
        lines += ["", "| seed | " + " | ".join(f"Kendall tau {s}" for s in SCORES) + " | picked by LogME | fine-tuned best |",
                  "| --- | " + " | ".join("---" for _ in SCORES) + " | --- | --- |"]
        for q in quality:
            lines.append(f"| {q['seed']} | " + " | ".join(f"{q[f'tau_{s}']:+.2f}" for s in SCORES)
                         + f" | {q['picked_by_logme']} | {q['best_finetuned']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels-per-class", type=int, default=10, help="0: every training image (the labelled ceiling)")
    parser.add_argument("--strategies", nargs="*", default=["linear_probe", "finetune"], choices=[s for s in STRATEGIES if s != "scratch"],
                        help="the transfers to train (none: scratch only)")
    parser.add_argument("--extra-sources", type=Path, help="YAML: more pretrained candidates, as under sources.pretrained")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this study, e.g. --set finetune.backbone_lr_scale=0.3")
    parser.add_argument("--sources", nargs="+", help="only these candidates (default: every one in params)")
    parser.add_argument("--no-scratch", action="store_true", help="skip the scratch baselines")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/transfer_study.json"))
    args = parser.parse_args()
    study = run_study(args.params, args.seeds, args.labels_per_class, args.strategies, args.overrides, args.extra_sources,
                      args.sources, not args.no_scratch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(study, indent=2) + "\n")
    print(markdown(study))


if __name__ == "__main__":
    main()
