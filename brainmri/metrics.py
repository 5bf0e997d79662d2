"""Classification metrics from a confusion matrix.

Training aggregates a confusion matrix across data-parallel workers (one all-reduce of a
KxK tensor), so epoch metrics are computed from it rather than from per-sample lists.
`tests/test_metrics.py` checks these against scikit-learn on the same predictions.
"""

from __future__ import annotations

import numpy as np


def confusion(y_true, y_pred, k: int) -> np.ndarray:
    """rows = true class, columns = predicted class."""
    return np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k)


def from_confusion(cm: np.ndarray, classes: list[str]) -> dict:
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    n = cm.sum()
    present = support > 0
    out = {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1.mean()),
        "n": int(n),
    }
    for i, c in enumerate(classes):
        out[f"recall_{c}"] = float(recall[i])
        out[f"precision_{c}"] = float(precision[i])
        out[f"f1_{c}"] = float(f1[i])
    return out
