"""Loading a trained model for inference and running it: shared by evaluate, predict and
calibrate, so all three see a model, its preprocessing and its probabilities the same way.

`open_model` pins what a URI means *now* (a models/<name> folder means its latest version at
this moment) and records the weights' sha256: Ray actors, calibration files and reports all
refer to that exact file, never to "latest" again.

A runtime (config.RUNTIMES) says what runs the network: "torch" builds the eager module from
model.pt; "torchscript" and "onnx" load the export published beside it (`ModelRef.runtime_file`
names the file and the sha256 metadata.json records for it; `load_network` checks it before
loading). All three are called the same way, so preprocessing, probabilities and decisions
are shared code whatever runs the network.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import RUNTIMES, ConfigError
from ..core.storage import Location, StorageError, check_name, open_location
from ..data.transforms import preprocess, preprocess_many, to_model_input  # preprocess_many re-exported
from ..models.checkpoints import META_FILE, MODEL_FILE, build_model, load_state, model_file
from ..models.export import EXPORT_FILES, OnnxNetwork, load_torchscript

if TYPE_CHECKING:
    from ..data.images import ImageLimits

CALIBRATION_FILE = "calibration.json"
REFER = "refer to a radiologist"


@dataclass
class ModelRef:
    """One concrete set of weights and what is known about them."""

    weights: Location  # the model.pt / checkpoint.pt / .pt file actually read
    sha256: str  # of that file's bytes
    state: dict  # the checkpoint dict (weights_only)
    name: str
    version: str
    metadata: dict = field(default_factory=dict)  # metadata.json of a published version

    @property
    def classes(self) -> list[str]:
        return list(self.state["classes"])

    @property
    def image_size(self) -> int:
        return int(self.state["config"]["image_size"])

    @property
    def history(self) -> list[dict]:
        return self.metadata.get("history") or self.state.get("history") or []

    @property
    def calibration_file(self) -> Location:
        """Beside the weights: <version>/calibration.json, <checkpoint>/calibration.json, or
        <file>.calibration.json for a bare .pt file (whose folder may hold other models)."""
        name = self.weights.name
        folder = open_location(posixpath.dirname(self.weights.uri))
        if name in (MODEL_FILE, "checkpoint.pt"):
            return folder / CALIBRATION_FILE
        return folder / f"{name}.{CALIBRATION_FILE}"

    def runtime_file(self, runtime: str) -> tuple[str, str]:
        """(URI, sha256) of the file `runtime` runs: model.pt for torch, else the export
        beside it with the sha256 metadata.json records for it. The file name is this
        package's own, never a path taken from metadata.json."""
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}")
        if runtime == "torch":
            return self.weights.uri, self.sha256
        if not self.metadata:
            raise StorageError(f"--runtime {runtime} needs a published model version (its exports); "
                               f"{self.weights.uri} is a checkpoint")
        rec = (self.metadata.get("exports") or {}).get(runtime) or {}
        if not rec.get("sha256") or rec.get("file") != EXPORT_FILES[runtime]:
            why = rec.get("error") or "published before exports existed"
            raise StorageError(f"model {self.name}/{self.version} has no {runtime} export ({why})")
        folder = open_location(posixpath.dirname(self.weights.uri))
        return (folder / EXPORT_FILES[runtime]).uri, rec["sha256"]


