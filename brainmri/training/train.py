"""Data-parallel training with Ray Train over a Parquet dataset version.

    driver (`run_training`)                     each train worker (`train_loop_per_worker`)
    ------------------------------------------  ---------------------------------------------
    prepare: a resolved copy of the config,     model -> DDP (prepare_model); build_recipe: AdamW,
      dataset, storage and model checked          warm-up+cosine, EMA, mixing, teacher (recipe)
    Ray Data: read_shards -> preprocess         engine.fit, each epoch:
      (decode, fit, normalise; streaming)         train_one_epoch on its own shard, augmenting
    TorchTrainer(N workers, RunConfig(storage))   evaluate (plain module, no DDP) on its own
      train: equal shards; val: every row once    part of val (maybe none); one all-reduce
      config = {"run": RunSpec}                   rank 0: checkpoint + history; all: report()
    finalize (publishing runs): best checkpoint,  (with ema_decay: the averaged weights throughout)
      decision rule on val, exports, card

The loops themselves live in `engine` (no Ray there), the finishing step in `finalize`. The
driver never materialises the dataset; workers read their shard with `get_dataset_shard`.
Re-running with the same run name resumes from the latest checkpoint, and a failed worker is
replaced and resumes the same way (FailureConfig). The driver prints one line per epoch from
the run's history.json (`progress`).
"""

from __future__ import annotations

import math
import signal
import tempfile
import threading
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..config import ConfigError, RunFailed, TrainConfig, to_dict
from ..core.cluster import init_ray
from ..core.metrics import SELECTION_METRIC as METRIC
from ..core.storage import Location, StorageError, check_name, open_location, worker_env
from ..core.tracking import Tracking, failing, finish_run, run_callbacks, start_run
from ..data.datasets import manifest_hash, resolve_dataset, split_files, verify_shards
from ..data.pixels import (
    PixelReader,
    decoded_split,
    ensure_pixels,
    from_pixels,
    load_pixels,
    pixel_files,
    pixels_root,
    read_pixels,
)
from ..data.preprocess import preprocess_batch  # noqa: F401  (torch-free: what decode_pixels maps)
from ..models.checkpoints import (
    CKPT_FILE,
    META_FILE,
    MODEL_FILE,
    dump_state,
    library_versions,
    load_state,
    make_checkpoint,
)
from ..models.zoo import check_model_name, count_params, create_model, full_shape
from .distill import load_teacher, teacher_record
from .engine import FitState, Recipe, ShardBatches, compiled, fit, to_channels_last
from .finalize import finalize
from .progress import EpochLines
from .recipe import build_recipe, optimizer_steps


