"""Self-training's pseudo-labels (components/self_training.py), on hand-made images and answers."""
import numpy as np

from components.data import Splits
from components.self_training import PSEUDO_ORIGIN, confident_new_images, with_pseudo_labels


def _image(value: int) -> np.ndarray:
    return np.full((1, 4, 4), value, np.uint8)


def test_only_confident_answers_about_new_images_become_labels_and_labelled_images_keep_their_own():
    x_train, y_train = np.stack([_image(1), _image(2)]), np.array([0, 1])
    splits = Splits(x_train, y_train, x_train, y_train, x_train, y_train, ("cat", "dog"),
                    np.array(["cat/1.png", "dog/2.png"]), np.array(["v", "v"]), np.array(["t", "t"]), "v1")
    # The pool: a labelled image (the teacher wrong about it), two sure answers, one unsure answer.
    pool = np.stack([_image(2), _image(3), _image(4), _image(5)])
    probabilities = np.array([[0.99, 0.01], [0.97, 0.03], [0.04, 0.96], [0.6, 0.4]])
    confident = confident_new_images(splits, pool, probabilities, 0.95)
    assert confident.tolist() == [False, True, True, False]
    student, added = with_pseudo_labels(splits, pool, probabilities, confident, "cam")
    assert added == {"pool": 4, "pseudo_labelled": 2, "per_class": {"cat": 1, "dog": 1}}
    assert [int(image[0, 0, 0]) for image in student.x_train] == [1, 2, 3, 4]
    assert student.y_train.tolist() == [0, 1, 0, 1], "dog/2.png keeps its own label, not the teacher's 'cat'"
    assert student.origin_train.tolist() == ["cat/1.png", "dog/2.png", f"{PSEUDO_ORIGIN}cam#1", f"{PSEUDO_ORIGIN}cam#2"]
    assert (student.x_val is splits.x_val) and (student.x_test is splits.x_test), "evaluation splits untouched"
    unsure = confident_new_images(splits, pool, probabilities, 1.0)
    nothing, none_added = with_pseudo_labels(splits, pool, probabilities, unsure, "cam")
    assert none_added["pseudo_labelled"] == 0 and len(nothing.x_train) == 2
