"""The model card's statistics: the Wilson interval against hand-worked values, the seeded macro-F1 bootstrap; its
notes on unequal classes and on the objective's terms.
(The card itself, against a real run's recorded metrics: tests/test_pipeline.py.)"""
import numpy as np
import pytest

from components.card import class_balance_clause, macro_f1_interval, objective_clause, wilson_interval
from components.evaluate import score


def test_the_wilson_interval_equals_the_hand_worked_one():
    # p = 0.9, n = 100, z = 1.959964: centre (0.9 + z^2/200) / (1 + z^2/100) = 0.885200,
    # half-width z * sqrt(0.0009 + z^2/40000) / (1 + z^2/100) = 0.059567
    low, high = wilson_interval(90, 100)
    assert (low, high) == pytest.approx((0.825633, 0.944767), abs=1e-5)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(10, 10)[1] == 1.0  # within [0, 1]
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_the_macro_f1_bootstrap_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    actual = rng.integers(0, 4, 400)
    predicted = np.where(rng.random(400) < 0.8, actual, rng.integers(0, 4, 400))
    estimate = score(actual, predicted, tuple("abcd")).macro_f1
    low, high = macro_f1_interval(actual, predicted, 4, seed=3)
    assert low < estimate < high and high - low < 0.15
    assert macro_f1_interval(actual, predicted, 4, seed=3) == (low, high)


def test_the_training_line_names_the_class_balance_only_where_the_classes_are_unequal():
    assert class_balance_clause("resample", {"a": 8, "b": 8}) == ""
    assert class_balance_clause("resample", {"a": 46, "b": 5, "c": 40}) == (
        ", class_balance resample (training images a class: 5 to 46)")


def test_the_training_line_names_each_term_of_the_objective_and_the_data_it_fed_on():
    assert objective_clause([]) == ""
    terms = [{"term": "source", "weight": 0.5, "schedule": "linear", "instance_weights": "domain", "source_examples": 500},
             {"term": "coral", "unlabeled": "cam", "dropped_as_val_or_test": 2, "weight": 1.0, "unlabeled_examples": 3000},
             {"term": "fixmatch", "unlabeled": "cam", "dropped_as_val_or_test": 2, "weight": 1.0, "threshold": 0.95,
              "unlabeled_examples": 3000}]
    assert objective_clause(terms) == (
        "; beside the labels, the objective trained on source: 500 labelled images of the source's own data (weight "
        "0.5, linear, domain instance weights); coral: 3000 unlabelled images of data.unlabeled.cam (weight 1); "
        "fixmatch: 3000 unlabelled images of data.unlabeled.cam (weight 1, threshold 0.95)")