# -- worker side ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """What every worker of one run is given by the driver, fixed for the whole run (resumes
    included): the resolved TrainConfig and what the driver read once for all of them."""

    cfg: TrainConfig  # resolved (training.train.prepare): the whole network shape filled in
    classes: list[str]  # the dataset's, in label order
    train_counts: list[int]  # training images per class (the class-weighted loss)
    train_rows: int  # training rows the run reads (limit_train applied)
    dataset: dict  # {uri, name, version, manifest_hash[, pixels]}
    versions: dict  # the driver's library versions, recorded in every checkpoint
    run_uri: str  # runs/<name>/: history.json beside Ray's checkpoints
    teacher: dict | None = None  # training.distill.teacher_record, checked by the driver


class BlockBatches:
    """A worker's Ray Data shard as torch batches {'x': uint8 [B, S, S], 'label': int64 [B]},
    cut here from whole blocks: what `ShardBatches` asks of a Ray DataIterator
    (`iter_torch_batches`), done once a block instead of once a batch. A block is 4 MiB of
    decoded pixel rows ({'x': fixed_size_binary[S*S], 'label'}, the decoding feed) or, with
    `pixels` (data.pixels.PixelReader), a shard file's references, whose rows this process
    reads from the file. Either is viewed as one uint8 array (from_pixels: no copy; rows of a
    file that are not one run are gathered), the local shuffle permutes the whole block
    (better mixed than Ray Data's sliding buffer of a few batches, and one gather a block
    instead of one a batch), and batches are slices of it.
    Ray Data's own batcher (format conversion, its shuffle buffer, a collate per batch) cost
    ~1.6 ms of one CPU a batch of 64 at 160 px: measured in benchmarks/train.py's feed."""

    def __init__(self, it, size: int, pixels: PixelReader | None = None):
        self.it, self.size, self.pixels = it, size, pixels

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None, pin_memory: bool = False,
                           prefetch_batches: int = 1):
        rng = np.random.default_rng(local_shuffle_seed) if local_shuffle_buffer_size else None
        rest = None  # the last block's rows that did not fill a batch: (x, y)
        blocks = self.it.iter_batches(batch_size=None, batch_format="pyarrow",
                                      prefetch_batches=prefetch_batches)
        rows = self.pixels.rows_of(blocks) if self.pixels else (from_pixels(b, self.size) for b in blocks)
        for b in rows:
            x, y = b["x"], b["label"]
            if rng is not None:
                order = rng.permutation(len(y))
                x, y = x[order], y[order]
            at = 0
            if rest is not None:  # complete the held batch from the head of this block
                at = min(batch_size - len(rest[1]), len(y))
                rest = (np.concatenate([rest[0], x[:at]]), np.concatenate([rest[1], y[:at]]))
                if len(rest[1]) < batch_size:
                    continue
                yield self._tensors(*rest, pin_memory)
                rest = None
            end = at + (len(y) - at) // batch_size * batch_size
            for i in range(at, end, batch_size):
                yield self._tensors(x[i:i + batch_size], y[i:i + batch_size], pin_memory)
            if end < len(y):
                rest = (x[end:], y[end:])
        if rest is not None and not drop_last:
            yield self._tensors(*rest, pin_memory)

    @staticmethod
    def _tensors(x: np.ndarray, y: np.ndarray, pin: bool) -> dict:
        # views of a block may be read-only: the loops never write into a batch (they convert
        # to float first), so torch's warning about it is silenced
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            b = {"x": torch.from_numpy(x), "label": torch.from_numpy(y)}
        return {k: v.pin_memory() for k, v in b.items()} if pin else b


