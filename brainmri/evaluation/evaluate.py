"""`brainmri evaluate`: a model on a dataset split or an image folder -> a report folder.

    OUT/reports/<model-name>-<model-version>/<data-id>/   (<data-id>-<runtime>/ off torch)
        figures/*.png          confusion, ROC, reliability, risk-coverage, mistakes, Grad-CAM, history
        predictions.parquet    one row per evaluated image
        rejects.csv            files refused by ingest's rules, with the reason
        metrics.json           every number in the report
        report.html            one self-contained page
        complete.json          written last: a folder without it is a partial report

Inference is a Ray Data pipeline: a stage reads, validates and preprocesses (Ray may fuse it
into the actors; with --gpu it stays in CPU tasks feeding them), then an actor pool
(`concurrency` actors, one GPU each with --gpu: channels-last, fp32) loads the
pinned weights once per actor and returns logits. With `runtime` torchscript or onnx, the
actors (and the in-process temperature fit) run the model's export instead, its sha256
checked against metadata.json; Grad-CAM needs gradients and always uses the eager network.
Everything after that runs on the driver over per-image arrays, which are small (K floats an
image): temperature scaling (fitted on the training dataset's val split in-process when the
model has no calibration.json), metrics, the leakage check, figures.
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ..config import EvaluateConfig
from ..core.cluster import init_ray
from ..core.storage import Location, check_name, open_location
from . import figures, leakage, scoring
from .calibration import calibration_record, load_calibration, reliability, val_logits
from .inference import (
    REFER,
    LogitsActor,
    ModelRef,
    actor_resources,
    load_network,
    open_model,
    preprocess_many,
    softmax,
)
from .sources import Source, open_source, to_ray_dataset

COMPLETE = "complete.json"
PREDICTIONS = "predictions.parquet"
OUTPUT_COLUMNS = ("path", "label", "sha256", "phash", "reason", "detail", "logits", "dicom", "frame")


@dataclass
class Outputs:
    """Per-file results of one pass, sorted by path."""

    path: np.ndarray
    label: np.ndarray
    sha256: np.ndarray
    phash: np.ndarray
    reason: np.ndarray
    detail: np.ndarray
    logits: np.ndarray
    dicom: np.ndarray  # a DICOM file's row: its path was made a pseudonym (Source.pseudonymise)
    frame: np.ndarray

    def select(self, mask: np.ndarray) -> "Outputs":
        return Outputs(*(getattr(self, c)[mask] for c in OUTPUT_COLUMNS))


def inference_dataset(src: Source, ref: ModelRef, batch_size: int, gpu: bool, concurrency: int,
                      runtime: str = "torch"):
    """The lazy Ray Dataset of per-file results (NaN logits for rejected files)."""
    import ray.data

    uri, sha = ref.runtime_file(runtime)
    return to_ray_dataset(src, ref.image_size, batch_size).map_batches(
        LogitsActor, fn_constructor_kwargs={"weights_uri": uri, "sha256": sha, "runtime": runtime,
                                            "num_classes": len(ref.classes), "gpu": gpu},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),  # `concurrency=` is deprecated
        **actor_resources(gpu))


def run_inference(src: Source, ref: ModelRef, batch_size: int, gpu: bool, concurrency: int,
                  runtime: str = "torch") -> Outputs:
    """Runs the pipeline and gathers its (small) per-file columns on the driver."""
    ds = inference_dataset(src, ref, batch_size, gpu, concurrency, runtime)
    cols: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
    with tqdm(total=src.count, desc="evaluate", unit="img", disable=None) as bar:  # terminals only
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for c in OUTPUT_COLUMNS:
                cols[c].append(b[c])
            bar.update(len(b["path"]))
    arr = {c: np.concatenate(v) for c, v in cols.items()}
    arr["path"] = src.pseudonymise(arr["path"], arr["dicom"], arr["frame"])  # before any write
    order = np.argsort(arr["path"].astype(str), kind="stable")  # stable report order
    return Outputs(*(np.asarray(arr[c])[order] for c in OUTPUT_COLUMNS))


# -- calibration and leakage ---------------------------------------------------------------------
def temperature_for(ref: ModelRef, batch_size: int, runtime: str = "torch") -> dict:
    """calibration.json if present for these weights; else fit on the training dataset's
    val split now, in this process (the val split is small; the same code as `brainmri
    calibrate`). Reported, not saved: `brainmri calibrate` is the explicit way to save."""
    rec = load_calibration(ref)
    keys = ("n", "nll_before", "nll_after", "ece_before", "ece_after")
    if rec:
        return {"temperature": rec["temperature"], "source": f"from {ref.calibration_file.uri}",
                "fit": {k: rec[k] for k in keys}}
    try:
        logits, labels = val_logits(ref, batch_size, runtime)
        rec = calibration_record(ref, logits, labels)
    except Exception as e:  # no val split reachable: report uncalibrated, and say why
        return {"temperature": 1.0, "source": f"uncalibrated: {type(e).__name__}: {e}", "fit": None}
    return {"temperature": rec["temperature"],
            "source": f"fitted now on the val split of {ref.state['dataset']['uri']} (not saved)",
            "fit": {k: rec[k] for k in keys}}


def leakage_for(ref: ModelRef, src: Source, out: Outputs, near_distance: int) -> dict:
    ds_uri = (ref.state.get("dataset") or {}).get("uri")
    if not ds_uri:
        return {"available": False, "error": "the model does not record its training dataset"}
    # evaluating the training dataset's own val (or train) split: compare with the others
    splits = [s for s in ("train", "val") if not (src.dataset_uri == ds_uri and src.split == s)]
    try:
        res = leakage.flag(list(out.sha256), out.phash, ds_uri, splits, near_distance)
    except Exception as e:
        return {"available": False, "error": f"{type(e).__name__}: {e}"}
    return {"available": True, **res["summary"], "_exact": res["exact"], "_near": res["near"]}


# -- figures ---------------------------------------------------------------------------------------
def make_figures(ref: ModelRef, src: Source, ok: Outputs, probs, probs_raw, m: dict,
                 cal: dict, n_mistakes: int, cam_per_class: int) -> dict:
    """name -> PNG bytes (None where there is nothing to draw)."""
    y = ok.label
    figs = {"history": figures.history(ref.history)}
    if len(y) == 0:
        return figs
    allm = m["metrics"]["all"]
    rc = scoring.risk_coverage(probs.max(1), probs.argmax(1) == y)
    figs["confusion"] = figures.confusion(allm["confusion_matrix"], ref.classes)
    figs["roc"] = figures.roc(y, probs, ref.classes, allm["roc_auc_ovr"])
    figs["reliability"] = figures.reliability(reliability(probs_raw, y), reliability(probs, y),
                                              cal["temperature"])
    figs["risk_coverage"] = figures.risk_coverage(rc, m["selective"].get("chosen"))
    figs.update(image_figures(ref, src, ok, probs, n_mistakes, cam_per_class))
    return figs


def image_figures(ref: ModelRef, src: Source, ok: Outputs, probs, n_mistakes: int,
                  cam_per_class: int) -> dict:
    """The most confident mistakes, and Grad-CAM for the first images (by path) of each true
    class. Only these few images are read again, so the pipeline never ships pixels back."""
    classes, y = ref.classes, ok.label
    pred, conf = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(pred != y)
    mistakes = list(wrong[np.argsort(-conf[wrong], kind="stable")][:n_mistakes])
    cams = [int(i) for c in range(len(classes)) for i in np.flatnonzero(y == c)[:cam_per_class]]
    blobs = src.read_bytes([ok.path[i] for i in mistakes + cams])
    x = {i: preprocess_many([blobs[ok.path[i]]], ref.image_size)[0]
         for i in mistakes + cams if ok.path[i] in blobs}
    mistakes, cams = [i for i in mistakes if i in x], [i for i in cams if i in x]

    def caption(i):
        return f"true {classes[y[i]]}\npred {classes[pred[i]]} ({conf[i]:.2f})"

    out = {"mistakes": figures.gallery([x[i] for i in mistakes], [caption(i) for i in mistakes],
                                       f"{len(mistakes)} most confident mistakes")}
    model = load_network(ref.weights.uri, ref.sha256)
    empty = np.zeros((0, ref.image_size, ref.image_size), np.uint8)
    stack = np.stack([x[i] for i in cams]) if cams else empty
    overlays = figures.gradcam_overlays(model, stack, [int(pred[i]) for i in cams])
    images, caps = [], []
    for i, ov in zip(cams, overlays, strict=False):
        images += [x[i], ov]
        caps += [f"{classes[y[i]]}: input", caption(i)]
    out["gradcam"] = figures.gallery(images, caps, f"Grad-CAM, {cam_per_class} per true class")
    return out


# -- writing ----------------------------------------------------------------------------------------
def predictions_table(ok: Outputs, probs, classes, abstained, dup) -> bytes:
    pred = probs.argmax(1)
    cols = {"path": pa.array(list(ok.path), pa.string()),
            "true_label": pa.array([classes[i] for i in ok.label], pa.string()),
            "true_index": pa.array(ok.label, pa.int16())}
    for j, c in enumerate(classes):
        cols[f"prob_{c}"] = pa.array(probs[:, j], pa.float64())
    cols.update(predicted_label=pa.array([classes[i] for i in pred], pa.string()),
                confidence=pa.array(probs.max(1), pa.float64()),
                abstained=pa.array(abstained, pa.bool_()),
                advice=pa.array([REFER if a else "" for a in abstained], pa.string()),
                training_duplicate=pa.array(dup, pa.string()),
                sha256=pa.array(list(ok.sha256), pa.string()))
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="zstd")
    return buf.getvalue()


def rejects_csv(rows: list[tuple[str, str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason", "detail"])
    w.writerows(rows)
    return buf.getvalue().encode()


def report_folder(out: str, ref: ModelRef, src: Source, runtime: str = "torch") -> Location:
    """An export's report goes beside the eager one, never over it."""
    root = open_location(out, check=True)
    data_id = src.data_id if runtime == "torch" else f"{src.data_id}-{runtime}"
    return root / "reports" / check_name(f"{ref.name}-{ref.version}", "report name") / \
        check_name(data_id, "data id")


