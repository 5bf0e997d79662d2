"""How a trained network's logits become a decision, in one place: test-time flips, and a
per-class logit bias chosen on validation (a decision rule that trades a little precision of
the other classes for glioma recall, the costly miss).

Both travel with the model: `make_checkpoint` records them under "inference", and
`checkpoints.build_model` wraps the network in `InferenceNet`, so evaluate, predict, serving
and the TorchScript/ONNX exports all apply exactly the same rule -- nobody re-implements it.
Training's own validation runs the network with its flips (engine.evaluate's `tta`), so the
best epoch is the best served network; the bias is chosen after training, on that checkpoint.
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
    return {"tta": bool(tta), "logit_bias": list(logit_bias) if logit_bias else None,
            "decision": chosen}


def wrap(net: nn.Module, record: dict | None) -> nn.Module:
    """The bare network when the record asks for nothing, else InferenceNet."""
    if not record or (not record.get("tta") and not record.get("logit_bias")):
        return net
    return InferenceNet(net, record.get("tta", False), record.get("logit_bias"))


def choose_logit_bias(logits: np.ndarray, labels: np.ndarray, classes: list[str], target: str = "glioma",
                      max_macro_f1_drop: float = 0.005) -> tuple[list[float], dict]:
    """The smallest bias on `target`'s logit that maximises its recall while macro-F1 stays
    within `max_macro_f1_drop` of the unbiased rule, on the given (validation) logits.
    -> (bias per class, a record of the choice with before/after metrics)."""
    if target not in classes:
        raise ValueError(f"target class {target!r} is not one of {classes}")
    t, k = classes.index(target), len(classes)
    labels = np.asarray(labels, dtype=np.int64)

    def score(b: float) -> dict:
        z = np.asarray(logits, dtype=np.float64).copy()
        z[:, t] += b
        cm = np.bincount(labels * k + z.argmax(1), minlength=k * k).reshape(k, k)
        m = M.from_confusion(cm, classes)
        return {"bias": float(b), "macro_f1": m["macro_f1"], "accuracy": m["accuracy"],
                "recall": M.class_metric(m, "recall", target)}

    base = score(0.0)
    ok = [s for s in map(score, BIAS_GRID) if s["macro_f1"] >= base["macro_f1"] - max_macro_f1_drop]
    best = max(ok, key=lambda s: (s["recall"], -s["bias"]))  # base is always in ok
    bias = [0.0] * k
    bias[t] = best["bias"]
    return bias, {"rule": f"logit bias on {target}", "target": target, "chosen_on": "val",
                  "n": int(len(labels)), "max_macro_f1_drop": max_macro_f1_drop,
                  "before": base, "after": best}
