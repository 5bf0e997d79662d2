"""How a trained network's logits become a decision, in one place: test-time flips, and a
per-class logit bias chosen on validation (a decision rule that trades a little precision of
the other classes for glioma recall, the costly miss).

Both travel with the model: `make_checkpoint` records them under "inference", and
`checkpoints.build_model` wraps the network in `InferenceNet`, so evaluate, predict, serving
and the TorchScript/ONNX exports all apply exactly the same rule -- nobody re-implements it.
Training's own validation runs the network with its flips (engine.evaluate's `tta`), so the
best epoch is the best served network; the bias is chosen after training, on that checkpoint,
and kept only if choosing it on half the validation images does not cost accuracy on the
other half (a bias fitted to the images it is judged on always looks free).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..core import metrics as M

BIAS_GRID = np.round(np.arange(0.0, 3.0001, 0.05), 4)  # logit offsets tried for the target class


class InferenceNet(nn.Module):
    """net(x) [+ net(flipped x)] / 2 + bias: what every consumer of a published model runs."""

    def __init__(self, net: nn.Module, tta: bool = False, logit_bias: list[float] | None = None):
        super().__init__()
        self.net, self.tta = net, bool(tta)
        k = len(logit_bias) if logit_bias else 0
        # a buffer, not a parameter: it is part of the exported graph and of .to(device)
        self.register_buffer("logit_bias", torch.tensor(logit_bias or [], dtype=torch.float32),
                             persistent=False)
        self._k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.tta:  # left-right flip: brains are near-symmetric, tumours are not side-specific
            out = (out + self.net(torch.flip(x, dims=[3]))) / 2
        if self._k:
            out = out + self.logit_bias.to(out.dtype)
        return out


def inference_record(tta: bool, logit_bias: list[float] | None = None, chosen: dict | None = None) -> dict:
    """What a checkpoint says about its decision (checkpoints.make_checkpoint's "inference")."""
    return {"tta": bool(tta), "logit_bias": list(logit_bias) if logit_bias and any(logit_bias) else None,
            "decision": chosen}


def wrap(net: nn.Module, record: dict | None) -> nn.Module:
    """The bare network when the record asks for nothing, else InferenceNet."""
    if not record or (not record.get("tta") and not record.get("logit_bias")):
        return net
    return InferenceNet(net, record.get("tta", False), record.get("logit_bias"))


def _predictions(logits: np.ndarray, t: int) -> np.ndarray:
    """argmax under every bias of BIAS_GRID on `t`'s logit: (len(BIAS_GRID), n), computed once
    and indexed by the half-split check rather than recomputed per halving."""
    shift = np.zeros(logits.shape[1])
    shift[t] = 1.0
    return np.stack([(logits + b * shift).argmax(1) for b in BIAS_GRID])


def _scores(preds: np.ndarray, labels: np.ndarray, classes: list[str], t: int) -> list[dict]:
    """Every bias of BIAS_GRID (rows of `preds`), scored: bias, macro-F1, accuracy, t's recall.
    One confusion matrix per bias, all scored at once by core.metrics.rates (the arithmetic
    from_confusion uses), not 61 calls for each of the ~400 halves the check scores."""
    k, g = len(classes), len(preds)
    cells = (np.arange(g)[:, None] * k + np.asarray(labels)[None, :]) * k + preds
    cm = np.bincount(cells.ravel(), minlength=g * k * k).reshape(g, k, k)
    tp, support, _, recall, f1 = M.rates(cm)
    n = support.sum(1)
    accuracy = np.where(n > 0, tp.sum(1) / np.maximum(n, 1), 0.0)
    return [{"bias": float(b), "macro_f1": float(f), "accuracy": float(a), "recall": float(r)}
            for b, f, a, r in zip(BIAS_GRID, f1.mean(1), accuracy, recall[:, t], strict=True)]


def _best(scores: list[dict], max_macro_f1_drop: float) -> dict:
    """The smallest bias reaching the highest recall among those within the F1 allowance
    (scores[0] is the unbiased rule, always allowed)."""
    ok = [s for s in scores if s["macro_f1"] >= scores[0]["macro_f1"] - max_macro_f1_drop]
    return max(ok, key=lambda s: (s["recall"], -s["bias"]))


def _stratified_halves(labels: np.ndarray, rng: np.random.Generator,
                       groups: np.ndarray | None = None) -> np.ndarray:
    """A boolean mask picking about half of each class's rows at random: whole duplicate
    groups when `groups` is given (a group's rows are near copies of one scan; split apart,
    one half would be judged on copies of the images the other half chose on), each group
    stratified by its most common label (a group may hold conflicting labels), else rows."""
    mask = np.zeros(len(labels), dtype=bool)
    if groups is None:
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            mask[rng.permutation(rows)[: len(rows) // 2]] = True
        return mask
    names, gid = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(names), int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (gid, labels), 1)
    majority, size = counts.argmax(1), counts.sum(1)
    chosen = np.zeros(len(names), dtype=bool)
    for c in np.unique(majority):
        these = np.flatnonzero(majority == c)
        half, taken = size[these].sum() / 2, 0
        for g in rng.permutation(these):
            if taken >= half:
                break
            chosen[g], taken = True, taken + size[g]
    return chosen[gid]


def choose_logit_bias(logits: np.ndarray, labels: np.ndarray, classes: list[str], target: str = "glioma",
                      max_macro_f1_drop: float = 0.005, max_accuracy_cost: float = 0.0,
                      splits: int = 100, seed: int = 0, groups: np.ndarray | None = None
                      ) -> tuple[list[float], dict]:
    """The smallest bias on `target`'s logit that maximises its recall while macro-F1 stays
    within `max_macro_f1_drop` of the unbiased rule, on the given (validation) logits -- adopted
    only if the same choice, made on one half of those images, does not cost more than
    `max_accuracy_cost` accuracy on the other half (mean over `splits` stratified halvings,
    each scored both ways; with `groups`, each row's duplicate group, the halves keep groups
    whole). The check is there because a bias fitted to the images it is
    scored on looks free: on a model whose validation accuracy is near 1.0 the chosen bias is
    large, and on new images, where the model is less sure, it moves far more of them.
    -> (bias per class, all zero when not adopted; a record of the choice and its check)."""
    if target not in classes:
        raise ValueError(f"target class {target!r} is not one of {classes}")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} rows for {len(labels)} labels")
    t, k = classes.index(target), len(classes)
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    preds = _predictions(logits, t)
    full = _scores(preds, labels, classes, t)
    base, best = full[0], _best(full, max_macro_f1_drop)

    rng, d_acc, d_rec = np.random.default_rng(seed), [], []
    for _ in range(splits if best["bias"] > 0 else 0):
        half = _stratified_halves(labels, rng, groups)
        for fit, held in ((half, ~half), (~half, half)):
            b = _best(_scores(preds[:, fit], labels[fit], classes, t), max_macro_f1_drop)["bias"]
            scored = {s["bias"]: s for s in _scores(preds[:, held], labels[held], classes, t)}
            d_acc.append(scored[b]["accuracy"] - scored[0.0]["accuracy"])
            d_rec.append(scored[b]["recall"] - scored[0.0]["recall"])
    check = {"splits": splits if d_acc else 0, "max_accuracy_cost": max_accuracy_cost,  # 0: nothing to check
             "halves": "images" if groups is None else "duplicate groups",
             "accuracy_change": float(np.mean(d_acc)) if d_acc else 0.0,
             "recall_change": float(np.mean(d_rec)) if d_rec else 0.0}
    adopted = best["bias"] > 0 and check["accuracy_change"] >= -max_accuracy_cost
    chosen = best if adopted else base
    bias = [0.0] * k
    bias[t] = chosen["bias"]
    return bias, {"rule": f"logit bias on {target}", "target": target, "chosen_on": "val",
                  "n": int(len(labels)), "max_macro_f1_drop": max_macro_f1_drop,
                  "before": base, "after": chosen, "fitted": best, "held_out": check,
                  "adopted": bool(adopted)}
