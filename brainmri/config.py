"""Typed configuration: dataclasses loaded from YAML, overridden with `key=value` on the
command line, unknown keys rejected. The resolved config (a plain dict via `to_dict`)
travels inside every manifest, checkpoint and report, so any result says how it was made.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


class ConfigError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
@dataclass
class IngestConfig:
    """How `brainmri ingest` turns a class-folder tree into a dataset version."""

    name: str = "brain-tumor-mri"  # dataset name: DEST/datasets/<name>/<version>/
    classes: list[str] = field(default_factory=lambda: list(CLASSES))  # label order
    seed: int = 0  # split seed
    val_fraction: float = 0.10  # of the training data, by duplicate group, per class
    test_fraction: float = 0.10  # only used when SOURCE has no Testing/ folder
    phash_distance: int = 12  # candidate near-duplicates: 64-bit pHash within this distance
    near_dup_similarity: float = 0.97  # ...confirmed if 32x32 thumbnails correlate this much
    min_side: int = 64  # pixels; smaller images are rejected
    max_pixels: int = 40_000_000  # larger images are rejected as possible decompression bombs
    shard_mb: int = 32  # target Parquet shard size
    row_group_rows: int = 64  # rows per row group (Ray Data / pyarrow read granularity)
    workers: int = 0  # processes for decoding and hashing; 0 = all cores
    # a dataset version whose test split stays test here (with its near duplicates), so models
    # trained on this version can be compared on that frozen test set without leakage
    frozen_test: str = ""

    def validate(self) -> None:
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ConfigError("classes must be a non-empty list of distinct names")
        for f in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"{f} must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("val_fraction + test_fraction must be < 1")
        if not 0 <= self.phash_distance <= 64:
            raise ConfigError("phash_distance must be in [0, 64]")
        if self.shard_mb < 1 or self.row_group_rows < 1 or self.min_side < 1:
            raise ConfigError("shard_mb, row_group_rows and min_side must be positive")
        if not 0.0 < self.near_dup_similarity <= 1.0:
            raise ConfigError("near_dup_similarity must be in (0, 1]")
        if self.max_pixels < 1:
            raise ConfigError("max_pixels must be positive")
        if self.workers < 0:
            raise ConfigError("workers must be >= 0 (0 = all cores)")


# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """How `brainmri train` trains one model. Defaults are the CPU recipe."""

    data: str = "./lake"  # dataset version URI, dataset folder URI, or store URI (+ dataset)
    dataset: str = "brain-tumor-mri"  # dataset name when `data` is a store
    out: str = "./lake"  # storage URI: runs/<name>/ (checkpoints) and models/<name>/<version>/
    name: str = ""  # run name; re-running with the same name resumes. Default: <model>-<time>
    model: str = "brainnet"  # registry name (brainmri.models.list_models())
    model_args: dict = field(default_factory=dict)  # shape arguments for the model factory
    pretrained: str = ""  # "" (from scratch), a weights URI, or "torchvision"
    image_size: int = 160  # square input side after aspect-preserving fit
    epochs: int = 40
    batch_size: int = 64  # per worker
    lr: float = 3e-3  # peak AdamW learning rate (reached after warm-up)
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    class_weighting: bool = True  # inverse-frequency class weights in the loss
    aug_strength: float = 1.0  # 0 disables random augmentation
    patience: int = 10  # early stopping: epochs without val macro-F1 gain (0 = off)
    time_budget_min: float = 0.0  # stop after the epoch that crosses this many minutes (0 = off)
    seed: int = 0
    num_workers: int = 2  # data-parallel train workers (DDP)
    gpu: bool = False  # one GPU per worker, mixed precision, channels-last
    cpus_per_worker: float = 0.0  # 0 = auto: leave at least one CPU to Ray Data
    threads_per_worker: int = 0  # torch intra-op threads; 0 = auto
    max_failures: int = 2  # worker failures survived (restart from latest checkpoint)
    keep_checkpoints: int = 2  # top-k by val macro-F1 (the latest is always kept too)
    limit_train: int = 0  # use only the first N training rows (quick runs, tests); 0 = all
    limit_val: int = 0
    cache: bool = True  # workers keep their preprocessed shard in memory after epoch 1
    publish: bool = True  # publish the best checkpoint as models/<model>/<version>/

    def validate(self) -> None:
        # the model name is checked where models are known (training.prepare, tune's space),
        # so that this module stays free of torch and of the rest of the package
        if self.image_size < 32 or self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ConfigError("image_size >= 32, epochs >= 1, batch_size >= 1, num_workers >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise ConfigError("lr > 0, weight_decay >= 0, label_smoothing in [0, 1)")
        if min(self.aug_strength, self.warmup_epochs, self.patience, self.time_budget_min) < 0:
            raise ConfigError("aug_strength, warmup_epochs, patience and time_budget_min must be >= 0")


@dataclass
class TuneConfig:
    """How `brainmri tune` searches. What is searched lives in the space file (`space`)."""

    data: str = "./lake"  # as TrainConfig.data
    dataset: str = "brain-tumor-mri"
    out: str = "./lake"  # results under tune/<name>/, the winner under models/ and reports/
    space: str = "configs/tune-cpu.yaml"  # search-space YAML (local path or storage URI)
    name: str = ""  # experiment name; re-running with the same name resumes. Default: tune-<time>
    num_samples: int = 8  # trials, sampled up front (seeded) so a resumed search runs the same ones
    max_concurrent: int = 0  # 0 = as many as fit beside Ray Data's share of the CPUs/GPUs
    epochs: int = 0  # max epochs per trial (ASHA's max_t); 0 = the space's base or TrainConfig's
    grace_period: int = 2  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 2  # ASHA keeps the top 1/reduction_factor at each rung
    workers_per_trial: int = 1  # DDP workers in each trial's TorchTrainer
    gpu: bool = False  # one GPU per train worker
    seed: int = 0  # sampling seed (each trial's training seed is in its params)
    evaluate: bool = True  # evaluate the published winner on the dataset's test split
    limit_train: int = 0  # per trial, as TrainConfig (tests, quick looks)
    limit_val: int = 0

    def validate(self) -> None:
        if self.num_samples < 1 or self.max_concurrent < 0 or self.workers_per_trial < 1:
            raise ConfigError("num_samples >= 1, max_concurrent >= 0, workers_per_trial >= 1")
        if self.epochs < 0 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("epochs >= 0, grace_period >= 1, reduction_factor >= 2")


# --------------------------------------------------------------------------------------------
def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (typing.Any,)
        return [_coerce(inner, v, key) for v in value]
    if origin is dict or tp is typing.Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a dict, refusing keys it does not know."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def parse_overrides(items: list[str]) -> dict:
    """['a.b=1', 'c=[x, y]'] -> {'a': {'b': 1}, 'c': ['x', 'y']} (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """defaults <- YAML file <- overrides; returns a validated `cls`."""
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
    if overrides:
        data = _merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return from_dict(cls, data)
