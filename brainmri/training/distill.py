"""Distillation: a published model teaches the network being trained (`--teacher MODEL`).

Why: an ensemble of seeds (`brainmri ensemble`) beats its members but costs k forward passes
per image wherever it is served. A network trained to match the ensemble's class
probabilities keeps part of that gain at one network's cost. The teacher runs online, on the
very batch the student trains on, augmented and mixed ("consistent teaching": Beyer et al.,
2022, "Knowledge distillation: a good teacher is patient and consistent"), so its targets
fit the view the student sees. Fixed targets computed once on the plain images would not.
The price is paid in training time: a 3-member ensemble of the CPU recipe's network adds
0.87 of a training step on one thread (`benchmarks/train.py --only distill`).

The driver checks the teacher once (`teacher_record`): the same classes in the same order,
the same input contract, and the same dataset version, by manifest hash. Its training rows
are then the student's: it never trained on a validation or test image (its best epoch was
chosen on validation, as the student's is). A teacher from another version could have
trained on this version's validation or test images, so it is refused. Each worker reads
the same file again (`load_teacher`) and proves by its sha256 that it is the file the
driver checked; a re-run of the same run name must be taught as the run started
(train.check_same_teacher). The record travels in run/config.json (under `teacher`), and in
the checkpoint and the published metadata under `distillation`.
"""

from __future__ import annotations

import hashlib

import torch

from ..config import ConfigError, TrainConfig
from ..core.storage import check_lasting
from ..models.checkpoints import build_model, epoch_score, load_state, model_file, preprocess_record
from .engine import Teacher, to_channels_last


def teacher_record(cfg: TrainConfig, classes: list[str], manifest_hash: str) -> dict:
    """Read and check cfg.teacher for a run on the dataset whose manifest hash is given;
    -> what the workers load and the checkpoint records (no weights). One-line ConfigError
    for every mismatch, before Ray starts a worker."""
    check_lasting(cfg.teacher)  # a relative path inside a Ray job's copy: refused
    loc = model_file(cfg.teacher)
    blob = loc.read_bytes()
    state = load_state(blob)
    config = state.get("config") or {}
    if list(state.get("classes", [])) != list(classes):
        raise ConfigError(f"teacher {loc.uri} predicts {list(state.get('classes', []))}, this run "
                          f"trains {list(classes)}: a teacher must have the same classes in the same order")
    if state.get("preprocess") != preprocess_record(cfg.image_size):
        size = (state.get("preprocess") or {}).get("image_size")
        raise ConfigError(f"teacher {loc.uri} takes another input ({size} px or another preprocessing) "
                          f"than this run's {cfg.image_size} px: it would be shown images it never saw")
    ds = state.get("dataset") or {}
    if ds.get("manifest_hash") != manifest_hash:
        which = f"dataset version {ds['version']!r}" if ds.get("version") else "an unrecorded dataset"
        raise ConfigError(f"teacher {loc.uri} was trained on {which}, not this run's: it may have "
                          "trained on this version's validation or test images; train (or ensemble) "
                          "a teacher on this version")
    members = (state.get("ensemble") or {}).get("members")
    return {"uri": loc.uri, "sha256": hashlib.sha256(blob).hexdigest(), "model": config.get("model"),
            "seed": config.get("seed"), "members": len(members) if members else 1,
            "best_val_macro_f1": epoch_score(state), "dataset_version": ds.get("version"),
            "weight": cfg.distill_weight, "temperature": cfg.distill_temperature}


def load_teacher(record: dict, device: torch.device) -> Teacher:
    """A worker's teacher: the file the driver checked (same sha256), as a bare network
    (no test-time flips, no decision bias: its raw class probabilities), frozen on `device`."""
    blob = model_file(record["uri"]).read_bytes()
    if hashlib.sha256(blob).hexdigest() != record["sha256"]:
        raise ConfigError(f"teacher {record['uri']} changed since the run started (sha256 differs)")
    net = to_channels_last(build_model(load_state(blob), bare=True)).to(device)
    return Teacher(net, record["weight"], record["temperature"])
