"""Data-parallel training with Ray Train over a Parquet dataset version.

    driver (`run_training`)                     each train worker (`train_loop_per_worker`)
    ------------------------------------------  ---------------------------------------------
    validate config, dataset, storage, model    model -> DDP (prepare_model), AdamW, warm-up+cosine
    Ray Data: read_parquet -> preprocess        for each epoch:
      (decode, fit, normalise; streaming)         train_one_epoch on its own shard, augmenting
    TorchTrainer(N workers, RunConfig(storage))   evaluate: every worker a stride of val batches,
    publish best checkpoint as a model version      confusion matrix all-reduced -> same metrics
                                                  rank 0: checkpoint + history; all: report()

The driver never materialises the dataset; workers read their shard with
`get_dataset_shard`. Re-running with the same run name resumes from the latest checkpoint,
and a failed worker is replaced and resumes the same way (FailureConfig).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from . import metrics as M
from .checkpoints import CKPT_FILE, dump_state, library_versions, load_state, publish_model
from .config import ConfigError, TrainConfig, from_dict, to_dict
from .datasets import manifest_hash, resolve_dataset, split_files
from .models import count_params, create_model
from .storage import check_name, open_location, worker_env
from .transforms import MEAN, STD, augment, normalise, preprocess_batch, to_unit

METRIC = "val_macro_f1"


# -- worker side ------------------------------------------------------------------------------
def _allreduce(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    total = max(warm + 1, cfg.epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))
    return f


def train_one_epoch(model, loader, criterion, optimizer, scheduler, cfg, device, gen, scaler=None):
    model.train()
    loss_sum = torch.zeros(3, dtype=torch.float64)  # loss*n, correct, n
    for batch in loader:
        x = to_unit(batch["x"])
        x = normalise(augment(x, cfg.aug_strength, gen)).to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        if cfg.gpu:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.gpu):
            out = model(x)
            loss = criterion(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = y.shape[0]
        loss_sum += torch.tensor([loss.item() * n, (out.argmax(1) == y).sum().item(), n],
                                 dtype=torch.float64)
    return _allreduce(loss_sum)


@torch.no_grad()
def evaluate(model, loader, num_classes, device, rank=0, world=1, use_amp=False):
    """Each rank takes every world-th batch; returns all-reduced (confusion, loss sum)."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    ce = nn.CrossEntropyLoss(reduction="sum")
    for i, batch in enumerate(loader):
        if i % world != rank:
            continue
        x = normalise(to_unit(batch["x"])).to(device)
        y = batch["label"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x).float()
        loss_sum += ce(out, y).item()
        pred = out.argmax(1).cpu()
        cm += torch.from_numpy(M.confusion(y.cpu().numpy(), pred.numpy(), num_classes)).double()
    return _allreduce(cm), _allreduce(loss_sum)


