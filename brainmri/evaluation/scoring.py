"""Evaluation metrics from labels and class probabilities (scikit-learn where it has them).

Training's `core/metrics.py` works from an all-reduced confusion matrix; evaluation has every
prediction in memory, so it also scores the probabilities: ROC-AUC, log loss, Brier score
and calibration error, plus selective prediction (accuracy when the model may abstain).
The classification metrics use the one schema of `core/metrics.py` (`summary`).
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from ..core.metrics import ECE_BINS, ece, summary

# Coverage/accuracy pairs always shown in the report, whatever --abstain-below is.
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def classification(labels: np.ndarray, probs: np.ndarray, classes: list[str],
                   probs_uncalibrated: np.ndarray | None = None) -> dict:
    """All headline metrics of one set of predictions; JSON-ready."""
    y = np.asarray(labels, dtype=np.int64)
    k = len(classes)
    ks = list(range(k))
    n = len(y)
    if n == 0:
        return {"n": 0}
    pred = probs.argmax(axis=1)
    prec, rec, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=ks, zero_division=0)
    out = {
        **summary(classes, prec, rec, f1, support, int((pred == y).sum())),
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=ks).tolist(),
        "roc_auc_ovr": roc_auc_ovr(y, probs, classes),
        "log_loss": float(skm.log_loss(y, probs, labels=ks)),
        "brier": brier(y, probs),
        "ece": ece(probs, y, ECE_BINS),
    }
    if probs_uncalibrated is not None:
        out["ece_uncalibrated"] = ece(probs_uncalibrated, y, ECE_BINS)
        out["log_loss_uncalibrated"] = float(skm.log_loss(y, probs_uncalibrated, labels=ks))
        out["brier_uncalibrated"] = brier(y, probs_uncalibrated)
    return out


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of sum_k (p_k - 1[y=k])^2, in [0, 2]
    (scale_by_half=False: sklearn would otherwise halve it for two classes only)."""
    return float(skm.brier_score_loss(labels, probs, labels=list(range(probs.shape[1])),
                                      scale_by_half=False))


def roc_auc_ovr(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """One-vs-rest AUC per class; None where a class is absent or alone (AUC undefined),
    and the macro mean over the defined ones."""
    per = {}
    for i, c in enumerate(classes):
        pos = labels == i
        per[c] = float(skm.roc_auc_score(pos, probs[:, i])) if 0 < pos.sum() < len(labels) else None
    defined = [v for v in per.values() if v is not None]
    return {"per_class": per, "macro": float(np.mean(defined)) if defined else None}


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict:
    """Selective prediction: keep the most confident first; after each image, the share
    kept (coverage) and the error rate among those kept (risk). AURC is the mean risk."""
    order = np.argsort(-confidence, kind="stable")
    c = np.asarray(correct, dtype=np.float64)[order]
    n = len(c)
    if n == 0:
        return {"coverage": [], "risk": [], "aurc": None}
    kept = np.arange(1, n + 1)
    risk = np.cumsum(1 - c) / kept
    return {"coverage": (kept / n).tolist(), "risk": risk.tolist(), "aurc": float(risk.mean())}


def at_threshold(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> dict:
    """Predictions with confidence < threshold are referred, not hidden: their count, and
    the accuracy on the rest (the coverage this threshold gives)."""
    keep = confidence >= threshold
    n = len(confidence)
    return {"threshold": float(threshold), "covered": int(keep.sum()), "referred": int(n - keep.sum()),
            "coverage": float(keep.mean()) if n else 0.0,
            "accuracy_covered": float(np.asarray(correct)[keep].mean()) if keep.any() else None,
            "accuracy_all": float(np.mean(correct)) if n else None}


def selective(confidence: np.ndarray, correct: np.ndarray, abstain_below: float | None) -> dict:
    out = {"table": [at_threshold(confidence, correct, t) for t in THRESHOLDS],
           "aurc": risk_coverage(confidence, correct)["aurc"]}
    if abstain_below is not None:
        out["chosen"] = at_threshold(confidence, correct, abstain_below)
    return out