def open_model(uri: str) -> ModelRef:
    """Model version, models/<name> (latest), checkpoint folder or .pt file -> ModelRef."""
    weights = model_file(uri)
    data = weights.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    meta_loc = open_location(posixpath.dirname(weights.uri)) / META_FILE
    published = weights.name == MODEL_FILE and meta_loc.exists()
    meta = meta_loc.read_json() if published else {}
    if published and meta.get("sha256") and meta["sha256"] != sha:  # before unpickling it
        raise StorageError(f"{weights.uri} has sha256 {sha[:16]}..., its {META_FILE} records "
                           f"{meta['sha256'][:16]}...: the weights changed after publishing")
    try:
        state = load_state(data)
    except Exception as e:  # pickle/zip errors: not a checkpoint written by brainmri
        raise StorageError(f"{weights.uri} is not a brainmri model or checkpoint "
                           f"({type(e).__name__})") from None
    if not isinstance(state, dict) or not {"model", "config", "classes"} <= set(state):
        raise StorageError(f"{weights.uri} is not a brainmri model or checkpoint")
    if published:
        name, version = meta["name"], meta["version"]
    else:  # a training checkpoint: named after its run, versioned by epoch and content
        name = state["config"].get("name") or state["config"].get("model", "model")
        version = f"epoch{state.get('epoch', 0)}-{sha[:8]}"
    return ModelRef(weights, sha, state, check_name(name, "model name"),
                    check_name(version, "model version"), meta)


def inference_device(gpu: bool) -> torch.device:
    """Where inference runs: the CPU, or with `gpu` this process's CUDA device (in a Ray
    actor given num_gpus=1, the one GPU Ray assigned it through CUDA_VISIBLE_DEVICES). Fails
    with one sentence when CUDA is missing, instead of deep inside the first tensor move."""
    if not gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"gpu=True but this process sees no CUDA device (torch "
                           f"{torch.__version__}, CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    return torch.device("cuda")


def load_network(weights_uri: str, sha256: str | None, device: str | torch.device = "cpu",
                 runtime: str = "torch"):
    """The file `runtime` runs (see ModelRef.runtime_file) -> a network in eval mode on
    `device`, called as module(x) on a float [N,1,S,S] tensor (channels-last on CUDA for
    torch). Refuses a file whose bytes do not have `sha256`: changed after publishing, or
    re-published/overwritten since open_model pinned it. ONNX runs on the CPU only, with
    as many threads as torch has here (a Ray actor's CPUs)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}")
    if runtime == "onnx" and torch.device(device).type != "cpu":
        raise ConfigError("--runtime onnx runs on ONNX Runtime's CPU provider; drop --gpu")
    data = open_location(weights_uri).read_bytes()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise StorageError(f"{weights_uri} does not have the sha256 recorded for it: changed after "
                           "publishing or while in use")
    if runtime == "onnx":
        return OnnxNetwork(data, threads=torch.get_num_threads())
    if runtime == "torchscript":
        return load_torchscript(data, device)
    model = build_model(load_state(data)).to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def forward_logits(model, x_u8: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """Preprocessed uint8 [B,S,S] -> float32 logits [B,K].

    fp32 on every device: calibration and log loss are sensitive to the last digits that
    bf16 would round away, and a report must not depend on where it was computed. On CUDA
    the uint8 batch is moved (4x fewer bytes than floats) and normalised on the GPU, and the
    network runs channels-last (cuDNN may use TF32 for convolutions: ~1e-3 relative)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(x_u8))).to(dev)
        return model(x).float().cpu().numpy()
    x = to_model_input(torch.from_numpy(np.ascontiguousarray(x_u8)).to(dev, non_blocking=True))
    return model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# -- Ray Data stages ---------------------------------------------------------------------------
# They live here, not in evaluate.py, because a Ray worker imports the module of whatever it
# runs: this one needs torch and PIL only, not matplotlib, scikit-learn or the report code.
def _empty(n: int, size: int) -> dict:
    # dicom: the row's path is a DICOM file's (frame: its slice, -1 for a rejected file),
    # which the driver turns into a pseudonym before anything is written (Source.pseudonymise)
    return {"x": np.zeros((n, size, size), np.uint8), "reason": np.full(n, "", dtype=object),
            "detail": np.full(n, "", dtype=object), "dicom": np.zeros(n, dtype=bool),
            "frame": np.full(n, -1, dtype=np.int32)}


