"""Checkpoints and published model versions.

A checkpoint (`checkpoint.pt` in a Ray Train checkpoint folder) is self-sufficient: model
weights (unwrapped from DDP), optimizer and scheduler state, epoch, early-stopping state,
history, the resolved config, class names, preprocessing parameters, dataset version and
manifest hash, library versions. It holds only tensors and plain Python values so it loads
with `torch.load(weights_only=True)`: no pickle of arbitrary objects, ever. Its keys are
written in one place, `make_checkpoint`, and read by `load_state`, `build_model` and the
evaluation code.

A published model version is `models/<name>/<version>/model.pt` (weights + the same
metadata, no optimizer), its exports `model.torchscript.pt` and `model.onnx` (see
`export`: they load without this package), and `metadata.json`, written last: a folder
without metadata.json is incomplete and ignored. metadata.json records the sha256 of
model.pt and of each export, and the input contract (`interface`). Its `stage` is
"released" (`brainmri train`, tune's winner) or "candidate" (a retrain challenger, not yet
judged). What `models/<name>` means: the version `models/<name>/champion.json` names
(written by retrain when it promotes one), else the newest released version; never a
candidate.
"""

from __future__ import annotations

import hashlib
import io
import platform
import time
import warnings

import torch

from ..core.metrics import SELECTION_METRIC
from ..core.storage import Location, StorageError, check_name, open_location
from .export import EXPORT_FILES, export_model, interface, preprocess_record

CKPT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
META_FILE = "metadata.json"
CHAMPION_FILE = "champion.json"  # models/<name>/champion.json: {"version": ..., ...}
STAGES = ("released", "candidate")
CHECKPOINT_FORMAT = "brainmri.checkpoint/1"


def library_versions() -> dict:
    import pyarrow
    import ray
    import torchvision

    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "ray": ray.__version__,
            "pyarrow": pyarrow.__version__}


def make_checkpoint(model_state: dict, *, epoch: int, best: float, bad_epochs: int,
                    history: list, resumes: list, config: dict, classes: list[str], dataset: dict,
                    params: int, optimizer: dict | None = None, scheduler: dict | None = None,
                    versions: dict | None = None, train_model: dict | None = None,
                    inference: dict | None = None, distillation: dict | None = None) -> dict:
    """The checkpoint dict (format brainmri.checkpoint/1), tensors and plain values only.

    model_state, optimizer, scheduler: state_dicts (optimizer/scheduler omitted when None:
    a model fitted outside run_training cannot be resumed, only published). config: the
    resolved TrainConfig as a dict (its image_size goes into `preprocess`). dataset: {uri,
    name, version, manifest_hash}. versions: library versions, by default this process's
    (run_training passes the driver's, recorded once per run). model_state is what is
    served (the EMA weights when the recipe averages them); train_model, when given, the
    weights the optimizer trains (needed to resume, dropped on publishing). inference: how
    logits become a decision (models.decision.inference_record; default: plain argmax,
    flips as the config says). distillation: the teacher it was trained against
    (training.distill.teacher_record), when there was one."""
    from .decision import inference_record

    state = {"format": CHECKPOINT_FORMAT, "model": model_state}
    if train_model is not None:
        state["train_model"] = train_model
    if optimizer is not None:
        state["optimizer"] = optimizer
    if scheduler is not None:
        state["scheduler"] = scheduler
    state.update({
        "epoch": epoch, "best": best, "bad_epochs": bad_epochs, "history": history,
        "resumes": resumes, "config": config, "classes": classes,
        "preprocess": preprocess_record(config["image_size"]), "dataset": dataset,
        "versions": library_versions() if versions is None else versions, "params": params,
        "inference": inference or inference_record(config.get("tta", False)),
    })
    if distillation:
        state["distillation"] = distillation
    return state


def epoch_score(state: dict) -> float:
    """Validation macro-F1 at the epoch whose weights `state` holds (a checkpoint folder may
    hold a later epoch than its run's best)."""
    same = [h for h in state.get("history", []) if h.get("epoch") == state.get("epoch")]
    return float(same[-1][SELECTION_METRIC]) if same else float(state.get("best", 0.0))


