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


# -- from probabilities (evaluation has every prediction in memory) ---------------------------
ECE_BINS = 15


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1.0)
    return float(-np.log(p).mean()) if len(labels) else float("nan")


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Top-label reliability: per equal-width confidence bin (right-closed, (a, b]), the
    count, mean confidence and accuracy. ECE = sum_b n_b/n * |acc_b - conf_b|."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin b holds conf in (edges[b], edges[b+1]]; conf == 0 is impossible for a softmax
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, minlength=bins) / count
        acc = np.bincount(idx, correct, minlength=bins) / count
    n = max(len(labels), 1)
    gap = np.where(count > 0, np.abs(acc - mean_conf), 0.0)
    return {"edges": edges.tolist(), "count": count.tolist(),
            "confidence": np.nan_to_num(mean_conf).tolist(), "accuracy": np.nan_to_num(acc).tolist(),
            "ece": float((count / n * gap).sum())}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(probs, labels, bins)["ece"]
