"""evaluate: both target models on the test split: metrics, per-class report, confusion matrices, curves."""
from __future__ import annotations

from components import data as data_mod
from components.artifacts import atomic_path, write_json
from components.config import Params
from components.evaluate import (
    classification_report,
    plot_confusion,
    plot_curves,
    read_history,
    score,
    write_predictions,
)
from components.layout import Layout
from components.network import load_checkpoint
from components.predict import predict_classes


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
