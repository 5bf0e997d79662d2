"""A full-length recipe sweep on one GPU, without Ray: many complete CPU-recipe trainings at
once, to choose the recipe's knobs at the length the recipe really trains (the Ray search,
`brainmri tune --space configs/tune-quality.yaml`, can only afford 8-epoch trials on 2 cores).

    # here: the dataset version's train and val rows, preprocessed at the recipe's size
    .venv/bin/python -m benchmarks.sweep pack --store ./lake --out .sweep/pack.npz
    # on a bare GPU machine (PyTorch only), from a copy of the repository: sample, train, rank
    python -m benchmarks.sweep run --pack .sweep/pack.npz --space configs/tune-sweep-recipe.yaml \
        --trials 40 --parallel 8 --reseed-top 4 --json $OUT/sweep.json

Each trial is the CPU recipe's training with the project's own pieces (the space file's format
and sampler from `brainmri tune`, TrainConfig, `training.recipe.build_recipe`, `engine.fit`,
the model registry): the recipe's 2 workers
x batch_size are simulated by one process with the global batch (the same steps per epoch and
gradient; BatchNorm sees the global batch), bf16 autocast on CUDA. Best-epoch validation
macro-F1 ranks the trials, as the recipe selects its checkpoint; the top ones are trained again
with other seeds, and the ranking is by the mean (one validation error is 0.18 points). The
pack holds train and val rows only: no test image can choose anything.

The pack stores each preprocessed image (`transforms.preprocess` at the recipe's size) as a
JPEG at quality 95 (mean absolute error about 1 grey level): it must travel to the GPU machine
in a few tens of MB. No pickle anywhere: flat arrays, loaded with allow_pickle=False.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

JPEG_QUALITY = 95
METRIC = "val_macro_f1"


# -- pack (here) --------------------------------------------------------------------------------
def pack(store: str, dataset: str, size: int, out: str) -> dict:
    from PIL import Image

    from brainmri.core.storage import open_location
    from brainmri.data.datasets import latest_version, load_manifest, split_arrays

    version = latest_version(open_location(store), dataset)
    manifest = load_manifest(version)
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "val"):
        blobs, labels = [], []
        for xs, ys in split_arrays(version, manifest, split, size):
            for x in xs:
                buf = io.BytesIO()
                Image.fromarray(x).save(buf, "JPEG", quality=JPEG_QUALITY)
                blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
            labels += ys.tolist()
        arrays[f"{split}_bytes"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = np.asarray(labels, np.int64)
    meta = {"version": manifest["version"], "size": size, "classes": manifest.get("classes"),
            "rows": {s: len(arrays[f"{s}_labels"]) for s in ("train", "val")}}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)  # a half-written pack is never taken as one
    return meta


def unpack(path: str) -> tuple[dict, dict]:
    """-> (meta, {split: (uint8 [N,S,S], int64 [N])})."""
    from PIL import Image

    z = np.load(path, allow_pickle=False)
    meta = json.loads(z["meta"].tobytes())
    out = {}
    for split in ("train", "val"):
        data, off = z[f"{split}_bytes"], z[f"{split}_offsets"]
        x = np.stack([np.asarray(Image.open(io.BytesIO(data[a:b].tobytes())).convert("L"))
                      for a, b in itertools.pairwise(off)]) if len(off) > 1 else \
            np.zeros((0, meta["size"], meta["size"]), np.uint8)
        out[split] = (x, z[f"{split}_labels"])
    return meta, out


# -- one trial (a worker process) ---------------------------------------------------------------
_DATA: dict = {}


def _init(pack_path: str, device: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    meta, splits = unpack(pack_path)
    dev = torch.device(device)
    # the whole split lives on the device as uint8 (113 MB at 160 px): batches are gathers
    _DATA.update(meta=meta, device=dev, **{s: (torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev))
                                          for s, (x, y) in splits.items()})


def run_trial(job: dict) -> dict:
    """One trial in this process: the recipe's own parts (`build_recipe`) and epoch loop
    (`engine.fit`), exactly what a Ray worker trains, on the split held on the device."""
    import torch

    from brainmri.config import TrainConfig, from_dict, to_dict
    from brainmri.models.zoo import create_model
    from brainmri.ops.tune import nest_params
    from brainmri.training.engine import ShardBatches, Stopwatch, fit, to_channels_last
    from brainmri.training.recipe import build_recipe

    cfg = from_dict(TrainConfig, nest_params(job["config"]))
    dev, meta = _DATA["device"], _DATA["meta"]
    classes = meta["classes"]
    (xt, yt), (xv, yv) = _DATA["train"], _DATA["val"]
    if limit := job.get("limit_train"):
        xt, yt = xt[:limit], yt[:limit]
    cuda = dev.type == "cuda"
    batch = cfg.batch_size * cfg.num_workers  # the recipe's global batch, one process
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, len(classes), 1, image_size=cfg.image_size, **cfg.shape()).to(dev)
    if cuda:
        model = to_channels_last(model)
    counts = torch.bincount(yt, minlength=len(classes)).tolist()
    recipe = build_recipe(cfg, model, counts, dev, max(1, len(yt) // batch), channels_last=cuda)
    train_src = ShardBatches.from_tensors(xt, yt, batch, True, True, cfg.seed * 7919)
    val_src = ShardBatches.from_tensors(xv, yv, 256, False, False, 0)
    clock = Stopwatch(dev)
    t0 = clock.now()
    run = fit(model, recipe, train_src, val_src, classes, dev, epochs=cfg.epochs, patience=cfg.patience,
              time_budget_min=cfg.time_budget_min)
    rows = [{k: v for k, v in h.items() if not isinstance(v, (list, dict))} for h in run.history]
    best = max(rows, key=lambda h: h[METRIC])  # the first of equals, as the loop counts them
    return {"trial": job["trial"], "seed": cfg.seed, "params": job["params"], "config": to_dict(cfg),
            "best": best, "last": rows[-1], "epochs_run": len(rows), "seconds": clock.now() - t0}


# -- the sweep ----------------------------------------------------------------------------------
def summarise(results: list[dict]) -> list[dict]:
    """One row per trial: best-epoch validation figures averaged over the seeds it ran."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["trial"], []).append(r)
    rows = []
    for trial, rs in by.items():
        def mean(key, rs=rs):
            return float(np.mean([r["best"][key] for r in rs]))
        rows.append({"trial": trial, "seeds": len(rs), METRIC: mean(METRIC),
                     "val_accuracy": mean("val_accuracy"),
                     "val_recall_glioma": mean("val_recall_glioma"),
                     "val_recall_meningioma": mean("val_recall_meningioma"),
                     "best_epoch": float(np.mean([r["best"]["epoch"] for r in rs])),
                     "spread": float(np.ptp([r["best"][METRIC] for r in rs])), "params": rs[0]["params"],
                     "config": rs[0]["config"]})
    # more seeds first among equals would be arbitrary: rank by the mean alone
    return sorted(rows, key=lambda r: -r[METRIC])


