"""Confidence calibration: temperature scaling (Guo et al., 2017) and its bookkeeping.

A single scalar T divides the logits; it is fitted by LBFGS on the negative log-likelihood of
the model's *validation* split (the split that already chose the checkpoint, never the test
split), so accuracy is unchanged (argmax is invariant) while probabilities stop being over-
or under-confident. The result lives in `calibration.json` beside the weights, tied to them
by sha256: a re-trained model never inherits a stale temperature.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..config import ConfigError
from ..core.metrics import ECE_BINS, ece, nll, reliability  # noqa: F401 (re-exported)
from ..core.storage import open_location
from ..data.datasets import load_manifest, split_arrays
from .inference import ModelRef, forward_logits, load_network, open_model, softmax


def fit_temperature_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising NLL(softmax(logits / T), labels). Optimised over log T, so T
    stays positive without constraints; LBFGS converges in a handful of steps on a scalar."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    nll = torch.nn.CrossEntropyLoss()

    def closure():
        opt.zero_grad()
        loss = nll(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def summarise_fit(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    before, after = softmax(logits), softmax(logits, temperature)
    return {"temperature": temperature, "n": int(len(labels)),
            "nll_before": nll(before, labels), "nll_after": nll(after, labels),
            "ece_before": ece(before, labels), "ece_after": ece(after, labels)}


# -- calibration.json beside a model -----------------------------------------------------------
def load_calibration(ref: ModelRef) -> dict | None:
    """The model's calibration record, or None if absent or fitted for other weights."""
    f = ref.calibration_file
    if not f.exists():
        return None
    rec = f.read_json()
    return rec if rec.get("model_sha256") == ref.sha256 else None


def training_dataset(ref: ModelRef):
    """The model's training dataset version (Location, manifest), from its checkpoint."""
    uri = (ref.state.get("dataset") or {}).get("uri")
    if not uri:
        raise ConfigError("the model does not record its training dataset")
    loc = open_location(uri)
    return loc, load_manifest(loc)


def val_logits(ref: ModelRef, batch_size: int = 64, runtime: str = "torch") -> tuple[np.ndarray, np.ndarray]:
    """In-process logits of the training dataset's val split, one row group at a time, from
    the network `runtime` runs (evaluate fits its temperature on the runtime it evaluates)."""
    version, manifest = training_dataset(ref)
    model = load_network(*ref.runtime_file(runtime), runtime=runtime)
    logits, labels = [], []
    for x, y in split_arrays(version, manifest, "val", ref.image_size, batch_size=batch_size):
        logits.append(forward_logits(model, x))
        labels.append(y)
    k = len(ref.classes)
    return (np.concatenate(logits) if logits else np.zeros((0, k), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int64))


def calibration_record(ref: ModelRef, logits: np.ndarray, labels: np.ndarray) -> dict:
    t = fit_temperature_from_logits(logits, labels)
    rec = summarise_fit(logits, labels, t)
    ds = ref.state.get("dataset") or {}
    rec.update(format="brainmri.calibration/1", method="temperature scaling (LBFGS on NLL)",
               model_sha256=ref.sha256, model=f"{ref.name}/{ref.version}",
               fitted_on={"dataset": ds.get("uri"), "version": ds.get("version"), "split": "val"},
               created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return rec


def fit_temperature(model_uri: str, batch_size: int = 64) -> dict:
    """Fit T on the model's validation split and write calibration.json next to the model
    (atomically). Side effect: that one file. Returns the record written."""
    ref = open_model(model_uri)
    logits, labels = val_logits(ref, batch_size)
    if len(labels) == 0:
        raise ConfigError("the training dataset has no validation rows to calibrate on")
    rec = calibration_record(ref, logits, labels)
    ref.calibration_file.write_json(rec)
    rec["path"] = ref.calibration_file.uri
    return rec