@dataclass
class EvalResult:
    report_uri: str
    metrics: dict
    seconds: float


def evaluate(cfg: EvaluateConfig) -> EvalResult:
    """Evaluate cfg.model on cfg.data and write the report under cfg.out (see the module
    docstring). Side effects: the report folder, and a local Ray cluster if none is running."""
    t0 = time.time()
    cfg.validate()  # the rules live with the options, whoever calls this
    model, data, out, split, runtime = cfg.model, cfg.data, cfg.out, cfg.split, cfg.runtime
    batch_size, abstain_below, near_dup_distance = cfg.batch_size, cfg.abstain_below, cfg.near_dup_distance
    ref = open_model(model)  # fail fast: model, export, data and output before any Ray work
    ref.runtime_file(runtime)
    src = open_source(data, ref.classes, split)
    dest = report_folder(out, ref, src, runtime)
    (dest / COMPLETE).delete()  # a rerun that dies midway must not look complete
    init_ray()

    run = {"batch_size": batch_size, "gpu": cfg.gpu, "concurrency": cfg.concurrency, "runtime": runtime}
    res = run_inference(src, ref, **run)
    good = np.asarray([r == "" for r in res.reason], dtype=bool)
    ok = res.select(good)
    failed = zip(res.path[~good], res.reason[~good], res.detail[~good], strict=False)
    rejects = sorted(src.walk_rejects + list(failed))
    cal = temperature_for(ref, batch_size, runtime)
    probs_raw, probs = softmax(ok.logits), softmax(ok.logits, cal["temperature"])
    leak = leakage_for(ref, src, ok, near_dup_distance)
    m = summarise(ref, src, ok, rejects, probs, probs_raw, cal, leak, abstain_below, runtime,
                  near_dup_distance)
    m["settings"] = {"split": split if src.kind == "dataset" else None, **run,
                     "near_dup_distance": near_dup_distance}

    figs = make_figures(ref, src, ok, probs, probs_raw, m, cal, cfg.n_mistakes, cfg.cam_per_class)
    abstained = probs.max(1) < abstain_below if abstain_below is not None else np.zeros(len(probs), bool)
    dup = np.full(len(ok.label), "", dtype=object)
    if leak.get("available"):
        dup[leak["_near"]], dup[leak["_exact"]] = "near", "exact"
    write_report(dest, m, figs, ref, predictions_table(ok, probs, ref.classes, abstained, dup),
                 rejects_csv(rejects))
    return EvalResult(dest.uri, m, time.time() - t0)


