"""Data-parallel training with Ray Train over a Parquet dataset version.

    driver (`run_training`)                     each train worker (`train_loop_per_worker`)
    ------------------------------------------  ---------------------------------------------
    validate config, dataset, storage, model    model -> DDP (prepare_model), AdamW, warm-up+cosine
    Ray Data: read_parquet -> preprocess        for each epoch:
      (decode, fit, normalise; streaming)         train_one_epoch on its own shard, augmenting
    TorchTrainer(N workers, RunConfig(storage))   evaluate (plain module, no DDP) on its own
      train: equal shards; val: every row once    part of val (maybe none); one all-reduce
    teacher checked (optional, distill)         teacher (optional): frozen, on each train batch
    decision rule on val (optional)             rank 0: checkpoint + history; all: report()
    publish best checkpoint as a model version  (with ema_decay: the averaged weights throughout)

The loops themselves live in `engine` (no Ray there). The driver never materialises the
dataset; workers read their shard with `get_dataset_shard`. Re-running with the same run name
resumes from the latest checkpoint, and a failed worker is replaced and resumes the same way
(FailureConfig). The driver prints one line per epoch from the run's history.json (`progress`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..config import ConfigError, TrainConfig, from_dict, to_dict
from ..core import metrics as M
from ..core.cluster import init_ray
from ..core.metrics import SELECTION_METRIC as METRIC
from ..core.storage import check_name, open_location, worker_env
from ..core.tracking import Tracking, failing, finish_run, run_callbacks, start_run
from ..data.datasets import (
    manifest_hash,
    resolve_dataset,
    split_arrays,
    split_column,
    split_files,
    verify_shards,
)
from ..data.pixels import ensure_pixels, from_pixels, pixel_files
from ..data.preprocess import preprocess_batch  # torch-free (Ray Data's decode workers)
from ..data.transforms import to_model_input
from ..models.checkpoints import (
    CKPT_FILE,
    META_FILE,
    MODEL_FILE,
    build_model,
    dump_state,
    library_versions,
    load_state,
    make_checkpoint,
    publish_model,
)
from ..models.decision import choose_logit_bias, inference_record
from ..models.zoo import check_model_name, count_params, create_model, full_shape
from .distill import load_teacher, teacher_record
from .engine import (
    EMA,
    Mixer,
    ShardBatches,
    Stopwatch,
    agree_any,
    evaluate,
    lr_lambda,
    to_channels_last,
    train_one_epoch,
)
from .progress import EpochLines


# -- worker side ------------------------------------------------------------------------------
def _threads() -> int:
    """torch threads = the CPUs Ray assigned this worker (not the host's cores: a pod or a
    shared node has fewer to give, and oversubscribed threads spin against each other)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def _checkpoint_state(raw, ema, optimizer, scheduler, epoch, best, bad, history, resumes, cfg,
                      config) -> dict:
    """This run's checkpoint (the format is checkpoints.make_checkpoint's): with weight
    averaging, "model" holds the average (what is validated and served) and "train_model"
    the weights the optimizer trains."""
    return make_checkpoint(
        (ema.module if ema else raw).state_dict(), train_model=raw.state_dict() if ema else None,
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        epoch=epoch, best=best, bad_epochs=bad, history=history, resumes=resumes,
        config=to_dict(cfg), classes=config["classes"], dataset=config["dataset"],
        versions=config["versions"], params=count_params(raw), distillation=config.get("teacher"))


def configure_optimizer(cfg: TrainConfig, raw: nn.Module, steps_per_epoch: int):
    """AdamW with weight decay on weights only (not biases or norms), warm-up + cosine."""
    decay = [p for p in raw.parameters() if p.ndim > 1]
    no_decay = [p for p in raw.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.warmup_epochs, cfg.epochs, steps_per_epoch))
    return optimizer, scheduler


def class_weighted_loss(cfg: TrainConfig, train_counts: list[int], device) -> nn.Module:
    """Cross-entropy with inverse-frequency class weights (glioma is the smallest class)."""
    counts = np.asarray(train_counts, dtype=np.float64)
    k = len(counts)
    weight = (counts.sum() / (k * np.maximum(counts, 1))) if cfg.class_weighting else np.ones(k)
    return nn.CrossEntropyLoss(weight=torch.tensor(weight, dtype=torch.float32).to(device),
                               label_smoothing=cfg.label_smoothing)