def prepare_dataset_batch(batch: dict, size: int) -> dict:
    """Rows already validated by ingest: decode and preprocess only."""
    n = len(batch["path"])
    out = _empty(n, size)
    out["x"] = preprocess_many(batch["image"], size)
    out.update(path=np.asarray(batch["path"], dtype=object),
               label=np.asarray(batch["label"], dtype=np.int64),
               sha256=np.asarray(batch["sha256"], dtype=object),
               phash=np.asarray(batch["phash"], dtype=np.int64))
    return out


@functools.lru_cache(maxsize=4)
def _root(uri: str) -> Location:
    return open_location(uri)  # one filesystem object per worker process


def read_limited(loc: Location, limits: ImageLimits) -> bytes:
    """At most max_bytes + 1 bytes: enough for inspect_image to refuse an oversized file
    without holding all of it."""
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read(limits.max_bytes + 1)


def load_folder_batch(batch: dict, root_uri: str, size: int, limits: ImageLimits) -> dict:
    """Read, validate (ingest's rules) and preprocess files of an image folder: one row per
    image, one per slice of a DICOM file, one per rejected file."""
    rows = [row for rel, label in zip(batch["path"], batch["label"], strict=True)
            for row in _folder_rows(_root(root_uri), str(rel), int(label), size, limits)]
    out = _empty(len(rows), size)
    out.update(path=np.asarray([r["path"] for r in rows], dtype=object),
               label=np.asarray([r["label"] for r in rows], dtype=np.int64),
               sha256=np.asarray([r.get("sha256", "") for r in rows], dtype=object),
               phash=np.asarray([r.get("phash", 0) for r in rows], dtype=np.int64))
    for i, r in enumerate(rows):
        out["reason"][i], out["detail"][i], out["dicom"][i] = r["reason"], r["detail"], r["dicom"]
        out["frame"][i] = r.get("frame", -1)
        if "x" in r:
            out["x"][i] = r["x"]
    return out


def _folder_rows(root: Location, rel: str, label: int, size: int, limits: ImageLimits) -> list[dict]:
    from ..data import images as im  # here: dataset rows arrive hashed, only folders need it

    base = {"path": rel, "label": label, "reason": "", "detail": "", "dicom": False}
    try:
        scans = im.inspect_scans(read_limited(root / rel, limits), limits)
    except im.RejectedImage as e:
        return [{**base, "reason": e.reason, "detail": e.detail[:300], "dicom": e.dicom}]
    except OSError as e:
        return [{**base, "reason": im.UNREADABLE, "detail": (e.strerror or str(e))[:300]}]
    return [{**base, "frame": s.frame if s.dicom is not None else -1,
             "dicom": s.dicom is not None, "x": preprocess(s.image, size),
             "sha256": s.info.sha256, "phash": s.info.phash} for s in scans]


def actor_resources(gpu: bool) -> dict:
    """Ray resources of one LogitsActor in the map_batches pool: a CPU, plus a whole GPU with
    `gpu` (one copy of the model per GPU; more actors than GPUs wait for one)."""
    return {"num_cpus": 1, "num_gpus": 1 if gpu else 0}


class LogitsActor:
    """Holds one copy of the network (of `runtime`: weights_uri/sha256 from
    ModelRef.runtime_file) for its lifetime; map_batches calls it per batch. Rows
    with a rejection reason carry a blank image and get NaN logits: never shown to the model.
    With `gpu` the actor must have been given a GPU (see actor_resources)."""

    def __init__(self, weights_uri: str, sha256: str, num_classes: int, gpu: bool,
                 drop: tuple = ("x", "image"), runtime: str = "torch"):
        self.device = inference_device(gpu)
        self.model = load_network(weights_uri, sha256, self.device, runtime)
        self.k, self.drop = num_classes, set(drop)

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray([r == "" for r in batch["reason"]], dtype=bool)
        logits = np.full((len(ok), self.k), np.nan, np.float32)
        if ok.any():
            logits[ok] = forward_logits(self.model, batch["x"][ok], self.device)
        out = {c: v for c, v in batch.items() if c not in self.drop}
        out["logits"] = logits
        return out