def table(rows: list[dict], keys: list[str]) -> str:
    head = ["#", "trial", "seeds", "val macro-F1", "val acc", "glioma", "meningioma", "best ep",
            "seed spread"] + keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        vals = [str(i), r["trial"], str(r["seeds"]), f"{r[METRIC]:.4f}", f"{r['val_accuracy']:.4f}",
                f"{r['val_recall_glioma']:.4f}", f"{r['val_recall_meningioma']:.4f}",
                f"{r['best_epoch']:.0f}", f"{r['spread']:.4f}"]
        vals += [f"{r['config'][k]:.4g}" if isinstance(r["config"][k], float) else str(r["config"][k])
                 for k in keys]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def sweep(args) -> dict:
    import torch.multiprocessing as mp

    from brainmri.ops.tune import load_space, sample_trials

    base, space = load_space(args.space)
    params = sample_trials(space, args.trials, args.sample_seed)
    if args.include_base:  # the current recipe itself, as trial t000, for reference
        params = [{}] + params[:-1]
    jobs = [{"trial": f"t{i:03d}", "params": p, "config": {**base, **p, "seed": 0},
             "limit_train": args.limit_train} for i, p in enumerate(params)]
    for j in jobs:
        if args.epochs:
            j["config"]["epochs"] = args.epochs
    results: list[dict] = []
    t0 = time.time()
    ctx = mp.get_context("spawn")
    out = {"space": args.space, "base": base, "trials": args.trials, "parallel": args.parallel,
           "device": args.device, "pack": args.pack}

    def save():
        out.update(results=results, leaderboard=summarise(results), seconds=time.time() - t0)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    def log(r):
        b = r["best"]
        print(f"{r['trial']} seed {r['seed']}: best ep {b['epoch']} val macro-F1 {b[METRIC]:.4f} "
              f"acc {b['val_accuracy']:.4f} glioma {b['val_recall_glioma']:.4f} "
              f"meningioma {b['val_recall_meningioma']:.4f} ({r['epochs_run']} ep, {r['seconds']:.0f} s, "
              f"{time.time() - t0:.0f} s in)", flush=True)

    def run_phase(pool, queue: list[dict], start_by: float) -> None:
        """At most `parallel` trainings in flight; none started after `start_by` seconds; the
        ones running at `--stop-s` are abandoned (the results so far are already saved)."""
        queue, flying = list(queue), []
        while queue or flying:
            while queue and len(flying) < args.parallel and time.time() - t0 < start_by:
                flying.append(pool.apply_async(run_trial, (queue.pop(0),)))
            if not flying:
                return
            time.sleep(0.5)
            for f in [f for f in flying if f.ready()]:
                flying.remove(f)
                results.append(f.get())  # a failed trial raises here: a broken sweep is no ranking
                log(results[-1])
                save()
            if time.time() - t0 > args.stop_s:
                print(f"stop: {len(flying)} trainings abandoned at {args.stop_s:.0f} s", flush=True)
                return

    with ctx.Pool(args.parallel, initializer=_init, initargs=(args.pack, args.device, args.threads)) as pool:
        run_phase(pool, jobs, args.deadline_s)
        if args.reseed_top and time.time() - t0 < args.stop_s:
            top = [r["trial"] for r in summarise(results)[:args.reseed_top]]
            again = [{**j, "config": {**j["config"], "seed": s}} for s in range(1, args.seeds + 1)
                     for j in jobs if j["trial"] in top]
            print(f"re-seeding the top {len(top)}: {top}", flush=True)
            run_phase(pool, again, args.stop_s)
        pool.terminate()
    save()
    keys = sorted({k for p in params for k in p})
    print(table(summarise(results), keys))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="preprocess the dataset version's train and val rows")
    p.add_argument("--store", default="./lake")
    p.add_argument("--dataset", default="brain-tumor-mri")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--out", default=".sweep/pack.npz")
    r = sub.add_parser("run", help="train the sampled trials, rank them on validation")
    r.add_argument("--pack", default=".sweep/pack.npz")
    r.add_argument("--space", default="configs/tune-sweep-recipe.yaml")
    r.add_argument("--trials", type=int, default=40)
    r.add_argument("--sample-seed", type=int, default=0)
    r.add_argument("--include-base", action="store_true", help="trial t000 = the space's base alone")
    r.add_argument("--parallel", type=int, default=8, help="trainings at once on the device")
    r.add_argument("--threads", type=int, default=2, help="torch threads per training")
    r.add_argument("--device", default="cuda")
    r.add_argument("--reseed-top", type=int, default=4)
    r.add_argument("--seeds", type=int, default=2, help="extra seeds for each re-seeded trial")
    r.add_argument("--deadline-s", type=float, default=300, help="start no new sampled trial after this")
    r.add_argument("--stop-s", type=float, default=480, help="stop everything after this (re-seeds included)")
    r.add_argument("--epochs", type=int, default=0, help="override (smoke tests)")
    r.add_argument("--limit-train", type=int, default=0, help="first N train rows (smoke tests)")
    r.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        print(json.dumps(pack(args.store, args.dataset, args.size, args.out)))
    else:
        sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
