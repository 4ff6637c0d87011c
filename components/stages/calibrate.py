"""calibrate: the fine-tuned model's temperature, fitted on the validation split (components/calibrate.py)."""
from __future__ import annotations

from components import data as data_mod
from components.artifacts import write_json
from components.calibrate import fit_temperature, nll, separated
from components.config import Params
from components.errors import GraftError
from components.layout import Layout
from components.network import load_checkpoint
from components.predict import Normalizer, for_inference, predict_logits


class CalibrationError(GraftError):
    """The temperature cannot be fitted as asked."""


def calibrate(params: Params) -> dict:
    splits = data_mod.load_splits(Layout.selected_data)
    if params.calibration.method == "none":
        result = {"method": "none", "temperature": 1.0, "fit": "not calibrated: calibration.method none"}
    elif len(splits.y_val) == 0:
        raise CalibrationError("calibration.method 'temperature' is fitted on the validation split, and it is empty: "
                               "set data.target.val_size above 0 (a few hundred images), or calibration.method: none")
    else:
        model = for_inference(load_checkpoint(Layout.transfer_model)[0], params.compute)
        logits = predict_logits(model, splits.x_val, Normalizer.of(model.spec.contract)).numpy()
        temperature = fit_temperature(logits, splits.y_val)
        examples = int(len(splits.y_val))
        fit = (f"not fitted: right on all {examples} validation images (no temperature fits them)"
               if separated(logits, splits.y_val) else f"fitted on {examples} validation images")
        result = {"method": "temperature", "temperature": temperature, "fitted_on": "val", "fit": fit,
                  "examples": examples, "val_nll_before": nll(logits, splits.y_val),
                  "val_nll_after": nll(logits, splits.y_val, temperature)}
    write_json(Layout.calibration, result)
    return result
