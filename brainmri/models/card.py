"""The model card: what a published model is for, what it must not be used for, the data it
saw, how it measured, and where it is weak. Written into `metadata.json` (`card`) when a model
is published, and shown at the top of every evaluation report with that evaluation's figures.
"""

from __future__ import annotations

from ..core import metrics as M
from ..core.storage import open_location

INTENDED_USE = (
    "Research and decision support: classifying single 2-D brain MRI slices, exported as "
    "JPEG/PNG images, into the classes listed, for teams that evaluate it against their own "
    "scans first. Every prediction is a suggestion for a radiologist to confirm.")
NOT_FOR = [
    "Not a diagnostic device: never the basis of a diagnosis or a treatment decision on its own.",
    "When it abstains (confidence below the abstain threshold), refer the scan to a radiologist; "
    "do not read the suggested class.",
    "Not for other body parts, other imaging modalities, 3-D volumes as a whole, or tumour "
    "types outside its classes (it will still name one of its classes).",
    "Not validated on scanners, sequences, export tools or populations unlike its training data; "
    "measure on your own data (brainmri evaluate) before relying on it.",
]
LEAKAGE_CAVEAT = (
    "Validation and test rows were split by duplicate group (exact and near duplicates never "
    "straddle splits), so those figures are not inflated by copies of training images. Other "
    "datasets may contain near copies of its training images: evaluation reports the figures "
    "with and without them.")


def _data_record(dataset: dict) -> dict:
    """What the model's training dataset was, from its manifest (when it can be read)."""
    rec = {k: dataset.get(k) for k in ("name", "version", "uri", "manifest_hash")}
    try:
        from ..data.datasets import load_manifest

        man = load_manifest(open_location(dataset["uri"]))
    except Exception:  # noqa: BLE001 -- a model fitted outside a dataset version: say so
        rec["note"] = "training dataset manifest not readable at publishing time"
        return rec
    dup = man.get("duplicates", {})
    rec.update(counts=man.get("counts"), rows=man.get("rows"), files=man.get("files"),
               exact_duplicates_dropped=dup.get("exact_files_dropped"),
               near_duplicate_groups=dup.get("groups_with_several_images"),
               label_conflicts=len(man.get("label_conflicts", [])),
               rejected_by_reason=man.get("rejected_by_reason"))
    return rec


def weaknesses(m: dict, classes: list[str], prefix: str = "") -> list[dict]:
    """Per-class recall and precision, weakest recall first (where the model misses most)."""
    rows = [{"class": c, "recall": M.class_metric(m, "recall", c, prefix),
             "precision": M.class_metric(m, "precision", c, prefix)} for c in classes]
    return sorted((r for r in rows if r["recall"] is not None), key=lambda r: r["recall"])


def model_card(state: dict, metrics: dict) -> dict:
    """The card of a model version: state is its checkpoint dict, metrics its best
    validation epoch (training-history keys, val_ prefixed)."""
    classes = list(state["classes"])
    return {
        "intended_use": INTENDED_USE,
        "not_for": NOT_FOR,
        "classes": classes,
        "input": state.get("preprocess"),
        "decision": state.get("inference"),
        "training_data": _data_record(state.get("dataset") or {}),
        "performance": {
            "measured_on": "validation split of the training dataset (" + (
                f"the average of {len(state['ensemble']['members'])} trained models, each with the "
                "weights it was published or checkpointed with)" if state.get("ensemble") else
                "the best epoch)"),
            "accuracy": metrics.get("val_accuracy"), "macro_f1": metrics.get("val_macro_f1"),
            "n": metrics.get("val_n"), "leakage": LEAKAGE_CAVEAT},
        "known_weaknesses": weaknesses(metrics, classes, "val_"),
        **({"distilled_from": _teacher_line(state["distillation"])} if state.get("distillation") else {}),
    }


def _teacher_line(rec: dict) -> str:
    what = f"an ensemble of {rec['members']}" if rec.get("members", 1) > 1 else f"a {rec.get('model')}"
    return (f"{what} (validation macro-F1 {rec.get('best_val_macro_f1', 0):.4f}, sha256 "
            f"{str(rec.get('sha256'))[:12]}), weight {rec.get('weight')}, "
            f"temperature {rec.get('temperature')}")
