"""Training benchmarks on this machine; prints figures and ratios from one run.

1. Data pipeline alone: Ray Data (Parquet -> decode/preprocess -> torch batches) vs a plain
   torchvision ImageFolder + DataLoader over the JPEG folder, same preprocessing, images/s.
2. Training throughput: TorchTrainer with 1 worker vs a plain single-process PyTorch loop,
   same model, data (in memory, preprocessed), batch size and threads; Ray overhead in %.
3. Per registered model: parameter count and estimated epoch time (train steps timed).

    python benchmarks/train.py --lake ./lake/datasets/brain-tumor-mri   # after `brainmri ingest ... ./lake`
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from brainmri.config import TrainConfig  # noqa: E402
from brainmri.data.datasets import resolve_dataset  # noqa: E402
from brainmri.data.transforms import preprocess, to_model_input  # noqa: E402
from brainmri.models.zoo import count_params, create_model, list_models  # noqa: E402


def bench_ray_data(lake: str, size: int, limit: int, batch: int) -> float:

    from brainmri.training.train import build_datasets

    version, manifest = resolve_dataset(lake)
    cfg = TrainConfig(data=lake, image_size=size, limit_train=limit, limit_val=1)
    ds = build_datasets(cfg, version, manifest)["train"]
    t0, n = time.time(), 0
    for b in ds.iter_torch_batches(batch_size=batch, dtypes={"x": torch.uint8, "label": torch.int64}):
        n += len(b["label"])
    return n / (time.time() - t0)


def bench_imagefolder(src: str, size: int, limit: int, batch: int, workers: int) -> float:
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    def load(path):  # the same deterministic preprocessing, from the file
        with open(path, "rb") as f:
            return torch.from_numpy(preprocess(f.read(), size))

    ds = ImageFolder(os.path.join(src, "Training"), loader=load)
    idx = np.random.default_rng(0).permutation(len(ds))[:limit]
    dl = DataLoader(Subset(ds, idx.tolist()), batch_size=batch, num_workers=workers)
    t0, n = time.time(), 0
    for x, y in dl:
        n += len(y)
    return n / (time.time() - t0)


def bench_plain_loop(model_name, size, batch, steps, threads) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = create_model(model_name, 4, 1, image_size=size)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    x = torch.randint(0, 255, (batch * 4, size, size), dtype=torch.uint8)
    y = torch.randint(0, 4, (batch * 4,))
    m.train()
    for i in range(steps + 2):
        if i == 2:
            t0 = time.time()
        j = (i % 4) * batch
        loss = torch.nn.functional.cross_entropy(m(to_model_input(x[j:j + batch])), y[j:j + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.time() - t0)


def bench_torchtrainer(lake, model_name, size, batch, limit, epochs, threads) -> float:
    """1 worker, cached data: epochs after the first run from memory like the plain loop."""
    from brainmri.training.train import run_training

    out = tempfile.mkdtemp(prefix="bench-train-")
    cfg = TrainConfig(data=lake, out=out, name="bench", model=model_name, image_size=size,
                      batch_size=batch, epochs=epochs, limit_train=limit, limit_val=64,
                      num_workers=1, threads_per_worker=threads, aug_strength=0.0,
                      patience=0, publish=False, keep_checkpoints=1)
    res = run_training(cfg)
    rates = [h["train_images_per_s"] for h in res.history[1:]]  # epoch 0 also decodes
    return float(np.median(rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lake", default="./lake", help="store or dataset URI written by `brainmri ingest`")
    ap.add_argument("--source", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                      "data", "brain-tumor-mri"),
                    help="the Kaggle-layout JPEG folder for the ImageFolder peer")
    ap.add_argument("--size", type=int, default=160, help="image size (default 160, the CPU recipe)")
    ap.add_argument("--batch", type=int, default=64, help="batch size")
    ap.add_argument("--limit", type=int, default=1024, help="images for the pipeline benchmarks")
    ap.add_argument("--model", default="brainnet", help="model for the Ray-vs-plain comparison")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model in the model table")
    ap.add_argument("--skip", nargs="*", default=[], choices=["data", "trainer", "models"],
                    help="sections to skip")
    a = ap.parse_args()
    threads = os.cpu_count() or 2
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads")

    import ray

    ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    if "data" not in a.skip:
        rd = bench_ray_data(a.lake, a.size, a.limit, a.batch)
        il = bench_imagefolder(a.source, a.size, a.limit, a.batch, workers=2)
        print(f"[data] Ray Data Parquet->batches: {rd:.0f} img/s; ImageFolder+DataLoader(2 workers): "
              f"{il:.0f} img/s; ratio Ray/plain = {rd / il:.2f}")
    if "trainer" not in a.skip:
        plain = bench_plain_loop(a.model, a.size, a.batch, a.steps * 2, threads)
        tt = bench_torchtrainer(a.lake, a.model, a.size, a.batch, a.limit, 3, threads)
        print(f"[trainer] {a.model} {a.size}px batch {a.batch}: plain loop {plain:.1f} img/s; "
              f"TorchTrainer 1 worker {tt:.1f} img/s; Ray overhead {100 * (1 - tt / plain):.1f}%")
    if "models" not in a.skip:
        n_train = resolve_dataset(a.lake)[1]["rows"]["train"]
        print(f"[models] est. epoch time over {n_train} training images at {a.size}px, batch 32:")
        for name in list_models():
            try:
                rate = _model_rate(name, a.size, a.steps, threads)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  {name:22s} failed: {e}")
                continue
            m = create_model(name, 4, 1, image_size=a.size)
            print(f"  {name:22s} {count_params(m) / 1e6:6.2f} M params  {rate:6.1f} img/s  "
                  f"epoch ~{n_train / rate / 60:5.1f} min")
    ray.shutdown()


def _model_rate(name, size, steps, threads) -> float:
    torch.set_num_threads(threads)
    m = create_model(name, 4, 1, image_size=size)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    x, y = torch.randn(32, 1, size, size), torch.randint(0, 4, (32,))
    for i in range(steps + 1):
        if i == 1:
            t0 = time.time()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * 32 / (time.time() - t0)


if __name__ == "__main__":
    main()