class ShardBatches:
    """A worker's batches for one epoch.

    The first epoch streams the Ray Data shard. With `cache`, the deterministic preprocessed
    uint8 arrays are kept (image_size^2 bytes an image: 113 MB for all 4.4k training images
    at 160 px) and later epochs reshuffle them in memory instead of decoding JPEGs again;
    random augmentation still happens per batch, after the cache. For datasets too large for
    worker memory, turn `cache` off and every epoch streams."""

    def __init__(self, it, loader_kw: dict, cache: bool, shuffle: bool, drop_last: bool, seed: int):
        self.it, self.kw, self.cache, self.shuffle, self.drop_last = it, loader_kw, cache, shuffle, drop_last
        self.seed, self.x, self.y = seed, None, None

    def epoch(self, epoch: int):
        bs = self.kw["batch_size"]
        if self.x is None:
            xs, ys = [], []
            extra = dict(local_shuffle_buffer_size=4 * bs, local_shuffle_seed=self.seed + epoch) \
                if self.shuffle else {}
            for b in self.it.iter_torch_batches(**self.kw, drop_last=self.drop_last, **extra):
                if self.cache:
                    xs.append(b["x"])
                    ys.append(b["label"])
                yield b
            if self.cache and xs:
                self.x, self.y = torch.cat(xs), torch.cat(ys)
            return
        n = len(self.y)
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        stop = n - (n % bs) if self.drop_last else n
        for i in range(0, stop, bs):
            idx = order[i:i + bs]
            yield {"x": self.x[idx], "label": self.y[idx]}


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["cfg"])
    classes: list[str] = config["classes"]
    k = len(classes)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.threads_per_worker or max(1, (os.cpu_count() or 2) // max(1, ctx.get_local_world_size()))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # augmentation differs by rank

    device = ray.train.torch.get_device()
    model = create_model(cfg.model, k, 1, image_size=cfg.image_size, **cfg.model_args,
                         pretrained=cfg.pretrained or None)
    if cfg.gpu:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    raw = model.module if hasattr(model, "module") else model

    counts = np.asarray(config["train_counts"], dtype=np.float64)
    weight = (counts.sum() / (k * np.maximum(counts, 1))) if cfg.class_weighting else np.ones(k)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor(weight, dtype=torch.float32).to(device),
                                    label_smoothing=cfg.label_smoothing)
    decay = [p for n, p in raw.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in raw.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps = max(1, config["train_rows"] // (cfg.batch_size * world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))

    start, best, bad, history, resumes = 0, -1.0, 0, [], []
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume: a replaced worker or a re-run driver
        with ckpt.as_directory() as d:
            state = load_state(open(os.path.join(d, CKPT_FILE), "rb").read())
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, best, bad, history = state["epoch"] + 1, state["best"], state["bad_epochs"], state["history"]
        resumes = state.get("resumes", []) + [start]
        if rank == 0:
            print(f"brainmri: resumed from the checkpoint of epoch {start - 1}")

    # batches stay on the CPU for augmentation; pinned so the copy to a GPU overlaps compute
    loader_kw = dict(batch_size=cfg.batch_size, dtypes={"x": torch.uint8, "label": torch.int64},
                     device="cpu", pin_memory=cfg.gpu, prefetch_batches=4 if cfg.gpu else 1)
    train_src = ShardBatches(ray.train.get_dataset_shard("train"), loader_kw, cfg.cache, True, True,
                             cfg.seed * 7919 + rank)
    val_src = ShardBatches(ray.train.get_dataset_shard("val"), loader_kw, cfg.cache, False, False, 0)
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        tr = train_one_epoch(model, train_src.epoch(epoch), criterion, optimizer, scheduler, cfg,
                             device, gen)
        t_train = time.time() - t0
        cm, vloss = evaluate(model, val_src.epoch(epoch), k, device, rank, world,
                             use_amp=cfg.gpu)
        vm = M.from_confusion(cm.numpy(), classes)
        metrics = {
            "epoch": epoch, "epochs_done": epoch + 1, "train_loss": tr[0].item() / max(1, tr[2].item()),
            "train_accuracy": tr[1].item() / max(1, tr[2].item()), "train_images": int(tr[2].item()),
            "val_loss": vloss.item() / max(1, vm["n"]), "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": time.time() - t0, "train_images_per_s": tr[2].item() / t_train,
            **{f"val_{key}": v for key, v in vm.items()},
            "val_confusion": cm.numpy().astype(int).tolist(), "resumes": len(resumes),
        }
        improved = metrics[METRIC] > best
        best, bad = (metrics[METRIC], 0) if improved else (best, bad + 1)
        metrics["best_val_macro_f1"] = best
        history.append({key: v for key, v in metrics.items() if key != "val_confusion"})
        # the time budget counts training seconds across resumes; ranks' clocks differ, so they
        # agree on stopping through an all-reduce (one rank leaving early would hang the rest)
        spent = sum(h["epoch_seconds"] for h in history) / 60
        over = _allreduce(torch.tensor([float(cfg.time_budget_min > 0 and spent >= cfg.time_budget_min)]))
        stop = (cfg.patience > 0 and bad >= cfg.patience) or over.item() > 0
        checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:  # side effects on rank 0 only
                state = {
                    "format": "brainmri.checkpoint/1", "model": raw.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch, "best": best, "bad_epochs": bad, "history": history,
                    "resumes": resumes,
                    "config": to_dict(cfg), "classes": classes,
                    "preprocess": {"image_size": cfg.image_size, "mean": MEAN, "std": STD,
                                   "fit": "longest side, centred, zero padded",
                                   "intensity": "percentile 0.5-99.5 to 0-255"},
                    "dataset": config["dataset"], "versions": config["versions"],
                    "params": count_params(raw),
                }
                with open(os.path.join(tmp, CKPT_FILE), "wb") as f:
                    f.write(dump_state(state))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                run = open_location(config["run_uri"])
                (run / "history.json").write_json(history)
            # the worker group's placement group travels with the report: a Tune driver that
            # stops this trial early removes it (Ray only reaps it where the State API works)
            pg = ray.util.get_current_placement_group()
            ray.train.report({**metrics, "placement_group": pg.id.hex() if pg else ""},
                             checkpoint=checkpoint)
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


def init_ray() -> None:
    """Start (or join, under `ray job submit`) Ray; actors started from this driver (Tune
    trials, Train controllers) get the non-secret S3 settings the driver resolved."""
    import ray

    if not ray.is_initialized():
        # under `ray job submit` (RAY_ADDRESS set) the job's own runtime_env already applies
        env = {} if os.environ.get("RAY_ADDRESS") else worker_env()
        ray.init(log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": env} if env else None)


def build_datasets(cfg: TrainConfig, version, manifest) -> dict:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # logs, not bars, in jobs
    ds = {}
    for split, limit in (("train", cfg.limit_train), ("val", cfg.limit_val)):
        files = split_files(version, manifest, split)
        if not files:
            raise ConfigError(f"dataset {version.uri} has no {split} shards")
        d = ray.data.read_parquet(files, filesystem=version.fs).select_columns(["image", "label"])
        if limit:
            d = d.limit(limit)
        ds[split] = d.map_batches(preprocess_batch, fn_kwargs={"size": cfg.image_size},
                                  batch_size=32, batch_format="numpy")
    return ds


def prepare(cfg: TrainConfig):
    """Everything that can fail fast, before Ray starts a worker."""
    cfg.validate()
    name = check_name(cfg.name or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}", "run name")
    version, manifest = resolve_dataset(cfg.data, cfg.dataset)
    out = open_location(cfg.out, check=True)
    try:  # builds the network once on the driver: bad model_args fail here, not in workers
        create_model(cfg.model, len(manifest["classes"]), 1, image_size=cfg.image_size,
                     **cfg.model_args)
    except TypeError as e:
        raise ConfigError(f"model_args do not fit {cfg.model}: {e}") from None
    return name, version, manifest, out


def run_training(cfg: TrainConfig, callbacks=None, storage=None) -> TrainResult:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    name, version, manifest, out = prepare(cfg)
    cfg.name = name
    classes = manifest["classes"]
    init_ray()

    runs = storage or (out / "runs")
    run = runs / name
    train_counts = [manifest["counts"]["train"][c] for c in classes]
    train_rows = min(sum(train_counts), cfg.limit_train or 10**12)
    dataset_info = {"uri": version.uri, "name": manifest["name"], "version": manifest["version"],
                    "manifest_hash": manifest_hash(manifest)}
    (run / "config.json").write_json({"config": to_dict(cfg), "dataset": dataset_info})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "classes": classes, "train_counts": train_counts,
                           "train_rows": train_rows, "dataset": dataset_info,
                           "versions": library_versions(), "run_uri": run.uri},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.gpu,
                                     resources_per_worker=_resources(cfg)),
        datasets=build_datasets(cfg, version, manifest),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=name, storage_path=runs.path, storage_filesystem=runs.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute=METRIC,
                                               checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": worker_env()} if worker_env() else None,
            callbacks=callbacks),
    )
    result = trainer.fit()
    best_ckpt = result.get_best_checkpoint(metric=METRIC, mode="max") or result.checkpoint
    with best_ckpt.as_directory() as d:
        state = load_state(open(os.path.join(d, CKPT_FILE), "rb").read())
    history = (run / "history.json").read_json()  # the checkpoint's stops at its own epoch
    state["history"] = history  # the published model carries the whole run's curves
    best = max(history, key=lambda h: h[METRIC])
    model_uri = None
    if cfg.publish:
        model_uri = publish_model(out, cfg.model, state, best).uri
    (run / "summary.json").write_json({"best": best, "model": model_uri, "epochs_run": len(history),
                                       "seconds": time.time() - t0})
    return TrainResult(run.uri, model_uri, best, history, time.time() - t0)
