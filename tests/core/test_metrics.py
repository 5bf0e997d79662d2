import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score

from brainmri.core.metrics import confusion, from_confusion

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
