"""Evaluation metrics from labels and class probabilities (scikit-learn where it has them).

Training's `core/metrics.py` works from an all-reduced confusion matrix; evaluation has every
prediction in memory, so it also scores the probabilities: ROC-AUC, log loss, Brier score
and calibration error, plus selective prediction (accuracy when the model may abstain).
The classification metrics use the one schema of `core/metrics.py` (`summary`).
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from ..core import metrics as M
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


def near_copy_clusters(phash: np.ndarray, max_distance: int) -> np.ndarray:
    """A cluster id per image: images whose pHashes lie within `max_distance` bits of each
    other (transitively) share one -- the evaluated set's own near copies of one scan."""
    from ..data.dedup import UnionFind, as_u64, hamming_pairs

    n = len(phash)
    uf = UnionFind(n)
    for ii, jj in hamming_pairs(as_u64(phash), max_distance):
        for a, b in zip(ii.tolist(), jj.tolist(), strict=True):
            uf.union(a, b)
    return np.asarray([uf.find(i) for i in range(n)], dtype=np.int64)


def intervals(labels: np.ndarray, pred: np.ndarray, classes: list[str], clusters: np.ndarray | None = None,
              resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap intervals of accuracy, macro-F1 and each class's recall. Whole
    clusters are resampled (`clusters`: near_copy_clusters), since copies of one scan are
    one observation, not several: resampling images would make the interval too narrow.
    Seeded, so a report is reproducible."""
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    k, n = len(classes), len(y)
    if n == 0:
        return {}
    ids = np.unique(clusters if clusters is not None else np.arange(n), return_inverse=True)[1]
    n_clusters = int(ids.max()) + 1
    cell = y * k + p
    rng = np.random.default_rng(seed)
    keys = ["accuracy", "macro_f1"] + [M.key("recall", c) for c in classes]
    draws = {key: [] for key in keys}
    for _ in range(resamples):
        weight = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)[ids]
        cm = np.bincount(cell, weights=weight, minlength=k * k).reshape(k, k)
        m = M.from_confusion(cm, classes)
        draws["accuracy"].append(m["accuracy"])
        draws["macro_f1"].append(m["macro_f1"])
        for c, support in zip(classes, cm.sum(1), strict=True):
            if support:  # a resample without the class says nothing about its recall
                draws[M.key("recall", c)].append(m[M.key("recall", c)])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {key: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if v else None
           for key, v in draws.items()}
    return {"level": level, "resamples": resamples, "clusters": n_clusters, "images": n, **out}


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
