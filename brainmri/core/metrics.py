"""Classification metrics, and the one schema every producer emits and every consumer reads.

The schema (a flat, JSON-ready dict; `summary` and `key` are the only places that spell its
keys):

    n                      images scored
    accuracy               correct / n
    balanced_accuracy      mean recall over the classes present in the labels
    macro_f1               mean F1 over all classes (an absent class counts as 0)
    weighted_f1            F1 averaged with each class's support as weight
    precision_<class>      per class, for every class in label order (0 where undefined)
    recall_<class>
    f1_<class>
    support_<class>        true images of that class (an int)

Training computes it from an all-reduced confusion matrix (`from_confusion`; one all-reduce
of a KxK tensor) and reports every key with a `val_` prefix (`val_macro_f1`,
`val_recall_glioma`, ...); evaluation computes it with scikit-learn
(`evaluation.scoring.classification`) and adds the probability-based metrics beside it in
metrics.json. Read a per-class value with `class_metric` (or `key`), a per-class table with
`per_class`. `SELECTION_METRIC` is the training-history key that picks the best epoch,
checkpoint and trial. `tests/core/test_metrics.py` checks both producers against each other
and against scikit-learn on the same predictions.
"""

from __future__ import annotations

import numpy as np


def confusion(y_true, y_pred, k: int) -> np.ndarray:
    """rows = true class, columns = predicted class."""
    return np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k)


# the training-history key that selects the best epoch, checkpoint and search trial
SELECTION_METRIC = "val_macro_f1"
PER_CLASS = ("precision", "recall", "f1", "support")


def key(stat: str, cls: str) -> str:
    """The schema's key of one per-class statistic: key("recall", "glioma") -> "recall_glioma"."""
    return f"{stat}_{cls}"


def class_metric(m: dict, stat: str, cls: str, prefix: str = ""):
    """One per-class value of a metrics dict (`prefix` "val_" for a training-history entry);
    None where it is missing (a class the dataset does not have). Also reads the nested
    `per_class: {class: {stat: value}}` of metrics.json written before this schema."""
    k = prefix + key(stat, cls)
    if k not in m and not prefix and "per_class" in m:  # a metrics.json from an older version
        return (m["per_class"].get(cls) or {}).get(stat)
    return m.get(k)


def per_class(m: dict, classes: list[str]) -> dict:
    """{class: {precision, recall, f1, support}} from a metrics dict, for tables."""
    return {c: {stat: class_metric(m, stat, c) for stat in PER_CLASS} for c in classes}


def summary(classes: list[str], precision, recall, f1, support, correct: int) -> dict:
    """The schema (module docstring) from per-class arrays in label order and the number of
    correct predictions. Both producers call this, so both emit the same keys."""
    precision, recall, f1 = (np.asarray(a, dtype=np.float64) for a in (precision, recall, f1))
    support = np.asarray(support, dtype=np.int64)
    n = int(support.sum())
    present = support > 0
    out = {
        "n": n,
        "accuracy": float(correct / n) if n else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * support).sum() / n) if n else 0.0,
    }
    for i, c in enumerate(classes):
        out[key("precision", c)] = float(precision[i])
        out[key("recall", c)] = float(recall[i])
        out[key("f1", c)] = float(f1[i])
        out[key("support", c)] = int(support[i])
    return out


def rates(cm: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tp, support, precision, recall, f1) per class of one confusion matrix [k, k] (rows =
    true class, columns = predicted) or of a stack of them [..., k, k] (the decision rule
    scores 61 at once): the one place this arithmetic lives."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return tp, support, precision, recall, f1


def from_confusion(cm: np.ndarray, classes: list[str]) -> dict:
    """The schema from a confusion matrix (rows = true class, columns = predicted class)."""
    tp, support, precision, recall, f1 = rates(cm)
    return summary(classes, precision, recall, f1, support.astype(np.int64), int(tp.sum()))


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
