"""Training benchmarks on this machine; prints figures and ratios from one run.

1. Data pipeline alone: Ray Data (Parquet -> decode/preprocess -> torch batches) vs a plain
   torchvision ImageFolder + DataLoader over the JPEG folder, same preprocessing, images/s
   (passes alternating), and the CPU an image on each side (Ray: every process on the
   machine; the peer: its own processes).
2. trainer: TorchTrainer with 1 worker vs the same loop without Ray (`build_recipe` +
   `engine.fit` on the same rows, preprocessed once, in memory as the worker's cache
   holds them), same model, batch, threads; each of --rounds Ray runs (default 9) between two
   plain runs; Ray overhead in % (the median of the rounds') and every epoch's rate (the
   scatter tells whether a difference is real).
3. Per registered model: parameter count and estimated epoch time (train steps timed).
4. feed: `brainmri train`'s default recipe with the worker cache off (every epoch streams
   the pixel shards, data.pixels: datasets larger than memory) vs on, epochs after the first,
   same script, ratio; then the one-time pixel-shard build, the Ray Data feeds alone on one
   CPU (pixel shards; decoding JPEGs), images/s per CPU, against the peer: a plain pyarrow
   reader of the same shard files (one thread, no Ray); each Parquet compression (none, lz4,
   zstd) read by both; and the CPUs a GPU needs to be kept fed (its img/s from
   benchmarks/results/gpu-h200-*.json).
5. default: `brainmri train`'s default (2 workers, full recipe with augmentation, cache on)
   per epoch vs a plain single-process loop with the same recipe (same model, loss, AdamW,
   schedule, augmentation, batch; data preprocessed in memory; torch threads = all cores);
   the plain epochs run before and after the Ray run so load drift hits both.
6. layout: the recipe's network's training step on one thread, contiguous vs channels-last
   (what every worker runs), alternating rounds.
7. distill: the recipe's training loop on one thread alone vs taught by an ensemble of
   --members copies of its network (`--teacher`, training.distill), alternating rounds:
   what a teacher adds to every step.

Ray is started here as `brainmri train` starts it: one logical CPU per core.

    python -m benchmarks.train --lake ./lake/datasets/brain-tumor-mri   # after `brainmri ingest ... ./lake`
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from benchmarks.harness import REPO, data_root, own_cpu_s
from brainmri.config import RECIPE_SHAPES, TrainConfig
from brainmri.core.cluster import init_ray
from brainmri.data.datasets import resolve_dataset, split_column
from brainmri.data.transforms import preprocess
from brainmri.models.zoo import count_params, create_model, list_models


def ray_data_pass(lake: str, size: int, limit: int, batch: int):
    """(a function timing one pass of the decoding feed (a cached run's first epoch), iterated
    here as a worker iterates it, in images/s; the source paths of the training rows a pass
    reads, in its order). A process's first pass is cold (Ray Data's first execution in it,
    its tasks' first imports)."""
    from brainmri.training.train import BlockBatches, build_datasets

    cfg = TrainConfig(data=lake, image_size=size, limit_train=limit, limit_val=1)
    version, manifest = resolve_dataset(cfg.data, cfg.dataset)  # a store, dataset or version URI

    def one() -> float:
        ds = build_datasets(cfg, version, manifest)["train"]
        t0, n = time.time(), 0
        for b in BlockBatches(ds, size).iter_torch_batches(batch_size=batch):
            n += len(b["label"])
        return n / (time.time() - t0)

    paths = split_column(version, manifest, "train", "path", limit)
    if paths is None:
        raise SystemExit(f"--lake {lake}: its shards have no 'path' column (an older ingest); ingest again")
    return one, [str(p) for p in paths]


def imagefolder_pass(src: str, size: int, paths: list[str], batch: int, workers: int):
    """The peer: a function timing one pass, in images/s, of a torchvision ImageFolder +
    DataLoader (`workers` processes, started each pass) over the same files as the Ray side
    (`paths`, relative to `src`, in its order), with the same preprocessing. The same files,
    not a sample of the folder: decoding costs differ from scan to scan (their sizes differ)."""
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    def load(path):  # the same deterministic preprocessing, from the file
        with open(path, "rb") as f:
            return torch.from_numpy(preprocess(f.read(), size))

    ds = ImageFolder(os.path.join(src, "Training"), loader=load)
    where = {os.path.relpath(p, src): i for i, (p, _) in enumerate(ds.samples)}
    missing = [p for p in paths if p not in where]
    if missing:
        raise SystemExit(f"--source {src}: {len(missing)} of the lake's training files are not in it "
                         f"(e.g. {missing[0]}); pass the folder the lake was ingested from")
    subset = Subset(ds, [where[p] for p in paths])

    def one() -> float:
        t0, n = time.time(), 0
        for _x, y in DataLoader(subset, batch_size=batch, num_workers=workers):
            n += len(y)
        return n / (time.time() - t0)

    return one


def bench_trainer(lake, model_name, size, batch, limit, epochs, threads, rounds) -> dict:
    """TorchTrainer with 1 worker vs the same loop without Ray: the same rows (preprocessed once,
    in memory: the worker's cache after its first epoch), model, loss, AdamW + schedule, batch
    and torch threads, augmentation, weight averaging and mixing off (the bare step, where a
    fixed cost shows most). Training images/s per epoch (not validation), each Ray run's first
    epoch left out. Each of the `rounds` Ray runs sits between two plain runs, and the overhead
    is the median over rounds of 1 - Ray / (mean of the two plain runs beside it): on a shared
    or warming machine the rate drifts by more than the effect (it moved 180 -> 150 img/s within
    one run here), and a bracket cancels the drift where a pooled median cannot."""
    from brainmri.training.train import run_training

    kw = dict(model=model_name, image_size=size, batch_size=batch, epochs=epochs + 1, limit_train=limit,
              limit_val=64, aug_strength=0.0, ema_decay=0.0, mix_prob=0.0)
    plain = PlainRecipe(TrainConfig(data=lake, **kw), threads)
    cfg = TrainConfig(data=lake, out=tempfile.mkdtemp(prefix="bench-train-"), num_workers=1,
                      threads_per_worker=threads, patience=0, publish=False, keep_checkpoints=1, **kw)

    def plain_run():
        return [len(plain.yt) / s for s in plain.epochs(epochs, train_only=True)]

    p_runs, t_runs = [plain_run()], []
    for r in range(rounds):
        hist = run_training(replace(cfg, name=f"bench-{r}")).history
        t_runs.append([h["train_images_per_s"] for h in hist[1:]])  # epoch 0 also decodes
        p_runs.append(plain_run())
    p_med, t_med = ([float(np.median(x)) for x in runs] for runs in (p_runs, t_runs))
    per_round = [1 - t / ((p_med[r] + p_med[r + 1]) / 2) for r, t in enumerate(t_med)]
    p_rates, t_rates = sum(p_runs, []), sum(t_runs, [])
    p, t = float(np.median(p_rates)), float(np.median(t_rates))
    return {"plain": p, "trainer": t, "overhead": float(np.median(per_round)), "per_round": per_round,
            "pooled_overhead": 1 - t / p, "plain_rates": p_rates, "trainer_rates": t_rates}


class PlainRecipe:
    """The recipe of `cfg` trained in this process without Ray, on the dataset's rows read and
    preprocessed once (as a worker's cache holds them), with the recipe's own parts
    (`build_recipe`) and epoch loop (`engine.fit`): what a Ray worker trains."""

    def __init__(self, cfg: TrainConfig, threads: int):
        from brainmri.data.datasets import split_arrays
        from brainmri.training.engine import FitState, ShardBatches, to_channels_last
        from brainmri.training.recipe import build_recipe

        version, manifest = resolve_dataset(cfg.data, cfg.dataset)
        self.classes = manifest["classes"]

        def rows(split, n):
            xs, ys = zip(*split_arrays(version, manifest, split, cfg.image_size, n), strict=True)
            return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

        self.xt, self.yt = rows("train", cfg.limit_train)
        xv, yv = rows("val", cfg.limit_val)
        torch.set_num_threads(threads)
        torch.manual_seed(cfg.seed)
        self.cfg, self.state = cfg, FitState()
        # channels-last, as a Ray worker runs it (train_loop_per_worker)
        self.model = to_channels_last(create_model(cfg.model, len(self.classes), 1,
                                                   image_size=cfg.image_size, **cfg.shape()))
        counts = np.bincount(self.yt.numpy(), minlength=len(self.classes)).tolist()
        self.recipe = build_recipe(cfg, self.model, counts, torch.device("cpu"),
                                   max(1, len(self.yt) // cfg.batch_size))
        self.train = ShardBatches.from_tensors(self.xt, self.yt, cfg.batch_size, True, True, cfg.seed)
        self.val = ShardBatches.from_tensors(xv, yv, cfg.batch_size, False, False, 0)
        self.no_val = ShardBatches.from_tensors(xv[:0], yv[:0], cfg.batch_size, False, False, 0)

    def epochs(self, k: int, train_only: bool = False) -> list[float]:
        """Seconds of each of `k` more epochs (training and validation, or training only)."""
        from brainmri.training.engine import fit

        self.state = fit(self.model, self.recipe, self.train, self.no_val if train_only else self.val,
                         self.classes, torch.device("cpu"), epochs=self.state.start + k, state=self.state)
        return [h["epoch_seconds"] for h in self.state.history[-k:]]


def _history(lake, out, name, limit, limit_val, epochs, batch, **kw) -> list[dict]:
    """A `brainmri train` run with the default recipe (2 workers, augmentation) but `kw`."""
    from brainmri.training.train import run_training

    cfg = TrainConfig(data=lake, out=out, name=name, batch_size=batch, epochs=epochs, limit_train=limit,
                      limit_val=limit_val, patience=0, publish=False, keep_checkpoints=1, **kw)
    return run_training(cfg).history


def bench_feed(lake, size, limit, limit_val, epochs, batch, rounds: int = 1) -> dict:
    """Per-epoch seconds (median of the epochs after the first: the first decodes in both)
    of the default recipe at `size` px with the worker cache on and off, and the consumers'
    summed wait for batches. `rounds` > 1: cached then streamed, then streamed then cached, and
    so on (a machine that drifts slows both alike); each mode's figure is the median of its
    runs', and each round's ratio is kept. The version's pixel shards are built first, as the full-size
    default builds them with the cache off (a run limited to N rows streams them but would
    not build them)."""
    from brainmri.data.datasets import resolve_dataset
    from brainmri.data.pixels import ensure_pixels

    version, manifest = resolve_dataset(lake, "brain-tumor-mri")
    ensure_pixels(version, manifest, size)
    out = tempfile.mkdtemp(prefix="bench-feed-")
    runs = {"cached": [], "streamed": []}
    for r in range(rounds):
        for cache in (True, False) if r % 2 == 0 else (False, True):
            hist = _history(lake, out, f"feed-{r}-{int(cache)}", limit, limit_val, epochs, batch, cache=cache,
                            image_size=size)
            later = hist[1:] or hist
            runs["cached" if cache else "streamed"].append({
                "epoch_s": float(np.median([h["epoch_seconds"] for h in later])),
                "wait_s": float(np.median([h["train_feed_wait_seconds"] for h in later]))})
    res = {mode: {k: float(np.median([x[k] for x in rs])) for k in ("epoch_s", "wait_s")}
           for mode, rs in runs.items()}
    res["ratio"] = res["streamed"]["epoch_s"] / res["cached"]["epoch_s"]
    res["round_ratios"] = [st["epoch_s"] / c["epoch_s"] for c, st in zip(runs["cached"], runs["streamed"])]
    return res


def plain_read(files, fs, size: int) -> int:
    """The peer of the pixel feed: each pixel-shard file read whole by pyarrow on one thread,
    its x column viewed as uint8 [N, S, S] (data.pixels.from_pixels), no Ray; rows read."""
    import pyarrow.parquet as pq

    from brainmri.data.pixels import from_pixels

    n = 0
    for f in files:
        n += len(from_pixels(pq.read_table(f, filesystem=fs, columns=["x", "label"], use_threads=False),
                             size)["x"])
    return n


def machine_cpu_s() -> float:
    """CPU-seconds spent so far by every process on this machine (/proc/stat, in ticks of
    10 ms): what a feed costs wherever Ray runs its parts (its executor thread, tasks,
    daemons), on a quiet machine. A pass of a fast feed is a few ticks: sum many."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    busy = sum(ticks[:3]) + sum(ticks[5:7])  # user nice system irq softirq (not idle, iowait, steal)
    return busy / os.sysconf("SC_CLK_TCK")


@contextmanager
def one_core():
    """Every thread of this process on one core while a feed or its peer is timed: the
    consumer, a pixel feed's read-ahead thread, Ray Data's executor threads (started by
    threads already pinned) and Ray's core-worker threads. Ray's daemons are other processes:
    machine_cpu_s counts them."""
    before = os.sched_getaffinity(0)

    def pin(cores):
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except OSError:  # a thread that ended meanwhile
                pass

    pin({min(before)})
    try:
        yield
    finally:
        pin(before)


def enough(passes: int, min_s: float = 0.0):
    """Pass numbers 0, 1, ...: at least `passes` of them, and more until `min_s` seconds have
    gone since the first."""
    start, p = time.perf_counter(), 0
    while p < passes or time.perf_counter() - start < min_s:
        yield p
        p += 1


def ray_feed(ds, batch, size, passes=3, shuffle=0, pixels=None, min_s=0.0) -> list[dict]:
    """A feed dataset on one CPU, iterated as a training worker does (train.BlockBatches,
    its local shuffle when `shuffle`; `pixels`: the PixelReader of a pixel-shard feed), `passes`
    passes and more until `min_s` seconds have gone, each pass:
    {rate: images/s of the whole pass, first_s: seconds to its first batch (Ray Data starting
    the pass's execution, and for a pixel feed the first file's read), n: images, cpu_s:
    CPU-seconds of the whole machine}."""
    from ray.data import ExecutionResources

    from brainmri.training.train import BlockBatches

    ds.context.execution_options.resource_limits = ExecutionResources(cpu=1)
    # the limit is the resource allocator's to hold: the decoding feed turns it off (it would
    # run one task on any number of CPUs), so it is turned back on for this 1-CPU figure
    ds.context.op_resource_reservation_enabled = True
    out = []
    for p in enough(passes, min_s):
        kw = dict(local_shuffle_buffer_size=shuffle, local_shuffle_seed=p) if shuffle else {}
        c0, t0, n, first = machine_cpu_s(), time.perf_counter(), 0, None
        for b in BlockBatches(ds, size, pixels).iter_torch_batches(batch_size=batch, **kw):
            n += len(b["label"])
            if first is None:
                first = time.perf_counter() - t0
        total, cpu = time.perf_counter() - t0, machine_cpu_s() - c0
        first = total if first is None else first  # no batch: the pass was all start-up
        out.append({"rate": n / total, "first_s": first, "n": n, "cpu_s": cpu})
    return out


def best(passes: list[dict]) -> dict:
    """The best pass of ray_feed (its rate), with the best start-up seen, and images per
    CPU-second of the whole machine over all the passes."""
    return {"rate": max(p["rate"] for p in passes), "first_s": min(p["first_s"] for p in passes),
            "per_cpu_s": sum(p["n"] for p in passes) / max(sum(p["cpu_s"] for p in passes), 1e-2)}


def rewrite_shards(files, fs, compression: str, folder: str) -> list[str]:
    """Copies of pixel-shard files written with another Parquet `compression` (as
    data.pixels._write_part writes them), for the compression comparison."""
    import pyarrow.parquet as pq

    out = []
    for i, f in enumerate(files):
        path = os.path.join(folder, f"{compression}-{i}.parquet")
        pq.write_table(pq.read_table(f, filesystem=fs), path, compression=compression, use_dictionary=False)
        out.append(path)
    return out


def bench_feed_rate(lake, size, limit, batch, passes=3, cpu_passes=10, cpu_s=2.0) -> dict:
    """The feeds alone, images/s: a plain pyarrow reader of the train pixel shards (the peer,
    no Ray) and the pixel feed of the same files (what a streamed epoch does: Ray Data deals
    the rows, this process reads them; best pass: warm, its start-up included; and with the
    local shuffle a training worker adds), both with this process on one core (`one_core`);
    Ray Data decoding the version's JPEGs on 1 CPU (its resource limit; what the cached first epoch and a
    pixel-shard build do), the decode itself in this process (images per CPU-second), the
    one-time pixel-shard build of train + val on all CPUs, and the shards rewritten with each
    Parquet compression, read by both, `cpu_passes` passes each and more until `cpu_s` seconds
    have gone (for images per CPU-second of the whole machine: a pass is a few 10 ms ticks, and
    Ray's daemons tick on the other core meanwhile: ten passes of the plain reader, 0.4 s, gave
    0.57-1.48 for the feed/plain ratio of that figure in four runs)."""
    import pyarrow.fs as pafs

    from brainmri.core.storage import open_location
    from brainmri.data.datasets import read_split
    from brainmri.data.pixels import (
        COMPRESSION,
        PixelReader,
        build_pixels,
        pixel_files,
        pixels_root,
        read_pixels,
    )
    from brainmri.data.transforms import preprocess_many
    from brainmri.training.train import build_datasets

    cfg = TrainConfig(data=lake, image_size=size, limit_train=limit, limit_val=1)
    version, manifest = resolve_dataset(cfg.data, cfg.dataset)  # a store, dataset or version URI
    t0 = time.time()
    pix = build_pixels(version, manifest, size)  # a fresh build (a new attempt; same rows)
    out = {"pixels_build_s": time.time() - t0, "pixels_rows": sum(s["rows"] for s in pix["shards"])}
    root = pixels_root(version, size)
    files = pixel_files(root, pix, "train")
    train_shards = [s for s in pix["shards"] if s["split"] == "train"]  # in the order of `files`
    out["train_rows"], out["compression"] = pix["rows"]["train"], COMPRESSION
    # the peer reads whole files: so does a rank of the feed (data.pixels.PixelReader)
    whole = replace(cfg, limit_train=0, num_workers=1)
    by_codec, tmp = {}, tempfile.mkdtemp(prefix="bench-codec-")
    for codec in ("none", "lz4", "zstd"):
        ours = codec == COMPRESSION
        paths, fs = (files, root.fs) if ours else (rewrite_shards(files, root.fs, codec, tmp),
                                                   pafs.LocalFileSystem())
        plain, images, c0 = [], 0, machine_cpu_s()
        with one_core():
            for _ in enough(cpu_passes, cpu_s):
                t0 = time.perf_counter()
                n = plain_read(paths, fs, size)
                plain.append(n / (time.perf_counter() - t0))
                images += n
        plain_cpu = images / max(machine_cpu_s() - c0, 1e-2)
        if ours:
            ds = build_datasets(whole, version, manifest, (root, pix))["train"]
            reader = PixelReader(root.uri, size)
        else:  # what build_datasets reads, from the copies
            copies = {"image_size": size, "shards": [{**s, "path": os.path.basename(p)} for s, p in
                                                     zip(train_shards, paths, strict=True)]}
            ds, reader = read_pixels(open_location(tmp), copies, "train"), PixelReader(tmp, size)
        with one_core():
            passes_fed = ray_feed(ds, batch, size, cpu_passes, pixels=reader, min_s=cpu_s)
        fed = best(passes_fed)
        by_codec[codec] = {"plain": max(plain), "plain_per_cpu_s": plain_cpu, "ray": fed["rate"],
                           "ray_first_s": fed["first_s"],
                           "ray_per_cpu_s": fed["per_cpu_s"], "passes": (len(plain), len(passes_fed)),
                           "mb": sum(i.size for i in fs.get_file_info(paths)) / 1e6}
    out["codecs"] = by_codec
    ds = build_datasets(whole, version, manifest, (root, pix))["train"]
    with one_core():
        out["pixels_shuffled_1cpu"] = best(ray_feed(ds, batch, size, passes, shuffle=4 * batch,
                                                    pixels=PixelReader(root.uri, size)))["rate"]
    ds = build_datasets(cfg, version, manifest)["train"]
    out["ray_data_1cpu"] = best(ray_feed(ds, batch, size, 2))["rate"]
    blobs = []
    for b in read_split(version, manifest, "train", ["image"], 64):
        blobs += b.column("image").to_pylist()
        if len(blobs) >= min(limit or 512, 512):
            break
    c0 = time.process_time()
    preprocess_many(blobs, size)
    out["decode_per_cpu_s"] = len(blobs) / (time.process_time() - c0)
    return out


def gpu_rates() -> dict:
    """Training img/s a GPU reached in benchmarks/results/gpu-*.json (benchmarks/gpu.py)."""
    import glob
    import json

    rates = {}
    for path in sorted(glob.glob(str(REPO / "benchmarks" / "results" / "gpu-*.json"))):
        for m in json.load(open(path)).get("models", []):
            rates[(m["model"], m["image_size"])] = (m["images_per_s"], os.path.basename(path))
    return rates


def bench_default(lake, limit, limit_val, epochs, batch, threads) -> dict:
    """`brainmri train`'s default per epoch vs a plain loop with the same recipe; the plain
    epochs run before and after the Ray run (each side's first epoch is left out)."""
    plain_run = PlainRecipe(TrainConfig(data=lake, batch_size=batch, epochs=epochs, limit_train=limit,
                                        limit_val=limit_val), threads)
    plain = plain_run.epochs(2)[1:]
    hist = _history(lake, tempfile.mkdtemp(prefix="bench-default-"), "default", limit, limit_val, epochs,
                    batch)
    plain += plain_run.epochs(1)
    ray_s = float(np.median([h["epoch_seconds"] for h in hist[1:] or hist]))
    return {"ray_s": ray_s, "plain_s": float(np.mean(plain)), "ratio": ray_s / float(np.mean(plain)),
            "workers": TrainConfig().num_workers, "rows": len(plain_run.yt)}


SECTIONS = ["data", "trainer", "models", "feed", "default", "layout", "distill"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lake", default="./lake", help="store or dataset URI written by `brainmri ingest`")
    ap.add_argument("--source", default=str(data_root()),
                    help="the Kaggle-layout JPEG folder for the ImageFolder peer (default: %(default)s)")
    ap.add_argument("--size", type=int, default=160, help="image size (default 160, the CPU recipe)")
    ap.add_argument("--batch", type=int, default=64, help="batch size")
    ap.add_argument("--limit", type=int, default=1024, help="images for the pipeline benchmarks")
    ap.add_argument("--feed-rounds", type=int, default=1,
                    help="feed: runs of each mode, cached and streamed alternating in order (default 1)")
    ap.add_argument("--data-passes", type=int, default=9,
                    help="data: passes of each side, at least 2 (the first is cold)")
    ap.add_argument("--model", default="brainnet", help="model for the Ray-vs-plain comparison")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model in the model table")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the feed and default runs")
    ap.add_argument("--rounds", type=int, default=9,
                    help="trainer: Ray runs, each between two plain runs (a round alone: -8..+14 %%); "
                         "layout, distill: alternating rounds")
    ap.add_argument("--limit-val", type=int, default=64, help="validation images, feed and default runs")
    ap.add_argument("--members", type=int, default=3, help="distill: the teacher ensemble's size")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to skip")
    ap.add_argument("--only", nargs="*", default=[], choices=SECTIONS, help="run only these sections")
    a = ap.parse_args()
    if a.data_passes < 2:
        ap.error("--data-passes: at least 2 (the first pass of each side is cold)")
    if a.feed_rounds < 1:
        ap.error("--feed-rounds: at least 1")
    if a.members < 2:
        ap.error("--members: the teacher ensemble needs at least 2")
    a.skip = [s for s in SECTIONS if s in a.skip or (a.only and s not in a.only)]
    threads = os.cpu_count() or 2
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads")

    import ray

    # a new local Ray (never one already running on this machine), as `brainmri train` starts it
    init_ray(address="local")
    if "data" not in a.skip:
        ray_pass, paths = ray_data_pass(a.lake, a.size, a.limit, a.batch)
        # the peer decodes the files of the feed's training rows (--limit 0: the whole split)
        plain_pass = imagefolder_pass(a.source, a.size, paths, a.batch, workers=2)
        scans = len(paths)
        # each side: (one pass, its CPU-seconds so far, img/s a pass, CPU-ms an image a pass).
        # Ray's CPU is every process on the machine (its workers, driver and daemons); the
        # peer's its own processes only (this one and the DataLoader workers it joins), or
        # Ray's daemons, idling beside it in this process's cluster, would count against it too
        rd, il, rc, ic = [], [], [], []
        sides = [(ray_pass, machine_cpu_s, rd, rc), (plain_pass, own_cpu_s, il, ic)]
        for p in range(a.data_passes):  # alternating, so that a drifting machine slows both alike,
            # and which goes first in turn (the cold passes: Ray's first)
            for one, cpu, rates, cpu_ms in sides if p % 2 == 0 else sides[::-1]:
                c0 = cpu()
                rates.append(one())
                cpu_ms.append((cpu() - c0) / scans * 1e3)
        warm = float(np.median(rd[1:])) / float(np.median(il[1:]))
        ray_ms, plain_ms = float(np.median(rc[1:])), float(np.median(ic[1:]))
        print(f"[data] decoding JPEGs, {scans} images, {a.size}px, {a.data_passes} passes each, "
              f"alternating: Ray Data Parquet->batches on {os.cpu_count()} CPUs "
              + " / ".join(f"{r:.0f}" for r in rd) + " img/s; ImageFolder+DataLoader(2 workers) "
              + " / ".join(f"{r:.0f}" for r in il) + f" img/s; ratio Ray/plain = {warm:.2f} warm (medians "
              f"of passes 2-{a.data_passes}; goal >= 1.0), {rd[0] / il[0]:.2f} cold (each side's first "
              "pass: Ray's includes starting its worker processes and Ray Data's actors)")
        # the wall ratio of a ~1 s pass moves by +-5 % between runs; the CPU an image does not
        # depend on which side ends its pass first, so it says whether a gap is work or waiting
        ratio = f"{plain_ms / ray_ms:.3f}" if ray_ms > 0 else "n/a (passes shorter than a tick)"
        print(f"[data]   CPU a warm image (medians): Ray (every process on the machine) {ray_ms:.3f} ms, "
              f"ImageFolder+DataLoader (its own processes) {plain_ms:.3f} ms, ratio plain/Ray = {ratio}")
    if "trainer" not in a.skip:
        t = bench_trainer(a.lake, a.model, a.size, a.batch, a.limit, a.epochs, threads, a.rounds)
        print(f"[trainer] {a.model} {a.size}px batch {a.batch}, {a.limit or 'all'} images, {a.rounds} rounds "
              f"x {a.epochs} epochs: plain loop {t['plain']:.1f} img/s; TorchTrainer 1 worker "
              f"{t['trainer']:.1f} img/s; Ray overhead {100 * t['overhead']:.1f}% (goal <= 5%), the median "
              f"of the rounds' " + " ".join(f"{100 * o:.1f}" for o in t["per_round"])
              + f" (pooled medians: {100 * t['pooled_overhead']:.1f}%)")
        print("[trainer]   per epoch, plain: " + " ".join(f"{r:.0f}" for r in t["plain_rates"])
              + "; TorchTrainer: " + " ".join(f"{r:.0f}" for r in t["trainer_rates"]))
    if "models" not in a.skip:
        n_train = resolve_dataset(a.lake)[1]["rows"]["train"]
        print(f"[models] est. epoch time over {n_train} training images at {a.size}px, batch 32:")
        for name in list_models():
            if name == "ensemble":  # published from trained models (brainmri ensemble), not trained
                continue
            try:
                rate = _model_rate(name, a.size, a.steps, threads, **RECIPE_SHAPES.get(name, {}))
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  {name:22s} failed: {e}")
                continue
            m = create_model(name, 4, 1, image_size=a.size, **RECIPE_SHAPES.get(name, {}))
            print(f"  {name:22s} {count_params(m) / 1e6:6.2f} M params  {rate:6.1f} img/s  "
                  f"epoch ~{n_train / rate / 60:5.1f} min")
    if "feed" not in a.skip:
        f = bench_feed(a.lake, a.size, a.limit, a.limit_val, a.epochs, a.batch, a.feed_rounds)
        c, st = f["cached"], f["streamed"]
        rounds = "" if a.feed_rounds == 1 else (f", {a.feed_rounds} rounds (medians; each round's ratio "
                                                + " ".join(f"{x:.2f}" for x in f["round_ratios"]) + ")")
        print(f"[feed] default recipe, {a.limit or 'all'} images, {a.size}px{rounds}: "
              f"cached epoch {c['epoch_s']:.1f} s; "
              f"streamed (cache off) {st['epoch_s']:.1f} s (waiting for batches {st['wait_s']:.1f} s); "
              f"ratio streamed/cached = {f['ratio']:.2f} (goal <= 1.1)")
        r = bench_feed_rate(a.lake, a.size, a.limit, a.batch)
        print(f"[feed] pixel shards (data.pixels), built once: {r['pixels_rows']} images in "
              f"{r['pixels_build_s']:.1f} s on {os.cpu_count()} CPUs")
        ours = r["codecs"][r["compression"]]
        print(f"[feed] {r['train_rows']} train images, {a.size}px, this process on one core, best of "
              f"{ours['passes'][0]} / {ours['passes'][1]} passes (at least 10, at least 2 s): plain reader "
              f"(pyarrow + numpy, no Ray) {ours['plain']:.0f} img/s; the pixel feed "
              f"(Ray Data dealing the rows, this process reading them) {ours['ray']:.0f} img/s; ratio "
              f"feed/plain = {ours['ray'] / ours['plain']:.2f} (goal >= 0.5; >= 5000 img/s at 160px); "
              f"with the workers' local shuffle {r['pixels_shuffled_1cpu']:.0f} img/s (best of 3)")
        print(f"[feed]   a pass's first batch after {ours['ray_first_s']:.2f} s (Ray Data starting the "
              f"pass, the first file's read); images per CPU-second of the whole machine over those passes: "
              f"feed {ours['ray_per_cpu_s']:.0f}, plain {ours['plain_per_cpu_s']:.0f} "
              f"(ratio {ours['ray_per_cpu_s'] / ours['plain_per_cpu_s']:.2f})")
        print("[feed] compression of the pixel shards (" + r["compression"] + " written): " + "; ".join(
            f"{c} {v['mb']:.0f} MB plain {v['plain']:.0f} img/s Ray {v['ray']:.0f} img/s"
            for c, v in r["codecs"].items()))
        print(f"[feed] Ray Data on 1 CPU decoding JPEGs (a build, a cached first epoch) "
              f"{r['ray_data_1cpu']:.0f} img/s per CPU (decode alone: {r['decode_per_cpu_s']:.0f} img "
              "per CPU-second)")
        for (model, size), (rate, src) in sorted(gpu_rates().items()):
            if model in ("brainnet", "resnet50"):
                note = "" if size == a.size else \
                    f" (at {size}px a row is {(size / a.size) ** 2:.1f}x the bytes)"
                print(f"[feed]   {model} {size}px trains at {rate:.0f} img/s on the GPU of {src} -> needs "
                      f"{rate / ours['ray_per_cpu_s']:.1f} CPUs of pixel-shard feed per GPU streaming, "
                      f"{rate / r['ray_data_1cpu']:.1f} decoding{note}")
    if "default" not in a.skip:
        d = bench_default(a.lake, a.limit, a.limit_val, a.epochs, a.batch, threads)
        print(f"[default] brainmri train default ({d['workers']} workers, augmentation, cache on), "
              f"{d['rows']} images: {d['ray_s']:.1f} s/epoch; plain single-process loop, same recipe, "
              f"{threads} threads: {d['plain_s']:.1f} s/epoch; ratio Ray/plain = {d['ratio']:.2f} "
              "(goal <= 1.0)")
    if "layout" not in a.skip:
        lay = bench_layout(a.size, a.batch, a.steps, a.rounds)
        print(f"[layout] {TrainConfig().model} {a.size}px batch {a.batch}, training step on 1 thread, "
              f"{a.rounds} rounds: contiguous {lay['contiguous']:.1f} img/s; channels-last "
              f"{lay['channels_last']:.1f} img/s; ratio {lay['channels_last'] / lay['contiguous']:.2f}")
    if "distill" not in a.skip:
        dis = bench_distill(a.size, a.batch, a.steps, a.rounds, a.members)
        print(f"[distill] {TrainConfig().model} {a.size}px batch {a.batch}, engine.train_one_epoch on "
              f"1 thread, {a.rounds} rounds: alone {dis['alone']:.1f} img/s; taught by an ensemble of "
              f"{a.members} of it {dis['taught']:.1f} img/s; step time x{dis['alone'] / dis['taught']:.2f} "
              f"(the teacher adds {dis['alone'] / dis['taught'] - 1:.2f} of a step)")
    ray.shutdown()


def bench_distill(size, batch, steps, rounds, members) -> dict:
    """The recipe's training loop (engine.train_one_epoch with `build_recipe`: augmentation,
    mixing, EMA as the recipe has them, channels-last) on one thread, with and without a
    teacher that is an ensemble of `members` copies of the recipe's network, taking turns:
    medians, images/s."""
    from brainmri.training.engine import ShardBatches, Teacher, to_channels_last, train_one_epoch
    from brainmri.training.recipe import build_recipe

    torch.set_num_threads(1)
    cfg = TrainConfig(image_size=size, batch_size=batch)
    net = dict(model=cfg.model, model_args=cfg.shape())
    ens = create_model("ensemble", 4, 1, image_size=size, members=[net] * members)
    teacher = Teacher(to_channels_last(ens), cfg.distill_weight, cfg.distill_temperature)
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch * steps, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (batch * steps,), generator=g)
    rates = {"alone": [], "taught": []}
    for r in range(rounds):
        for key, t in (("alone", None), ("taught", teacher)):
            torch.manual_seed(0)
            raw = to_channels_last(create_model(cfg.model, 4, 1, image_size=size, **cfg.shape()))
            recipe = build_recipe(cfg, raw, [1, 1, 1, 1], cpu, steps, teacher=t)
            batches = ShardBatches.from_tensors(x, y, batch, True, True, r)
            t0 = time.perf_counter()
            train_one_epoch(raw, batches.epoch(r), recipe, cpu)
            rates[key].append(batch * steps / (time.perf_counter() - t0))
    return {k: float(np.median(v)) for k, v in rates.items()}


def _model_rate(name, size, steps, threads, batch: int = 32, channels_last: bool = False,
                **model_args) -> float:
    """Training steps (forward, loss, backward, AdamW) on random tensors, images/s."""
    from brainmri.training.engine import to_channels_last

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = create_model(name, 4, 1, image_size=size, **model_args)
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 4, (batch,))
    if channels_last:
        m, x = to_channels_last(m), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.time()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.time() - t0)


def bench_layout(size, batch, steps, rounds) -> dict:
    """The recipe's network (TrainConfig's model and model_args) trained a step at a time on one
    thread, contiguous (NCHW) vs channels-last, taking turns for `rounds` rounds: medians."""
    cfg = TrainConfig()
    rates = {False: [], True: []}
    for _ in range(rounds):
        for cl in (False, True):
            rates[cl].append(_model_rate(cfg.model, size, steps, 1, batch, cl, **cfg.shape()))
    return {"contiguous": float(np.median(rates[False])), "channels_last": float(np.median(rates[True]))}


if __name__ == "__main__":
    main()
