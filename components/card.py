"""The model card of a registered version: what it is, what it was made from and how it scored, written by the
pipeline from the facts the run recorded (the stages' declared outputs, the gate report, the registration), never
by hand. Every number in it is read from those files: the card cannot say what the run did not measure.
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import numpy as np

from components.artifacts import read_json
from components.evaluate import classification_report, confusion_matrix, score
from components.layout import Layout
from components.settings import Settings
from components.summary import RunOutputs

INTERVAL_CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000
WEAKEST_SHOWN = 3
MISTAKES_SHOWN = 5


def wilson_interval(successes: int, trials: int, confidence: float = INTERVAL_CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion: honest near 0 and 1, where the normal approximation is not."""
    if trials == 0:
        return 0.0, 1.0
    z = _normal_quantile(0.5 + confidence / 2)
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def macro_f1_interval(actual: np.ndarray, predicted: np.ndarray, classes: int, seed: int = 0,
                      confidence: float = INTERVAL_CONFIDENCE) -> tuple[float, float]:
    """A seeded percentile bootstrap of macro-F1 over the test images (scored as the evaluate stage scores it)."""
    rng = np.random.default_rng(seed)
    names = tuple(str(c) for c in range(classes))
    values = [score(actual[pick], predicted[pick], names).macro_f1
              for pick in (rng.integers(0, len(actual), len(actual)) for _ in range(BOOTSTRAP_RESAMPLES))]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _predictions(root: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {name: i for i, name in enumerate(classes)}
    with open(root / Layout.predictions, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return (np.array([index[r["actual"]] for r in rows], dtype=int), np.array([index[r["predicted"]] for r in rows], dtype=int))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"| {' | '.join('---' for _ in header)} |", *(f"| {' | '.join(r)} |" for r in rows)]


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def model_card(root: str | Path, params: Settings, registration: dict, gate_report: dict) -> str:
    """The card's Markdown for the version `registration` names, from the run's outputs under `root`."""
    root = Path(root)
    run = RunOutputs.read(root)
    target, source, selection, evaluation, export, trained = (run.target, run.source, run.selection, run.evaluation,
                                                              run.export, run.trained)
    per_class = read_json(root / Layout.per_class)["transfer"]
    gallery = read_json(root / Layout.gallery) if (root / Layout.gallery).exists() else {"mistakes": []}
    classes = list(target["classes"])
    contract = trained["spec"]["contract"]
    transfer, calibration = evaluation["transfer"], evaluation["calibration"]
    actual, predicted = _predictions(root, classes)
    tested = len(actual)
    right = int((actual == predicted).sum())
    accuracy_low, accuracy_high = wilson_interval(right, tested)
    f1_low, f1_high = macro_f1_interval(actual, predicted, len(classes), seed=params.seed)
    card = params.model_card
    name, version = registration["model_name"], registration["version"]
    counts = target["per_class"]

    lines = [f"# Model card: {name} v{version}", "",
             f"Written by `graft` from the run's recorded outputs (MLflow run `{registration['run_id']}`); "
             f"never edited by hand.", "",
             "## What it classifies", "",
             f"{len(classes)} classes of the `{target['dataset']}` data set: {', '.join(classes)}. It always answers one of "
             f"them. Input: any image, converted to {'gray' if contract['color_mode'] == 'L' else 'RGB'} and resized to "
             f"{contract['height']} x {contract['width']} px (the preprocessing contract in the ONNX file).", "",
             f"**Intended use:** {card.intended_use}", "",
             f"**Not intended for:** {card.out_of_scope}", "",
             "## Data", "",
             f"Data version `{target['data_version']}` (`{target['path']}`): train {target['counts']['train']}, "
             f"validation {target['counts']['val']}, test {target['counts']['test']} images; "
             f"{target['quarantined']} files quarantined (not used)" + _quarantine_reasons(target) + ".", "",
             *_table(["class", "train", "validation", "test"],
                     [[c, str(counts["train"].get(c, 0)), str(counts["val"].get(c, 0)), str(counts["test"].get(c, 0))]
                      for c in classes]), "",
             "## Source and lineage", "",
             f"Transferred from `{source['name']}` ({source['kind']}: {source['architecture']}, weights "
             f"`{source['weights'] or source['file']}`, sha256 `{source['sha256'][:16]}`, {source['image_size']} px)"
             + (f", pretraining run `{registration['source_run_id']}`" if registration.get("source_run_id") else "") + ". "
             f"Chosen by `selection.mode: {selection['mode']}`: {selection['decided_by']}", "",
             "## Training", "",
             f"Strategy `{trained['strategy']}`, {params.finetune.steps} steps of batch {params.finetune.batch_size}, "
             f"{params.finetune.optimizer} lr {params.finetune.lr:g} (backbone x{params.finetune.backbone_lr_scale:g}), "
             f"weight decay {params.finetune.weight_decay:g}, seed {params.seed}"
             + class_balance_clause(params.finetune.class_balance, counts["train"])
             + objective_clause(trained.get("objective", []))
             + "".join(f"; self-training round {r['round']}: a fresh graft trained on the labels and {r['pseudo_labelled']} "
                       f"of {r['pool']} unlabelled images the model before it was sure of" for r in trained.get("self_training", []))
             + f". Compute: {trained['compute']['device']}, {trained['compute']['precision']}"
             + (f", {trained['train_seconds']:.0f} s of training" if "train_seconds" in trained else "") + ".", "",
             f"## Test metrics ({tested} test images, {int(INTERVAL_CONFIDENCE * 100)}% intervals)", "",
             *_table(["metric", "value", "interval"], [
                 ["accuracy", _pct(transfer["accuracy"]), f"{_pct(accuracy_low)} - {_pct(accuracy_high)} (Wilson)"],
                 ["macro-F1", f"{transfer['macro_f1']:.4f}", f"{f1_low:.4f} - {f1_high:.4f} (bootstrap, {BOOTSTRAP_RESAMPLES})"],
                 ["scratch baseline accuracy (same architecture)", _pct(evaluation["scratch"]["accuracy"]), ""],
                 ["transfer gain", f"{100 * evaluation['transfer_gain']:+.2f} points", ""]]), "",
             "```", classification_report(per_class, transfer["accuracy"]).rstrip(), "```", "",
             "## Calibration", "",
             f"Temperature scaling: T = {calibration['temperature']:.4g}, {run.calibration['fit']}. The ONNX file "
             f"divides its logits by it, so every probability it answers has it applied.", "",
             *_table(["on the test split", "uncalibrated", "calibrated"], [
                 [f"expected calibration error ({calibration['bins']} bins)", f"{calibration['ece_before']:.4f}", f"{calibration['ece']:.4f}"],
                 ["negative log-likelihood", f"{calibration['nll_before']:.4f}", f"{calibration['nll']:.4f}"],
                 ["Brier score", f"{calibration['brier_before']:.4f}", f"{calibration['brier']:.4f}"],
                 ["mean confidence (accuracy " + _pct(calibration["accuracy"]) + ")",
                  f"{calibration['mean_confidence_before']:.4f}", f"{calibration['mean_confidence']:.4f}"]]), "",
             "## Gates", "",
             f"Verdict: **{'passed' if gate_report['passed'] else 'FAILED'}**"
             f" (serving check on {gate_report.get('provider') or 'n/a'}).", "",
             *_table(["gate", "verdict", "value", "bound"],
                     [[g["name"], g["verdict"], "" if g["value"] is None else f"{g['value']:.6g}", g["bound"]]
                      for g in gate_report["gates"]]), "",
             "## Where it is weakest", "",
             *_weakest(per_class, actual, predicted, classes), "",
             *_mistakes(gallery), "",
             "## What it was not tested on", "",
             *_not_tested(target, export, contract, classes)]
    return "\n".join(lines) + "\n"


def _quarantine_reasons(target: dict) -> str:
    reasons = Counter(entry["reason"].split(" of ")[0].split(":")[0] for entry in target.get("quarantine", []))
    return f" ({', '.join(f'{reason}: {n}' for reason, n in reasons.most_common(4))})" if reasons else ""


def class_balance_clause(class_balance: str, train_counts: dict[str, int]) -> str:
    """The training line's note on unequal classes; nothing where the training split's classes are equal."""
    smallest, largest = min(train_counts.values()), max(train_counts.values())
    if smallest == largest:
        return ""
    return f", class_balance {class_balance} (training images a class: {smallest} to {largest})"


def objective_clause(terms: list[dict]) -> str:
    """The training line's note on the objective's terms beside the target's labels (the checkpoint's record of
    each, components/objectives.py summary), with the data each fed on: nothing where there were none."""
    said = []
    for term in terms:
        if term["term"] == "source":
            weighted = "" if term["instance_weights"] == "none" else f", {term['instance_weights']} instance weights"
            said.append(f"source: {term['source_examples']} labelled images of the source's own data (weight "
                        f"{term['weight']:g}, {term['schedule']}{weighted})")
        else:
            threshold = f", threshold {term['threshold']:g}" if "threshold" in term else ""
            said.append(f"{term['term']}: {term['unlabeled_examples']} unlabelled images of data.unlabeled."
                        f"{term['unlabeled']} (weight {term['weight']:g}{threshold})")
    return f"; beside the labels, the objective trained on {'; '.join(said)}" if said else ""


def _weakest(per_class: dict, actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> list[str]:
    weakest = sorted(per_class, key=lambda c: per_class[c]["f1"])[:WEAKEST_SHOWN]
    matrix = confusion_matrix(actual, predicted, len(classes))
    lines = []
    for name in weakest:
        row = matrix[classes.index(name)].copy()
        row[classes.index(name)] = 0
        confused = classes[int(row.argmax())] if row.sum() else None
        scores = per_class[name]
        lines.append(f"- **{name}**: F1 {scores['f1']:.3f} (precision {scores['precision']:.3f}, recall {scores['recall']:.3f})"
                     + (f"; most often mistaken for {confused} ({int(row.max())} of {int(scores['support'])})" if confused else ""))
    return lines


def _mistakes(gallery: dict) -> list[str]:
    mistakes = gallery.get("mistakes", [])[:MISTAKES_SHOWN]
    if not mistakes:
        return ["No wrong answer on the test split."]
    return ["Its most confident mistakes (plots/mistakes.png shows them with Grad-CAM):", "",
            *_table(["image", "true", "answered", "probability"],
                    [[f"`{m['origin']}`", m["true"], m["predicted"], f"{m['confidence']:.3f}"] for m in mistakes])]


def _not_tested(target: dict, export: dict, contract: dict, classes: list[str]) -> list[str]:
    variants = ", ".join(f"{name} {_pct(score['accuracy'])}" for name, score in export.get("variants", {}).items()
                         if score.get("published"))
    return [f"- Images from anywhere but `{target['dataset']}`'s own test split ({target['counts']['test']} images, one "
            f"split of one data version): other cameras, sites or times are untested; the server's drift monitor "
            f"watches what production sends.",
            f"- Anything outside its {len(classes)} classes: it has no \"none of these\" answer.",
            f"- Images far from {contract['height']} x {contract['width']} px or of another colour mode than the "
            f"training images (they are resized and converted, never refused).",
            "- Corrupted, adversarial or out-of-distribution inputs, and any subgroup of the data (the data carries "
            "no group labels).",
            f"- Served variants, each on the same test split only: {variants or 'FP32'}."]
