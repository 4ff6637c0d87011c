"""A trained network's answers on prepared images, normalised under its own contract."""
from __future__ import annotations

import numpy as np

from components.train import Normalizer, predict_logits


def predict_classes(model, x: np.ndarray) -> np.ndarray:
    return predict_logits(model, x, Normalizer.of(model.spec.contract)).argmax(1).numpy()