def load_state(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def dump_state(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def publish_model(out: Location, name: str, ckpt: dict, metrics: dict,
                  stage: str = "released") -> Location:
    """Write models/<name>/<version>/ from a checkpoint dict; returns the version folder."""
    check_name(name, "model name")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}")
    state = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", "scaler", "train_model")}
    blob = dump_state(state)
    digest = hashlib.sha256(blob).hexdigest()
    version = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + digest[:8]
    dest = out / "models" / name / version
    (dest / MODEL_FILE).write_bytes(blob)
    files, exports, contract = _exports(state)
    for file, data in files.items():
        (dest / file).write_bytes(data)
    meta = {k: v for k, v in state.items() if k not in ("model", "history")}
    from .card import model_card

    meta["card"] = model_card(state, metrics)  # what it is for and not for, data, weaknesses
    meta.update(format="brainmri.model/1", name=name, version=version, sha256=digest, stage=stage,
                metrics=metrics, history=ckpt.get("history", []), exports=exports,
                interface=contract, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (dest / META_FILE).write_json(meta)  # last: marks the version complete
    return dest


def _exports(state: dict) -> tuple[dict, dict, dict | None]:
    """(file -> bytes, kind -> record, interface) of the exports; a network that cannot even
    be rebuilt gets an error record for every format (and a warning), never an exception."""
    try:
        files, records = export_model(state, build_model(state))
        contract = interface(state)
    except Exception as e:
        files, contract = {}, None
        records = {k: {"error": f"network not rebuilt: {type(e).__name__}: {e}"[:300]} for k in EXPORT_FILES}
    failed = {k: r["error"] for k, r in records.items() if "error" in r}
    if failed:
        warnings.warn(f"publishing without the {', '.join(failed)} export(s): {failed}", stacklevel=3)
    return files, records, contract


def latest_model(root: Location) -> Location:
    """models/<name>/ -> the version it stands for: the one champion.json names, else the
    newest complete released version (versions sort by time). Candidates never."""
    pointer = root / CHAMPION_FILE
    version = pointer.read_json().get("version") if pointer.exists() else None
    if version:
        if not (root / version / META_FILE).exists():
            raise StorageError(f"{pointer.uri} names version {version!r}, which is incomplete")
        return root / version
    versions = [v for v in root.listdir() if (root / v / META_FILE).exists()]
    for v in sorted(versions, reverse=True):  # newest first: one metadata read in the usual case
        if (root / v / META_FILE).read_json().get("stage") != "candidate":
            return root / v
    what = f"only candidate versions ({len(versions)}, none promoted)" if versions else \
        "no complete model version"
    raise StorageError(f"{what} under {root.uri}; name a version folder to use a candidate")


def model_file(uri: str) -> Location:
    """A model version folder, a models/<name> folder (latest), a checkpoint folder, or a
    .pt file -> the one file holding the weights. Resolving "latest" here, once, lets a
    caller pin the exact version it loaded (evaluation actors must all load the same one)."""
    loc = open_location(uri)
    if loc.is_file():
        return loc
    if (loc / MODEL_FILE).exists():
        if not (loc / META_FILE).exists():
            raise StorageError(f"model version {loc.uri} is incomplete (no {META_FILE})")
        return loc / MODEL_FILE
    if (loc / CKPT_FILE).exists():
        return loc / CKPT_FILE
    if loc.exists():
        return latest_model(loc) / MODEL_FILE
    raise StorageError(f"no model or checkpoint at {uri}")


def load_model_state(uri: str) -> dict:
    """A model version folder, a models/<name> folder (latest), a checkpoint folder, or a
    .pt file -> the checkpoint dict (weights_only)."""
    return load_state(model_file(uri).read_bytes())


def build_model(state: dict, bare: bool = False) -> torch.nn.Module:
    """Rebuild the network of a checkpoint/model dict, weights loaded, in eval mode, wrapped
    in its decision rule (test-time flips, logit bias: models.decision) unless `bare`."""
    from .decision import wrap
    from .zoo import create_model

    cfg = state["config"]
    model = create_model(cfg["model"], num_classes=len(state["classes"]), in_chans=1,
                         image_size=cfg["image_size"], **cfg.get("model_args", {}))
    model.load_state_dict(state["model"])
    return (model if bare else wrap(model, state.get("inference"))).eval()
