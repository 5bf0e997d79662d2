"""`brainmri predict PATHS... --model M`: class probabilities for a handful of images.

Plain batched inference in this process (no Ray: starting a cluster would cost more than
predicting a few files), on the eager network or, with `runtime`, on one of the model's
exports (TorchScript, ONNX Runtime): the same preprocessing and decisions either way.
Every input gets exactly one output row, in input order; a file that cannot be read or
fails ingest's checks gets an error row with the reason and the rest still run.
Probabilities are temperature scaled when the model has a calibration.json.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError, PredictConfig
from ..core.storage import StorageError, open_location
from ..data import images as im
from ..data.transforms import preprocess_many
from ..data.walk import is_hidden
from .calibration import load_calibration
from .inference import REFER, forward_logits, load_network, open_model, read_limited, softmax
from .sources import default_limits

NOT_FOUND = "not_found"
INVALID_URI = "invalid_uri"


@dataclass
class Row:
    path: str
    ok: bool = False
    label: str = ""
    confidence: float | None = None
    probabilities: dict = field(default_factory=dict)
    abstained: bool = False
    advice: str = ""
    error: str = ""  # a rejection reason from images.py, or not_found / invalid_uri
    detail: str = ""
    frame: int | None = None  # a DICOM slice: its frame index (a file gives one row per frame)


def expand(paths: list[str]) -> list[tuple[str, object]]:
    """Inputs -> (display path, Location or an error Row) in order. A folder contributes its
    files sorted, skipping hidden/system files (ingest never takes them either)."""
    out: list[tuple[str, object]] = []
    for p in paths:
        try:
            loc = open_location(p)
        except StorageError as e:
            out.append((p, Row(p, error=INVALID_URI, detail=str(e))))
            continue
        if loc.is_file():
            out.append((p, loc))
        elif loc.exists():
            for f in loc.files():
                rel = f.path[len(loc.path):].lstrip("/")
                if not is_hidden(rel.split("/")):
                    out.append((f.uri, f))
        else:
            out.append((p, Row(p, error=NOT_FOUND, detail="no such file, folder or object")))
    return out


class Predictor:
    """A loaded model plus its temperature; `predict` takes (path, bytes) pairs."""

    def __init__(self, model_uri: str, abstain_below: float | None = None, device: str = "cpu",
                 runtime: str = "torch"):
        if abstain_below is not None and not 0.0 <= abstain_below <= 1.0:
            raise ConfigError("--abstain-below must be a probability in [0, 1]")
        self.ref = open_model(model_uri)
        self.model = load_network(*self.ref.runtime_file(runtime), device, runtime)
        self.runtime = runtime
        cal = load_calibration(self.ref)
        self.temperature = float(cal["temperature"]) if cal else 1.0
        self.calibrated = cal is not None
        self.abstain_below, self.device = abstain_below, device
        self.limits = default_limits()

    def predict(self, items: list[tuple[str, bytes]]) -> list[Row]:
        """One row per image, per DICOM slice, or per rejected file, in input order."""
        rows, good, blobs = [], [], []
        for path, data in items:
            try:
                scans = im.inspect_scans(data, self.limits)  # ingest's rules, before the decoder
            except im.RejectedImage as e:
                rows.append(Row(path, error=e.reason, detail=e.detail[:300]))
                continue
            for s in scans:
                rows.append(Row(path, frame=s.frame if s.dicom is not None else None))
                good.append(rows[-1])
                blobs.append(s.image)
        if good:
            x = preprocess_many(blobs, self.ref.image_size)
            probs = softmax(forward_logits(self.model, x, self.device), self.temperature)
            for row, p in zip(good, probs, strict=True):
                self._fill(row, p)
        return rows

    def _fill(self, row: Row, p: np.ndarray) -> None:
        classes = self.ref.classes
        row.ok, row.label, row.confidence = True, classes[int(p.argmax())], float(p.max())
        row.probabilities = {c: float(v) for c, v in zip(classes, p, strict=True)}
        row.abstained = self.abstain_below is not None and row.confidence < self.abstain_below
        row.advice = REFER if row.abstained else ""

    def predict_paths(self, paths: list[str], batch_size: int = 32):
        """Yields one Row per input file, in order, `batch_size` images in memory at most."""
        pending: list[tuple[str, bytes]] = []
        for path, what in expand(paths):
            if isinstance(what, Row):
                yield from self.predict(pending)
                pending = []
                yield what
                continue
            try:
                pending.append((path, read_limited(what, self.limits)))
            except OSError as e:
                yield from self.predict(pending)
                pending = []
                yield Row(path, error=im.UNREADABLE, detail=(e.strerror or str(e))[:300])
                continue
            if len(pending) >= batch_size:
                yield from self.predict(pending)
                pending = []
        yield from self.predict(pending)


# -- output -------------------------------------------------------------------------------------
def row_fields(row: Row) -> dict:
    """What a prediction says, as plain values: one JSON line here, one HTTP answer in
    brainmri.serving."""
    d = {"path": row.path, "ok": row.ok}
    if row.frame is not None:
        d["frame"] = row.frame
    if row.ok:
        d.update({"class": row.label, "confidence": row.confidence,
                  "probabilities": row.probabilities, "abstained": row.abstained,
                  "advice": row.advice})
    else:
        d.update({"error": row.error, "detail": row.detail})
    return d


def to_json(row: Row) -> str:
    return json.dumps(row_fields(row))


def csv_header(classes: list[str]) -> list[str]:
    return ["path", "ok", "class", "confidence", *[f"prob_{c}" for c in classes], "abstained",
            "advice", "error", "detail", "frame"]


def csv_row(row: Row, classes: list[str]) -> list:
    probs = [row.probabilities.get(c, "") for c in classes]
    return [row.path, row.ok, row.label, "" if row.confidence is None else row.confidence, *probs,
            row.abstained if row.ok else "", row.advice, row.error, row.detail,
            "" if row.frame is None else row.frame]


def run(paths: list[str], cfg: PredictConfig, stream=None) -> int:
    """The CLI's work: write rows to cfg.output (a path or URI, written atomically at the end)
    or stream them to `stream` (stdout). Returns 0 if every input succeeded, else 1."""
    cfg.validate()
    stream = stream or sys.stdout
    output, fmt = cfg.output, cfg.format
    pred = Predictor(cfg.model, cfg.abstain_below, runtime=cfg.runtime)
    if not pred.calibrated:
        print(f"brainmri predict: note: model {pred.ref.name}/{pred.ref.version} has no "
              "calibration.json, probabilities are uncalibrated (see `brainmri calibrate`)",
              file=sys.stderr)
    buf = io.StringIO() if output else stream
    writer = csv.writer(buf) if fmt == "csv" else None
    if writer:
        writer.writerow(csv_header(pred.ref.classes))
    failed = 0
    for row in pred.predict_paths(paths, cfg.batch_size):
        failed += not row.ok
        if writer:
            writer.writerow(csv_row(row, pred.ref.classes))
        else:
            buf.write(to_json(row) + "\n")
        if not output:
            buf.flush()
    if output:
        open_location(output).write_bytes(buf.getvalue().encode())
    return 1 if failed else 0
