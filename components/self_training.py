"""Self-training (Noisy Student, Xie et al. 2020): a trained model's confident answers about unlabelled images become
labels a fresh student trains on beside the target's own (finetune.semi_supervised.self_training)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from components.data import Splits, pixels_digest

PSEUDO_ORIGIN = "pseudo-label:"  # origin_train of an image labelled by the teacher: "pseudo-label:<entry>#<index>"


def confident_new_images(splits: Splits, pool: np.ndarray, probabilities: np.ndarray, confidence: float) -> np.ndarray:
    """Which pool images get a pseudo-label: the top probability at least `confidence`, and not a labelled training
    image already (that one keeps its true label). A boolean mask."""
    labelled = {pixels_digest(image) for image in splits.x_train}
    return (probabilities.max(1) >= confidence) & np.array([pixels_digest(image) not in labelled for image in pool],
                                                           dtype=bool)


def with_pseudo_labels(splits: Splits, pool: np.ndarray, probabilities: np.ndarray, confident: np.ndarray,
                       pool_name: str) -> tuple[Splits, dict]:
    """`splits` with the `confident` pool images (confident_new_images' mask) added to its training split, labelled
    with their top answer. Returns the new splits and what was added: how many, and how many a class."""
    labels = probabilities.argmax(1)[confident].astype(splits.y_train.dtype)
    origins = np.array([f"{PSEUDO_ORIGIN}{pool_name}#{index}" for index in np.flatnonzero(confident)], dtype=str)
    student_data = replace(splits, x_train=np.concatenate([splits.x_train, pool[confident]]),
                           y_train=np.concatenate([splits.y_train, labels]),
                           origin_train=np.concatenate([splits.origin_train, origins]))
    counts = np.bincount(labels, minlength=len(splits.classes))
    return student_data, {"pool": int(len(pool)), "pseudo_labelled": int(confident.sum()),
                          "per_class": dict(zip(splits.classes, map(int, counts)))}
