"""Scores and the classification report, checked against counts worked out by hand."""
import numpy as np
import pytest

from components.columns import display_width
from components.evaluate import balanced_accuracy, classification_report, score


def test_classification_report_has_per_class_scores_support_and_both_averages():
    classes = ("cat", "dog", "owl")
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    evaluation = score(y_true, y_pred, classes)
    # cat: 3 of 4 found, 3 of 4 predicted right; dog: 1 of 2, 1 of 2; owl: 3 of 4, 3 of 4.
    assert {name: s["support"] for name, s in evaluation.per_class.items()} == {"cat": 4, "dog": 2, "owl": 4}
    assert evaluation.per_class["dog"]["precision"] == pytest.approx(0.5)
    report = classification_report(evaluation.per_class, evaluation.accuracy).splitlines()
    assert report[0].split() == ["precision", "recall", "f1-score", "support"]
    assert report[2].split() == ["cat", "0.750", "0.750", "0.750", "4"]
    assert report[3].split() == ["dog", "0.500", "0.500", "0.500", "2"]
    assert report[-3].split() == ["accuracy", "0.700", "10"]
    assert report[-2].split() == ["macro", "avg", "0.667", "0.667", "0.667", "10"]
    assert report[-1].split() == ["weighted", "avg", "0.700", "0.700", "0.700", "10"]  # (4*.75 + 2*.5 + 4*.75) / 10
    assert "support_cat" not in evaluation.summary(), "a count of the data is not a metric"


def test_balanced_accuracy_counts_every_class_the_same():
    # 8 cats and 2 dogs, everything called a cat: 80% accurate, and no better than chance per class.
    y_true, y_pred = np.array([0] * 8 + [1] * 2), np.zeros(10, dtype=int)
    assert score(y_true, y_pred, ("cat", "dog")).accuracy == pytest.approx(0.8)
    assert score(y_true, y_pred, ("cat", "dog")).balanced_accuracy == pytest.approx(0.5)
    assert balanced_accuracy(y_true, y_pred, 2) == pytest.approx(0.5)
    # The dogs found, two cats missed: less accurate, better balanced (6/8 and 2/2).
    found = np.array([0] * 6 + [1] * 4)
    assert score(y_true, found, ("cat", "dog")).accuracy == pytest.approx(0.8)
    assert balanced_accuracy(y_true, found, 2) == pytest.approx(0.875)
    # A class the split does not hold (owl) is not a class it can measure: the mean is over cat and dog.
    assert balanced_accuracy(y_true, found, 3) == pytest.approx(0.875)
    assert score(y_true, found, ("cat", "dog", "owl")).summary()["balanced_accuracy"] == pytest.approx(0.875)


def test_the_summary_table_wraps_a_long_value_between_its_items_within_the_terminal(monkeypatch):
    from components.summary import format_table

    monkeypatch.setenv("COLUMNS", "80")
    stages = [f"stage_{i}@source ran {i}s" for i in range(12)]
    table = format_table({"target data": "noto-emoji @ 970308ced665 (train 90, test 450)", "stages": ", ".join(stages),
                          "not measured": ""})
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 79 and len(lines) > 5, table
    assert lines[0] == lines[-1] == "-" * max(len(line) for line in lines[1:-1])
    values = [line[len("target data  "):] for line in lines[1:-1]]
    assert lines[2].startswith("stages       ") and all(line.startswith(" " * 13) for line in lines[3:-1])
    assert ", ".join(v.rstrip(",") for v in values[1:]) == ", ".join(stages), "every item kept whole, in order"
    assert "not measured" not in table


def test_a_variant_refused_by_its_accuracy_bound_is_counted_in_test_images():
    from components.summary import _variants_line

    variants = {"fp32": {"accuracy": 0.8043, "latency_ms_batch64": 28.7, "published": True},
                "int8": {"accuracy": 0.7826, "latency_ms_batch64": 14.0, "published": False, "accuracy_drop": 1 / 46}}
    assert _variants_line(variants, 46) == ("fp32 0.8043, 28.7 ms/64 on CPU; int8 0.7826, 14.0 ms/64 on CPU "
                                            "(not published: 2.17 points below fp32: a net 1 of 46 test images)")


def test_classification_report_lines_up_class_names_in_any_script():
    # A CJK name takes two terminal columns a character, a combining accent none: counted in characters, both misalign.
    names = ("Stop-Sign", "日本の標識", "cafe\u0301 crème")
    evaluation = score(np.array([0, 1, 2, 1]), np.array([0, 1, 2, 2]), names)
    rows = [line for line in classification_report(evaluation.per_class, evaluation.accuracy).splitlines() if line]
    assert len({display_width(row) for row in rows}) == 1, rows
    assert sum(row.lstrip().startswith(names) for row in rows) == 3
