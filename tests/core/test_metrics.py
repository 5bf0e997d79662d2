import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score

from brainmri.core.metrics import class_metric, confusion, from_confusion, per_class
from brainmri.evaluation import scoring

CLASSES = ["a", "b", "c", "d"]


def test_hand_checked_confusion_matrix():
    cm = np.array([[8, 2, 0, 0], [1, 9, 0, 0], [0, 0, 10, 0], [0, 0, 5, 5]])
    m = from_confusion(cm, CLASSES)
    assert m["n"] == 40 and m["accuracy"] == pytest.approx(32 / 40)
    assert m["recall_a"] == pytest.approx(0.8) and m["precision_a"] == pytest.approx(8 / 9)
    assert m["recall_d"] == pytest.approx(0.5) and m["precision_d"] == pytest.approx(1.0)
    assert m["precision_c"] == pytest.approx(10 / 15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 4, 300))
    m = from_confusion(confusion(y, p, 4), CLASSES)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    for i, c in enumerate(CLASSES):
        assert m[f"recall_{c}"] == pytest.approx(recall_score(y, p, labels=[i], average="macro"))
        assert m[f"precision_{c}"] == pytest.approx(precision_score(y, p, labels=[i], average="macro"))


def test_absent_class_counts_as_zero_not_nan():
    m = from_confusion(confusion([0, 0, 1], [0, 1, 1], 4), CLASSES)
    assert m["recall_c"] == 0.0 and not np.isnan(m["macro_f1"])


@pytest.mark.parametrize("seed", [0, 1])
def test_training_and_evaluation_emit_the_same_schema(seed):
    # one schema: the confusion-matrix metrics (training) are exactly the classification
    # metrics of evaluation on the same predictions, key for key
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 200)
    y[y == 3] = 2 if seed else 3  # seed 1: class d absent from the labels
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    probs = rng.random((200, 4)) + 2.0 * np.eye(4)[pred]
    probs /= probs.sum(1, keepdims=True)
    train = from_confusion(confusion(y, probs.argmax(1), 4), CLASSES)
    evaluation = scoring.classification(y, probs, CLASSES)
    assert set(train) <= set(evaluation)
    assert {k: evaluation[k] for k in train} == pytest.approx(train)
    assert {f"{s}_{c}" for s in ("precision", "recall", "f1", "support") for c in CLASSES} <= set(train)
    assert class_metric(train, "recall", "a") == train["recall_a"]
    assert class_metric({"val_recall_a": 0.5}, "recall", "a", prefix="val_") == 0.5


def test_reads_the_nested_per_class_of_older_metrics_files():
    old = {"n": 2, "per_class": {"a": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}}}
    assert class_metric(old, "recall", "a") == 0.5 and class_metric(old, "recall", "b") is None
    assert per_class(old, ["a"]) == {"a": old["per_class"]["a"]}
