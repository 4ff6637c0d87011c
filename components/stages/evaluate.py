"""evaluate: both target models on the test split: metrics, per-class report, confusion matrices, curves; and how
calibrated the shipped model's probabilities are, before and after its temperature (models/calibration.json)."""
from __future__ import annotations

from components import data as data_mod
from components.artifacts import atomic_path, read_json, write_json
from components.calibrate import CalibrationScores, plot_reliability, softmax
from components.explain import cam_layer, correct_sample, examples, grad_cam, most_confident_mistakes, plot_gallery
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
from components.predict import Normalizer, for_inference, predict_logits


def evaluate(params: Params) -> dict:
    splits = data_mod.load_splits(Layout.selected_data)
    results, strategies, per_class, correct = {}, {}, {}, {}
    for label, path, plot in (("transfer", Layout.transfer_model, Layout.confusion_transfer),
                              ("scratch", Layout.scratch_model, Layout.confusion_scratch)):
        model, meta = load_checkpoint(path)
        model = for_inference(model, params.compute)
        logits = predict_logits(model, splits.x_test, Normalizer.of(model.spec.contract)).numpy()
        predicted = logits.argmax(1)
        evaluation = score(splits.y_test, predicted, splits.classes)
        plot_confusion(evaluation, splits.classes, f"{label} ({meta['strategy']}) on the test split", plot)
        strategies[label] = meta["strategy"]
        results[label] = {"accuracy": evaluation.accuracy, "balanced_accuracy": evaluation.balanced_accuracy,
                          "macro_f1": evaluation.macro_f1}
        per_class[label] = evaluation.per_class
        correct[label] = predicted == splits.y_test
        if label == "transfer":
            write_predictions(splits.y_test, predicted, splits.classes, Layout.predictions)
            results["calibration"] = calibration(logits, splits.y_test, params.calibration.bins,
                                                 f"{label} ({meta['strategy']}) on the test split")
            galleries(model, splits, softmax(logits, results["calibration"]["temperature"]), params)
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


def galleries(model, splits: data_mod.Splits, probabilities, params: Params) -> dict:
    """The test split's most confident mistakes and a draw of right answers a class, each beside its Grad-CAM map for
    the class predicted; the images shown, with where each came from, in reports/gallery.json."""
    layer_name, layer = cam_layer(model)
    shown = {}
    mistakes = most_confident_mistakes(probabilities, splits.y_test, params.explain.mistakes)
    correct = correct_sample(probabilities, splits.y_test, params.explain.correct_per_class, params.seed)
    for name, indices, path, title in (
            ("mistakes", mistakes, Layout.mistakes_gallery, f"the {len(mistakes)} most confident mistakes on the test split"),
            ("correct", correct, Layout.correct_gallery, f"right answers, up to {params.explain.correct_per_class} a class")):
        chosen = examples(indices, probabilities, splits.y_test, splits.classes, splits.origin_test)
        plot_gallery(splits.x_test[indices], grad_cam(model, layer, splits.x_test[indices], probabilities[indices].argmax(1)),
                     chosen, f"{title} (true -> predicted, calibrated probability; Grad-CAM of {layer_name})", path)
        shown[name] = [example.to_dict() for example in chosen]
    gallery = {"layer": layer_name, "method": "Grad-CAM (captum LayerGradCam), for the predicted class", **shown}
    write_json(Layout.gallery, gallery)
    return gallery


def calibration(logits, labels, bins: int, title: str) -> dict:
    """The shipped model's calibration on the test split, before and after its temperature: the after values are
    what the exported file's probabilities score (the temperature is folded into it)."""
    temperature = float(read_json(Layout.calibration)["temperature"])
    before, after = (CalibrationScores.of(logits, labels, t, bins) for t in (1.0, temperature))
    plot_reliability(logits, labels, temperature, bins, title, Layout.reliability)
    return {"temperature": temperature, "bins": bins, **after.to_dict(),
            **{f"{key}_before": value for key, value in before.to_dict().items() if key != "accuracy"}}