def runtime_record(ref: ModelRef, runtime: str) -> dict:
    uri, sha = ref.runtime_file(runtime)
    return {"runtime": runtime, "file": uri, "sha256": sha}


def summarise(ref: ModelRef, src: Source, ok: Outputs, rejects: list, probs, probs_raw,
              cal: dict, leak: dict, abstain_below: float | None, runtime: str = "torch",
              near_dup_distance: int = EvaluateConfig.near_dup_distance) -> dict:
    """Everything metrics.json holds (and the report shows)."""
    metrics = {"all": scoring.classification(ok.label, probs, ref.classes, probs_raw)}
    # how far the figures could move on another draw of scans like these (near copies of one
    # scan resampled together)
    metrics["all"]["interval"] = scoring.intervals(
        ok.label, probs.argmax(1), ref.classes, scoring.near_copy_clusters(ok.phash, near_dup_distance))
    if leak.get("available"):  # the same metrics without images (nearly) seen in training
        keep = ~(leak["_exact"] | leak["_near"])
        metrics["without_training_duplicates"] = scoring.classification(
            ok.label[keep], probs[keep], ref.classes, probs_raw[keep])
    by_reason = Counter(r for _, r, _ in rejects)
    return {
        "format": "brainmri.evaluation/1",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_id": src.data_id, "data": src.describe,
        "model": {"name": ref.name, "version": ref.version, "weights": ref.weights.uri,
                  "sha256": ref.sha256, "classes": ref.classes, "image_size": ref.image_size,
                  "params": ref.state.get("params"), "training_dataset": ref.state.get("dataset"),
                  "best_validation": ref.metadata.get("metrics"),
                  "decision": ref.state.get("inference"),  # flips, logit bias: what was applied
                  "card": ref.metadata.get("card"),
                  "created_at": ref.metadata.get("created_at"),
                  "runtime": runtime_record(ref, runtime)},
        "counts": {"files": len(ok.label) + len(rejects), "evaluated": int(len(ok.label)),
                   "rejected": len(rejects), "rejected_by_reason": dict(sorted(by_reason.items()))},
        "calibration": cal,
        "leakage": {k: v for k, v in leak.items() if not k.startswith("_")},
        "metrics": metrics,
        "selective": scoring.selective(probs.max(1), probs.argmax(1) == ok.label, abstain_below),
        "abstain_below": abstain_below,
    }


def write_report(dest: Location, m: dict, figs: dict, ref: ModelRef, predictions: bytes,
                 rejects: bytes) -> None:
    """All through Location's atomic writes; the order makes a partial report recognisable."""
    from .report import render

    names = []
    for name, png in figs.items():
        if png:
            (dest / "figures" / f"{name}.png").write_bytes(png)
            names.append(f"figures/{name}.png")
    (dest / PREDICTIONS).write_bytes(predictions)
    (dest / "rejects.csv").write_bytes(rejects)
    (dest / "metrics.json").write_json(m)
    config = {"config": ref.state.get("config"), "dataset": ref.state.get("dataset"),
              "preprocess": ref.state.get("preprocess"), "versions": ref.state.get("versions")}
    (dest / "report.html").write_bytes(render(m, figs, config).encode())
    (dest / COMPLETE).write_json({"complete": True, "created_at": m["created_at"], "files": names + [
        PREDICTIONS, "rejects.csv", "metrics.json", "report.html"]})