def recipe_parts(cfg: TrainConfig, raw: nn.Module, train_counts: list[int], device, steps_per_epoch: int,
                 rank: int = 0):
    """-> (loss, optimizer, scheduler, weight average or None, mixer or None): what the recipe
    trains `raw` (the unwrapped module) with. One place for a worker and for the benchmarks that
    train the recipe without Ray (sweep.py, train.py)."""
    criterion = class_weighted_loss(cfg, train_counts, device)
    optimizer, scheduler = configure_optimizer(cfg, raw, steps_per_epoch)
    ema = EMA(raw, cfg.ema_decay) if cfg.ema_decay > 0 else None
    mixer = Mixer(cfg.mix_prob, cfg.mix_alpha, cfg.cutmix_share, cfg.seed * 1000 + rank) \
        if cfg.mix_prob > 0 else None
    return criterion, optimizer, scheduler, ema, mixer


@dataclass
class RunState:
    """What a run carries from epoch to epoch (and across resumes, in the checkpoint)."""

    start: int = 0
    best: float = -1.0
    bad: int = 0
    history: list = field(default_factory=list)
    resumes: list = field(default_factory=list)


def resume(raw: nn.Module, optimizer, scheduler, ema: EMA | None = None,
           steps_per_epoch: int = 0) -> RunState:
    """A replaced worker or a re-run driver continues from Ray's latest checkpoint."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return RunState()
    with ckpt.as_directory() as d:
        state = load_state(open(os.path.join(d, CKPT_FILE), "rb").read())
    raw.load_state_dict(state.get("train_model", state["model"]))
    if ema is not None:
        ema.module.load_state_dict(state["model"])
        ema.updates = (state["epoch"] + 1) * steps_per_epoch  # the decay's warm-up goes on
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    start = state["epoch"] + 1
    return RunState(start, state["best"], state["bad_epochs"], state["history"],
                    state.get("resumes", []) + [start])


def epoch_metrics(epoch: int, tr: torch.Tensor, cm: torch.Tensor, vloss: torch.Tensor,
                  classes: list[str], lr: float, seconds: float, train_seconds: float,
                  resumes: int, feed_wait: float = 0.0) -> dict:
    """One epoch's report: train sums [loss*n, correct, n] and the validation confusion
    matrix (both already summed over ranks) in the metrics schema (val_ prefixed).
    `feed_wait`: the seconds of `train_seconds` this rank waited for batches (a starved
    model: more CPUs for Ray Data, or the cache)."""
    vm = M.from_confusion(cm.numpy(), classes)
    n = max(1.0, tr[2].item())
    return {
        "epoch": epoch, "epochs_done": epoch + 1, "train_loss": tr[0].item() / n,
        "train_accuracy": tr[1].item() / n, "train_images": int(tr[2].item()),
        "val_loss": vloss.item() / max(1, vm["n"]), "lr": lr, "epoch_seconds": seconds,
        "train_seconds": train_seconds, "train_feed_wait_seconds": feed_wait,
        "train_images_per_s": tr[2].item() / max(train_seconds, 1e-9),
        **{f"val_{key}": v for key, v in vm.items()},
        "val_confusion": cm.numpy().astype(int).tolist(), "resumes": resumes,
    }


def report(metrics: dict, state: dict | None) -> None:
    """Every rank reports once per epoch; only rank 0 passes a checkpoint (state)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if state is not None:
            with open(os.path.join(tmp, CKPT_FILE), "wb") as f:
                f.write(dump_state(state))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        # the worker group's placement group travels with the report: a Tune driver that
        # stops this trial early removes it (Ray only reaps it where the State API works)
        pg = ray.util.get_current_placement_group()
        ray.train.report({**metrics, "placement_group": pg.id.hex() if pg else ""},
                         checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["cfg"])
    classes: list[str] = config["classes"]
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.set_num_threads(cfg.threads_per_worker or _threads())
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    device = ray.train.torch.get_device()
    # augmentation runs where the batch is, and differs by rank
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)

    model = create_model(cfg.model, len(classes), 1, image_size=cfg.image_size, **cfg.model_args,
                         pretrained=cfg.pretrained or None)
    # channels-last on every device: cuDNN's and oneDNN's convolutions both prefer it (CPU:
    # brainnet's training step at 160 px ~1.3x on one thread, benchmarks/train.py --only layout)
    model = to_channels_last(model)
    model = ray.train.torch.prepare_model(model)
    raw = model.module if hasattr(model, "module") else model  # evaluation runs this one
    steps = max(1, config["train_rows"] // world // cfg.batch_size)  # equal shards, drop_last
    criterion, optimizer, scheduler, ema, mixer = recipe_parts(cfg, raw, config["train_counts"], device,
                                                               steps, rank)
    run = resume(raw, optimizer, scheduler, ema, steps)  # the driver says so (progress.EpochLines)
    teacher = load_teacher(config["teacher"], device) if config.get("teacher") else None

    # uint8 batches, pinned on a GPU worker so the copy overlaps compute; augmentation and
    # normalisation happen on the device (engine.train_one_epoch)
    loader_kw = dict(batch_size=cfg.batch_size, dtypes={"x": torch.uint8, "label": torch.int64},
                     device="cpu", pin_memory=cfg.gpu, prefetch_batches=4 if cfg.gpu else 1)
    train_src = ShardBatches(ray.train.get_dataset_shard("train"), loader_kw, cfg.cache, True, True,
                             cfg.seed * 7919 + rank, pin=cfg.gpu)
    # each rank evaluates its own part of the validation rows (possibly none)
    val_src = ShardBatches(ray.train.get_dataset_shard("val"), loader_kw, cfg.cache, False, False,
                           0, pin=cfg.gpu)
    clock = Stopwatch(device)
    for epoch in range(run.start, cfg.epochs):
        t0 = clock.now()
        tr = train_one_epoch(model, train_src.epoch(epoch), criterion, optimizer, scheduler,
                             device, cfg.aug_strength, gen, amp=cfg.gpu, channels_last=True,
                             ema=ema, mixer=mixer, teacher=teacher).cpu()
        t_train = clock.now() - t0
        cm, vloss = evaluate(ema.module if ema else raw, val_src.epoch(epoch), len(classes), device,
                             amp=cfg.gpu, channels_last=True, tta=cfg.tta)
        metrics = epoch_metrics(epoch, tr, cm, vloss, classes, scheduler.get_last_lr()[0],
                                clock.now() - t0, t_train, len(run.resumes), train_src.wait)
        improved = metrics[METRIC] > run.best
        run.best, run.bad = (metrics[METRIC], 0) if improved else (run.best, run.bad + 1)
        metrics["best_val_macro_f1"] = run.best
        run.history.append({key: v for key, v in metrics.items() if key != "val_confusion"})
        # the time budget counts training seconds across resumes; ranks' clocks differ, so
        # they agree on stopping (one rank leaving early would hang the rest)
        spent = sum(h["epoch_seconds"] for h in run.history) / 60
        over = agree_any(cfg.time_budget_min > 0 and spent >= cfg.time_budget_min, device)
        stop = (cfg.patience > 0 and run.bad >= cfg.patience) or over
        state = _checkpoint_state(raw, ema, optimizer, scheduler, epoch, run.best, run.bad, run.history,
                                  run.resumes, cfg, config) if rank == 0 else None
        report(metrics, state)  # side effects on rank 0 only
        if rank == 0:  # after report() has persisted the checkpoint: history never runs ahead
            (open_location(config["run_uri"]) / "history.json").write_json(run.history)
        if stop:
            break


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
# (~160 images at 160 px) a decode task hands its blocks on as they fill. Reads stay one
# task a file, so a split decodes on at most as many CPUs as it has files.
FEED_BLOCK_BYTES = 4 << 20


def build_datasets(cfg: TrainConfig, version, manifest, pixels=None) -> dict:
    """Ray Data's train and val feeds: {'x': uint8 [B, S, S], 'label'} rows. From the
    version's shards (decoding each image), or with `pixels` = (root, pixels.json) from
    `data.pixels.ensure_pixels` from pixel shards already preprocessed at cfg.image_size."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # logs, not bars, in jobs
    ds = {}
    for split, limit in (("train", cfg.limit_train), ("val", cfg.limit_val)):
        if pixels:  # preprocessed already: only the stored bytes to reshape
            root, pix = pixels
            if pix["image_size"] != cfg.image_size:
                raise ConfigError(f"pixel shards {root.uri} are {pix['image_size']} px, "
                                  f"not {cfg.image_size}")
            files, fs, where = pixel_files(root, pix, split), root.fs, f"pixel shards {root.uri}"
            columns = ["x", "label"]
            decode = dict(fn=from_pixels, batch_size=None, batch_format="pyarrow")
        else:
            files, fs, where = split_files(version, manifest, split), version.fs, f"dataset {version.uri}"
            columns = ["image", "label"]
            decode = dict(fn=preprocess_batch, batch_size=32, batch_format="numpy")
        if not files:
            raise ConfigError(f"{where} has no {split} shards")
        # only the two columns are read (the rest of a row is metadata the feed never uses):
        # Ray Data's projection pushdown hands select_columns to the Parquet scanner
        # (read_parquet's columns= is deprecated and becomes this same select)
        d = ray.data.read_parquet(files, filesystem=fs).select_columns(columns)
        if limit:
            d = d.limit(limit)
        d = d.map_batches(fn_kwargs={"size": cfg.image_size}, **decode)
        d.context.target_max_block_size = FEED_BLOCK_BYTES
        ds[split] = d
    return ds


def prepare(cfg: TrainConfig):
    """Everything that can fail fast, before Ray starts a worker. -> (run name, dataset
    version, manifest, output location, the teacher's record or None). Fills the network's
    whole shape into cfg.model_args (TrainConfig.shape, then the factory's defaults), so that
    the run records all of it."""
    cfg.validate()
    check_model_name(cfg.model)
    if cfg.model == "ensemble":  # retraining an ensemble champion on its own recipe lands here
        raise ConfigError("an ensemble is not trained as one network: train its members (brainmri train "
                          "--seed S, one run each) and publish them as one with brainmri ensemble")
    cfg.model_args = full_shape(cfg.model, cfg.shape())
    name = check_name(cfg.name or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}", "run name")
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
    # read and checked once, here: what each worker loads again (training.distill)
    teacher = teacher_record(cfg, manifest["classes"], manifest_hash(manifest)) if cfg.teacher else None
    return name, version, manifest, out, teacher


@torch.no_grad()
def validation_logits(cfg: TrainConfig, state: dict, version, manifest: dict
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the validation rows training saw, for a checkpoint as it will be
    served with its flips but before any decision rule. One process: a few hundred images."""
    net = build_model({**state, "inference": inference_record(cfg.tta)})
    logits, labels = [], []
    for x, y in split_arrays(version, manifest, "val", cfg.image_size, cfg.limit_val):
        logits.append(net(to_model_input(torch.from_numpy(x))).float().numpy())
        labels.append(y)
    if not labels:
        raise ConfigError("no validation rows to score the model on (and to choose its decision rule on)")
    return np.concatenate(logits), np.concatenate(labels)


def choose_decision(cfg: TrainConfig, state: dict, version, manifest: dict,
                    scored: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """The decision rule, chosen on the validation rows training saw, for the best
    checkpoint as it will be served (with its flips): the glioma logit bias
    (models.decision.choose_logit_bias). `scored`: validation_logits already computed."""
    logits, labels = scored or validation_logits(cfg, state, version, manifest)
    groups = split_column(version, manifest, "val", "group", cfg.limit_val)  # halves keep them whole
    bias, chosen = choose_logit_bias(logits, labels, state["classes"], "glioma",
                                     cfg.decision_max_f1_drop, cfg.decision_max_accuracy_cost,
                                     groups=groups)
    fit, check = chosen["fitted"], chosen["held_out"]
    checked = (f"chosen on half of them (by {check['halves']}), accuracy on the other half "
               f"{check['accuracy_change']:+.4f}: "
               + ("kept" if chosen["adopted"] else "not kept, plain argmax")) if fit["bias"] else \
        "no bias raises glioma recall: plain argmax"
    print(f"brainmri: decision rule {chosen['rule']} = {fit['bias']:+.2f} on {chosen['n']} validation "
          f"images (glioma recall {chosen['before']['recall']:.4f} -> {fit['recall']:.4f}, macro-F1 "
          f"{chosen['before']['macro_f1']:.4f} -> {fit['macro_f1']:.4f}); {checked}")
    return inference_record(cfg.tta, bias, chosen)


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


def run_training(cfg: TrainConfig, callbacks=None, storage=None, progress=None,
                 tracking: Tracking | None = None) -> TrainResult:
    """Train (see the module docstring). `progress(line)`, when given, gets one line per
    epoch as the run goes (progress.EpochLines); `tracking`: an MLflow run (core.tracking)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    name, version, manifest, out, teacher = prepare(cfg)
    cfg.name = name
    classes = manifest["classes"]

    runs = storage or (out / "runs")
    run = runs / name
    check_same_network(run, cfg)
    check_same_teacher(run, teacher, cfg.teacher)
    train_counts = [manifest["counts"]["train"][c] for c in classes]
    train_rows = min(sum(train_counts), cfg.limit_train or 10**12)
    dataset_info = {"uri": version.uri, "name": manifest["name"], "version": manifest["version"],
                    "manifest_hash": manifest_hash(manifest)}
    # before Ray starts: a tracking server that does not answer fails here, in one line
    tracked = start_run(tracking and tracking.named("brainmri-train"), run.uri, name,  # None: off
                        {**to_dict(cfg), "dataset": dataset_info},
                        {"brainmri.dataset_version": manifest["version"]})
    init_ray()
    # streaming every epoch (cache off): decode once into pixel shards beside the version,
    # not once an epoch (data.pixels); the cached feed decodes once in the workers anyway, and
    # a quick run on the first N rows (limit_*) decodes just those rather than the version
    pixels = None
    if not (cfg.cache or cfg.limit_train or cfg.limit_val):
        with failing(tracked):
            pixels = ensure_pixels(version, manifest, cfg.image_size)
        dataset_info["pixels"] = pixels[0].uri
    (run / "config.json").write_json({"config": to_dict(cfg), "dataset": dataset_info, "teacher": teacher})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "classes": classes, "train_counts": train_counts,
                           "train_rows": train_rows, "dataset": dataset_info,
                           "versions": library_versions(), "run_uri": run.uri, "teacher": teacher},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.gpu,
                                     resources_per_worker=_resources(cfg)),
        datasets=build_datasets(cfg, version, manifest, pixels),
        dataset_config=_data_config(),
        run_config=RunConfig(
            name=name, storage_path=runs.path, storage_filesystem=runs.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute=METRIC,
                                               checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": worker_env()} if worker_env() else None,
            callbacks=[*(callbacks or []), *run_callbacks(tracked)]),
    )
    with failing(tracked), (EpochLines(run / "history.json", cfg.epochs, progress) if progress
                            else nullcontext()):
        result = trainer.fit()
    best_ckpt = result.get_best_checkpoint(metric=METRIC, mode="max") or result.checkpoint
    with best_ckpt.as_directory() as d:
        state = load_state(open(os.path.join(d, CKPT_FILE), "rb").read())
    history = (run / "history.json").read_json()  # the checkpoint's stops at its own epoch
    state["history"] = history  # the published model carries the whole run's curves
    if cfg.decision_rule != "argmax":
        state["inference"] = choose_decision(cfg, state, version, manifest)
    best = max(history, key=lambda h: h[METRIC])
    model_uri = None
    if cfg.publish:
        model_uri = publish_model(out, cfg.model, state, best,
                                  stage="candidate" if cfg.candidate else "released").uri
    (run / "summary.json").write_json({"best": best, "model": model_uri, "epochs_run": len(history),
                                       "seconds": time.time() - t0})
    finish_run(tracked, history, model_uri, (META_FILE, MODEL_FILE))
    return TrainResult(run.uri, model_uri, best, history, time.time() - t0)