def _threads() -> int:
    """torch threads = the CPUs Ray assigned this worker (not the host's cores: a pod or a
    shared node has fewer to give, and oversubscribed threads spin against each other)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def _checkpoint_state(spec: RunSpec, raw: nn.Module, recipe: Recipe, epoch: int, run: FitState) -> dict:
    """This run's checkpoint (the format is checkpoints.make_checkpoint's): with weight
    averaging, "model" holds the average (what is validated and served) and "train_model"
    the weights the optimizer trains; with fp16, "scaler" the gradient scaler's state (a
    resumed run goes on at the scale it had, instead of skipping steps to find it again)."""
    ema = recipe.ema
    state = make_checkpoint(
        recipe.served(raw).state_dict(), train_model=raw.state_dict() if ema else None,
        optimizer=recipe.optimizer.state_dict(), scheduler=recipe.scheduler.state_dict(),
        epoch=epoch, best=run.best, bad_epochs=run.bad, history=run.history, resumes=run.resumes,
        config=to_dict(spec.cfg), classes=spec.classes, dataset=spec.dataset, versions=spec.versions,
        params=count_params(raw), distillation=spec.teacher)
    if recipe.scaler is not None:
        state["scaler"] = recipe.scaler.state_dict()
    return state


def checkpoint_dir(epoch: int) -> str:
    """The folder of an epoch's checkpoint in the run folder, named by its epoch (not Ray's
    default timestamp), so that `resume` can find one Ray never registered."""
    return f"checkpoint_{epoch:06d}"


def committed_checkpoint(run_uri: str | None, after: int) -> dict | None:
    """The checkpoint of the last epoch in the run's history.json when that epoch is later
    than `after` (the epoch of Ray's latest checkpoint; -1: none), else None.

    Rank 0 writes history.json only once report() has persisted the epoch's checkpoint, but
    Ray's controller registers a checkpoint only when it next polls every rank: a host lost
    in between (the cluster tier kills one right after an epoch) left Ray's latest checkpoint
    an epoch behind, or none at all, and the replaced worker group trained the finished
    epochs again, from epoch 0 after the first one. The file history.json vouches for is
    whole (persisted before history.json was written)."""
    if not run_uri:
        return None
    run = open_location(run_uri)
    history = (run / "history.json").read_json() if (run / "history.json").exists() else []
    last = history[-1]["epoch"] if history else -1
    path = run / checkpoint_dir(last) / CKPT_FILE
    if last <= after or not path.exists():  # not newer; or a run from before epoch-named folders
        return None
    state = load_state(path.read_bytes())
    return state if state["epoch"] == last else None


def resume(raw: nn.Module, recipe: Recipe, steps_per_epoch: int = 0, run_uri: str | None = None) -> FitState:
    """A replaced worker or a re-run driver continues from the latest checkpoint: Ray's, or a
    newer one in the run folder `run_uri` that Ray never registered (committed_checkpoint)."""
    import ray.train

    state, ckpt = None, ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = load_state(Path(d, CKPT_FILE).read_bytes())
    state = committed_checkpoint(run_uri, state["epoch"] if state else -1) or state
    if state is None:
        return FitState()
    raw.load_state_dict(state.get("train_model", state["model"]))
    if recipe.ema is not None:
        recipe.ema.module.load_state_dict(state["model"])
        recipe.ema.updates = (state["epoch"] + 1) * steps_per_epoch  # the decay's warm-up goes on
    recipe.optimizer.load_state_dict(state["optimizer"])
    recipe.scheduler.load_state_dict(state["scheduler"])
    if recipe.scaler is not None and "scaler" in state:
        recipe.scaler.load_state_dict(state["scaler"])
    start = state["epoch"] + 1
    return FitState(start, state["best"], state["bad_epochs"], state["history"],
                    state.get("resumes", []) + [start])


def where_ranks_run(placement: str) -> dict:
    """{placement, ranks: [{rank, node_id, ip}]} gathered from every rank (a collective: all
    ranks call it), so a run says where its workers ran (placement.json, written by rank 0)."""
    import ray
    import torch.distributed as dist

    here = {"node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address()}
    ranks = [here]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, here)
    return {"placement": placement, "nodes": len({r["node_id"] for r in ranks}),
            "ranks": [{"rank": i, **r} for i, r in enumerate(ranks)]}


def report(metrics: dict, state: dict | None, epoch: int | None = None) -> int | None:
    """Every rank reports once per epoch; only rank 0 passes a checkpoint (state), into the
    run folder's checkpoint_dir(epoch) (Ray's timestamped name without an epoch).
    -> the size of the checkpoint file handed to Ray (rank 0), for `verify_persisted`."""
    import ray.train

    size = None
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if state is not None:
            blob = dump_state(state)
            Path(tmp, CKPT_FILE).write_bytes(blob)
            size = len(blob)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        # the worker group's placement group travels with the report: a Tune driver that
        # stops this trial early removes it (Ray only reaps it where the State API works)
        pg = ray.util.get_current_placement_group()
        ray.train.report({**metrics, "placement_group": pg.id.hex() if pg else ""},
                         checkpoint=checkpoint,
                         checkpoint_dir_name=None if epoch is None else checkpoint_dir(epoch))
    return size


def verify_persisted(run_uri: str, epoch: int, size: int) -> None:
    """The epoch's checkpoint is in the run folder, whole, before history.json may name the
    epoch. Ray uploads it with pyarrow's copy_files, which swallows an upload that fails when
    the file is closed ("Error ignored when destroying file": seen with an S3 endpoint down
    mid-upload), and registers the checkpoint anyway. An S3 object appears only once its
    upload completed, so its size is the check; reading it back would cost a large network's
    checkpoint (hundreds of MB with the optimiser's state) every epoch."""
    import pyarrow.fs as pafs

    path = open_location(run_uri) / checkpoint_dir(epoch) / CKPT_FILE
    info = path.fs.get_file_info(path.path)
    found = info.size if info.type == pafs.FileType.File else None
    if found != size:
        raise StorageError(f"the checkpoint of epoch {epoch} did not reach {path.uri} whole "
                           f"({'missing' if found is None else f'{found} bytes, not {size}'}): "
                           "the epoch is not recorded")


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: config = {"run": RunSpec}."""
    import ray.train
    import ray.train.torch

    spec: RunSpec = config["run"]
    cfg = spec.cfg
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.set_num_threads(cfg.threads_per_worker or _threads())
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    device = ray.train.torch.get_device()

    model = create_model(cfg.model, len(spec.classes), 1, image_size=cfg.image_size, **cfg.model_args,
                         pretrained=cfg.pretrained or None)
    model = ray.train.torch.prepare_model(to_channels_last(model))
    raw = getattr(model, "module", model)  # evaluation and checkpoints use this one
    model = compiled(model, cfg.compile)  # the training steps only
    batches = max(1, spec.train_rows // world // cfg.batch_size)  # equal shards, drop_last
    teacher = load_teacher(spec.teacher, device) if spec.teacher else None
    recipe = build_recipe(cfg, raw, spec.train_counts, device, batches, rank, teacher)
    run = resume(raw, recipe, optimizer_steps(cfg, batches), spec.run_uri)  # the driver says so
    # (progress.EpochLines)
    placed = {**where_ranks_run(cfg.placement), "precision": recipe.precision}
    if rank == 0:  # a replaced worker group rewrites it: where the ranks run now
        (open_location(spec.run_uri) / "placement.json").write_json(placed)

    # uint8 batches, pinned on a GPU worker so the copy overlaps compute; augmentation and
    # normalisation happen on the device (engine.train_one_epoch)
    loader_kw = dict(batch_size=cfg.batch_size, pin_memory=cfg.gpu, prefetch_batches=1)  # 1 block
    # streaming pixel shards, Ray Data deals this rank references and it reads the rows itself
    pixels = spec.dataset.get("pixels")

    def batches(split: str) -> BlockBatches:
        reader = PixelReader(pixels, cfg.image_size) if pixels else None
        return BlockBatches(ray.train.get_dataset_shard(split), cfg.image_size, reader)

    train_src = ShardBatches(batches("train"), loader_kw, cfg.cache, True, True, cfg.seed * 7919 + rank,
                             pin=cfg.gpu, stall_s=cfg.feed_timeout_s)
    # each rank evaluates its own part of the validation rows (possibly none)
    val_src = ShardBatches(batches("val"), loader_kw, cfg.cache, False, False, 0, pin=cfg.gpu,
                           stall_s=cfg.feed_timeout_s)

    def on_epoch(epoch: int, metrics: dict, state: FitState, stop: bool) -> None:
        ckpt = _checkpoint_state(spec, raw, recipe, epoch, state) if rank == 0 else None
        size = report(metrics, ckpt, epoch)  # side effects on rank 0 only
        if rank == 0:  # after report() has persisted the checkpoint: history never runs ahead
            verify_persisted(spec.run_uri, epoch, size)
            (open_location(spec.run_uri) / "history.json").write_json(state.history)

    fit(model, recipe, train_src, val_src, spec.classes, device, epochs=cfg.epochs,
        patience=cfg.patience, time_budget_min=cfg.time_budget_min, state=run, on_epoch=on_epoch)


# -- driver side -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_uri: str
    model_uri: str | None
    best: dict
    history: list
    seconds: float


def _resources(cfg: TrainConfig) -> dict:
    import ray

    if cfg.gpu:
        return {"CPU": cfg.cpus_per_worker or 2.0, "GPU": 1.0}
    if cfg.cpus_per_worker:
        return {"CPU": cfg.cpus_per_worker}
    total = ray.cluster_resources().get("CPU", 1.0)
    # leave >= 1 CPU for Ray Data's read/decode tasks, else the workers starve it (deadlock)
    per = min(1.0, (total - 1.0) / cfg.num_workers)
    per = math.floor(per * 4) / 4
    if per <= 0:
        raise ConfigError(f"{cfg.num_workers} workers do not fit in {total:g} CPUs with one left "
                          "for data loading: use fewer workers or set cpus_per_worker")
    return {"CPU": per}


def _data_config():
    """Train: equal shards (every rank runs the same number of DDP steps). Validation: each
    row goes to exactly one rank, none dropped (`equal=False`), so the summed confusion
    matrix is a single-process evaluation of all of it; a rank may get no rows."""
    import ray.train

    class ShardedValidation(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            others = {k: v for k, v in datasets.items() if k != "val"}
            out = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                ds = datasets["val"].copy(datasets["val"])
                ds.context.execution_options = self._resolve_execution_options("val")
                hints = worker_node_ids if self._enable_shard_locality else None
                for i, split in enumerate(ds.streaming_split(world_size, equal=False,
                                                             locality_hints=hints)):
                    out[i]["val"] = split
            return out

    # both count as split for Train (created once by rank 0, coordinators cleaned up)
    return ShardedValidation(datasets_to_split=["train", "val"])


# Ray Data's block size for the training feed. With its default (128 MiB) a decode task's
# output is one block of a whole Parquet file's images (or of the whole split): the first
# batch of every streamed epoch then waited for all of them to be decoded (measured: 13-19 s
# for the 4.4k-image train split on one CPU), and nothing overlapped the model. At 4 MiB
# (~160 images at 160 px) a decode task hands its blocks on as they fill.
FEED_BLOCK_BYTES = 4 << 20


def build_datasets(cfg: TrainConfig, version, manifest, pixels=None) -> dict:
    """Ray Data's train and val feeds, turned into tensors by a worker's `BlockBatches`: pixel
    rows {'x': fixed_size_binary[S*S], 'label'} decoded from the version's shards, or with
    `pixels` = (root, pixels.json) from `data.pixels.ensure_pixels` (shards preprocessed at
    cfg.image_size already) references to their rows, which the workers read themselves
    (data.pixels.read_pixels says why)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # logs, not bars, in jobs
    ds = {}
    for split, limit in (("train", cfg.limit_train), ("val", cfg.limit_val)):
        if pixels:  # preprocessed already: the stored rows are the feed's rows, as they are
            root, pix = pixels
            if pix["image_size"] != cfg.image_size:
                raise ConfigError(f"pixel shards {root.uri} are {pix['image_size']} px, "
                                  f"not {cfg.image_size}")
            if not pixel_files(root, pix, split):
                raise ConfigError(f"pixel shards {root.uri} have no {split} shards")
            d = read_pixels(root, pix, split, limit=limit)  # references: the ranks read the rows
            if split == "train":  # files in another order each epoch (a block is a file)
                d = d.randomize_block_order()
        else:
            if not split_files(version, manifest, split):
                raise ConfigError(f"dataset {version.uri} has no {split} shards")
            d = decoded_split(version, manifest, split, cfg.image_size, limit)
            d.context.target_max_block_size = FEED_BLOCK_BYTES
        ds[split] = d
    return ds


@dataclass
class Prepared:
    """A run checked before Ray starts a worker (`prepare`)."""

    cfg: TrainConfig  # resolved: its name chosen, its network's whole shape in model_args
    version: Location  # the dataset version it trains on
    manifest: dict
    out: Location  # where runs/ and models/ go
    teacher: dict | None  # training.distill.teacher_record, or None


def prepare(given: TrainConfig) -> Prepared:
    """Everything that can fail fast, before Ray starts a worker. `given` is left as it is;
    the resolved copy names the run (cfg.name or <model>-<time>) and fills the network's whole
    shape into model_args (TrainConfig.shape, then the factory's defaults), so that the run
    records all of it."""
    given.validate()
    check_model_name(given.model)
    if given.model == "ensemble":  # retraining an ensemble champion on its own recipe lands here
        raise ConfigError("an ensemble is not trained as one network: train its members (brainmri train "
                          "--seed S, one run each) and publish them as one with brainmri ensemble")
    name = check_name(given.name or f"{given.model}-{time.strftime('%Y%m%d-%H%M%S')}", "run name")
    cfg = replace(given, name=name, model_args=full_shape(given.model, given.shape()))
    version, manifest = resolve_dataset(cfg.data, cfg.dataset)
    for split in ("train", "val"):
        if not split_files(version, manifest, split):
            raise ConfigError(f"dataset {version.uri} has no {split} shards")
    verify_shards(version, manifest, ("train", "val"))  # before any worker reads a row
    out = open_location(cfg.out, check=True)
    try:  # builds the network once on the driver: bad model_args fail here, not in workers
        create_model(cfg.model, len(manifest["classes"]), 1, image_size=cfg.image_size,
                     **cfg.model_args)
    except TypeError as e:
        raise ConfigError(f"model_args do not fit {cfg.model}: {e}") from None
    # train shards are equal and drop their last partial batch: every worker needs >= 1 batch
    rows = min(sum(manifest["counts"]["train"].values()), cfg.limit_train or 10**12)
    if rows // cfg.num_workers < cfg.batch_size:
        raise ConfigError(f"{rows} training rows over {cfg.num_workers} workers leave each fewer "
                          f"than one batch of {cfg.batch_size}: use fewer workers or a smaller "
                          "batch_size")
    if rows // cfg.num_workers // cfg.batch_size < cfg.accum_steps:  # else no step is ever made
        raise ConfigError(f"{rows} training rows over {cfg.num_workers} workers give each "
                          f"{rows // cfg.num_workers // cfg.batch_size} batches an epoch, fewer than "
                          f"accum_steps {cfg.accum_steps}: lower accum_steps or batch_size")
    # read and checked once, here: what each worker loads again (training.distill)
    teacher = teacher_record(cfg, manifest["classes"], manifest_hash(manifest)) if cfg.teacher else None
    return Prepared(cfg, version, manifest, out, teacher)


def check_same_network(run, cfg: TrainConfig) -> None:
    """A re-run resumes the run's checkpoints: it must build the network they hold. Compared
    with the factory's defaults filled in, so a run recorded before the shape was filled
    (its model_args as given) is matched by the same arguments given now."""
    before = ((run / "config.json").read_json() if (run / "config.json").exists() else {}).get("config")
    if not before:
        return
    was = (before["model"], full_shape(before["model"], before.get("model_args") or {}))
    now = (cfg.model, full_shape(cfg.model, cfg.model_args))
    if was != now:
        raise ConfigError(f"run {run.uri} trains {was[0]} with model_args {was[1]}; this re-run "
                          f"builds {now[0]} with {now[1]}: resume it with the model and model_args "
                          "it started with, or start a run under a new name")


def check_same_teacher(run, teacher: dict | None, given: str) -> None:
    """A re-run resumes the run: it must be taught as its first epochs were (by the same
    file, or by none), or its checkpoints would describe the weights wrongly. Runs whose
    config.json predates the record are not checked."""
    before = (run / "config.json").read_json() if (run / "config.json").exists() else {}
    if "teacher" not in before:
        return
    was, now = (before["teacher"] or {}).get("sha256"), (teacher or {}).get("sha256")
    if was != now:
        said = f"distilled from {before['teacher']['uri']} (sha256 {was[:12]})" if was else \
            "taught by no teacher"
        raise ConfigError(f"run {run.uri} was {said}; this re-run names "
                          + (f"{given} (another file)" if now else "no teacher")
                          + ": resume it as it started, or start a run under a new name")


def run_training(given: TrainConfig, callbacks=None, storage=None, progress=None,
                 tracking: Tracking | None = None) -> TrainResult:
    """Train (see the module docstring), then `finalize` the run when it publishes.
    `progress(line)`, when given, gets one line per epoch as the run goes (progress.EpochLines);
    `tracking`: an MLflow run (core.tracking). `given` is not changed: the resolved config is
    the one in the run's config.json and checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    p = prepare(given)
    cfg, version, manifest, out = p.cfg, p.version, p.manifest, p.out
    classes = manifest["classes"]

    runs = storage or (out / "runs")
    run = runs / cfg.name
    check_same_network(run, cfg)
    check_same_teacher(run, p.teacher, cfg.teacher)
    train_counts = [manifest["counts"]["train"][c] for c in classes]
    dataset_info = {"uri": version.uri, "name": manifest["name"], "version": manifest["version"],
                    "manifest_hash": manifest_hash(manifest)}
    # before Ray starts: a tracking server that does not answer fails here, in one line
    tracked = start_run(tracking and tracking.named("brainmri-train"), run.uri, cfg.name,  # None: off
                        {**to_dict(cfg), "dataset": dataset_info},
                        {"brainmri.dataset_version": manifest["version"]})
    if finished(run, cfg.epochs):  # Ray Train would resume past its last epoch and train nothing
        return _wrap_up(cfg, run, out, tracked, t0)
    init_ray()
    # streaming every epoch (cache off): decode once into pixel shards beside the version,
    # not once an epoch (data.pixels; the shards serve every later run). A quick look at the
    # first N rows (limit_*) streams shards that exist but does not build the whole version's
    # for them: it decodes its own rows. The cached feed decodes once in the workers anyway.
    pixels = None
    if not cfg.cache:
        with failing(tracked):
            if not (cfg.limit_train or cfg.limit_val):
                pixels = ensure_pixels(version, manifest, cfg.image_size)
            else:
                found = load_pixels(version, manifest, cfg.image_size)
                pixels = (pixels_root(version, cfg.image_size), found) if found else None
        if pixels:
            dataset_info["pixels"] = pixels[0].uri
    (run / "config.json").write_json({"config": to_dict(cfg), "dataset": dataset_info, "teacher": p.teacher})
    spec = RunSpec(cfg=cfg, classes=list(classes), train_counts=train_counts,
                   train_rows=min(sum(train_counts), cfg.limit_train or 10**12), dataset=dataset_info,
                   versions=library_versions(), run_uri=run.uri, teacher=p.teacher)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": spec},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.gpu,
                                     resources_per_worker=_resources(cfg),
                                     placement_strategy=cfg.placement.upper()),
        datasets=build_datasets(cfg, version, manifest, pixels),
        dataset_config=_data_config(),
        run_config=RunConfig(
            name=cfg.name, storage_path=runs.path, storage_filesystem=runs.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute=METRIC,
                                               checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": worker_env()} if worker_env() else None,
            callbacks=[*(callbacks or []), *run_callbacks(tracked)]),
    )
    with failing(tracked), _sigint_restored(), (EpochLines(run / "history.json", cfg.epochs, progress)
                                                if progress else nullcontext()):
        try:
            trainer.fit()
        except TrainingFailedError as e:
            # the frames Ray's fit left in the traceback hold the run's controller actor (and its
            # dataset actors) for as long as the error is kept: their locals go, the lines stay
            traceback.clear_frames(e.__traceback__)
            raise RunFailed(f"run {run.uri} failed after {cfg.max_failures} restart(s): {first_cause(e)} "
                            "(the same command resumes it from its last checkpoint)") from e
    return _wrap_up(cfg, run, out, tracked, t0)


@contextmanager
def _sigint_restored():
    """Ray Train's fit, called from the main thread, installs a SIGINT handler (Ctrl-C aborts
    the run gracefully) that holds the run's controller actor and leaves it installed: the
    finished run's controller and its dataset actors (~1 GB) then live on in a process that
    trains again (a test session, a scheduler, a notebook) until the next fit replaces it.
    The handler from before fit comes back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Ray installs none off the main thread (Tune's trials)
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if before is not None:  # None: a handler not set from Python, which Python cannot set back
            signal.signal(signal.SIGINT, before)


def first_cause(e: BaseException) -> str:
    """One line for what made Ray Train give up: the lowest-ranked worker's own error (not
    Ray's wrapper and traceback), else the controller's, else Ray's message."""
    failures = getattr(e, "worker_failures", None) or {}
    cause = failures[min(failures)] if failures else getattr(e, "controller_failure", None) or e
    while getattr(cause, "cause", None) is not None:  # RayTaskError(...).cause: the user's error
        cause = cause.cause
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    text = lines[-1] if lines and "Traceback" in str(cause) else (lines[0] if lines else "")
    return f"{type(cause).__name__}: {text[:400]}"


def finished(run: Location, epochs: int) -> bool:
    """Every epoch of the run is in its history.json (rank 0 writes it only after that epoch's
    checkpoint is persisted): a re-run, such as retrain's after a crash past training, has
    nothing left to train, and publishes what the run holds without starting Ray."""
    hist = run / "history.json"
    return hist.exists() and [h.get("epoch") for h in hist.read_json()] == list(range(epochs))


def _wrap_up(cfg: TrainConfig, run: Location, out: Location, tracked, t0: float) -> TrainResult:
    """After training: `finalize` when the run publishes, summary.json, the tracked run's end."""
    history = (run / "history.json").read_json()
    best, model_uri = max(history, key=lambda h: h[METRIC]), None
    if cfg.publish:
        with failing(tracked):
            done = finalize(run, out, stage="candidate" if cfg.candidate else "released")
        model_uri, best = done.model_uri, done.best  # the published epoch's own row
    (run / "summary.json").write_json({"best": best, "model": model_uri, "epochs_run": len(history),
                                       "seconds": time.time() - t0})
    finish_run(tracked, history, model_uri, (META_FILE, MODEL_FILE))
    return TrainResult(run.uri, model_uri, best, history, time.time() - t0)
