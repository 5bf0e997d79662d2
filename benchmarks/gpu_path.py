"""One GPU through brainmri's real data path against the same training step on data already on
the device: is the host side (ingest's Parquet -> pixel shards -> Ray Data -> the worker's
batches -> pinned copy) keeping up with the GPU?

1. a source of scans: real ones (--scans, class folders) or --synthetic N generated here
   (distinct smooth-noise images, so ingest keeps them all; enough of them that an epoch is
   many batches, which a device without the shared data needs);
2. `brainmri ingest` into a local lake;
3. the resident rate: `benchmarks.gpu` for the model, its batches reused on the device
   (`resident_images_per_s`: the step alone) and gathered from host memory (`images_per_s`);
4. the path's rate: `brainmri train` on one worker (`--gpu` on cuda), every epoch streamed from
   the pixel shards (`cache=false`), `train_images_per_s` of the epochs after the first
   (the first autotunes cuDNN and fills the allocator).

Prints the three rates, path/resident, and the published per-GPU rate of the GPU model where one
is on record (MLPerf Training v4.0 ResNet-50: H200 about 7,900 images/s at batch 400 with DALI;
NVIDIA DeepLearningExamples: A100 about 2,500 with mixed precision at batch 256).

On a GPU machine with no package index (Python 3.12, PyTorch, no Ray), carry the wheels:

    ../shared/tools/slim-ray-wheel .whl 3.12          # here, once: Ray and its small wheels
    # then in one device call, carrying .whl:
    pip install -q --no-index --no-deps .whl/*.whl && pip install -q --no-deps -e . && \
      python -m benchmarks.gpu_path --synthetic 8192 --batch-size 256 --epochs 4 \
        --json $OUT/gpu-path.json

and on CPU, the check that the script runs (tests/test_benchmarks.py does this):

    python -m benchmarks.gpu_path --device cpu --synthetic 96 --model brainnet --size 64 \
        --batch-size 8 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness

PUBLISHED = {"H200": (7900, "MLPerf Training v4.0, batch 400, DALI"),
             "A100": (2500, "NVIDIA DeepLearningExamples, mixed precision, batch 256")}
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def synthetic_scans(dest: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """n distinct grey JPEGs in Kaggle's layout (dest/Training/<class>/): smoothed noise plus a
    bright disc whose place and size differ per image, so no two are near duplicates."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        folder = dest / "Training" / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        (cy, cx), r = rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.1, 0.3) * size
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * rng.uniform(60, 160)
        img = np.clip(rng.normal(60, 40, (size, size)) + disc, 0, 255).astype(np.uint8)
        Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.5)).save(folder / f"s{i:06d}.jpg", quality=90)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--scans", type=Path, help="real scans in class folders (Kaggle layout)")
    src.add_argument("--synthetic", type=int, default=8192, help="else: this many generated scans")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4, help="path run's epochs (the first is not timed)")
    ap.add_argument("--steps", type=int, default=50, help="resident run's timed steps")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp one)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.epochs < 2:
        ap.error("--epochs: at least 2 (the first one is not timed)")
    work = a.work or Path(tempfile.mkdtemp(prefix="brainmri-gpu-path-"))
    py = [sys.executable, "-m"]

    t0 = time.time()
    scans = a.scans or synthetic_scans(work / "src", a.synthetic)
    print(f"source: {scans} ({time.time() - t0:.1f} s)", flush=True)
    lake = work / "lake"
    harness.run([*py, "brainmri", "ingest", str(scans), str(lake), "--name", "gpu-path"],
                work / "ingest.log", timeout=3600).check()

    per_class = max(8, min(a.steps * a.batch_size // len(CLASSES) + 1, 2048))  # enough distinct rows
    resident_json = work / "resident.json"
    harness.run([*py, "benchmarks.gpu", "--device", a.device, "--data", str(scans), "--models", a.model,
                 "--size", f"{a.model}={a.size}", "--batch-size", str(a.batch_size), "--steps", str(a.steps),
                 "--warmup", "5", "--per-class", str(per_class), "--json", str(resident_json)],
                work / "resident.log", timeout=3600).check()
    resident = json.loads(resident_json.read_text())["models"][0]

    run = "gpu-path"
    harness.run([*py, "brainmri", "train", "--data", str(lake), "--dataset", "gpu-path", "--out", str(lake),
                 "--name", run, "--model", a.model, "--image-size", str(a.size), "--batch-size",
                 str(a.batch_size), "--epochs", str(a.epochs), "--num-workers", "1", "--no-publish",
                 "--set", "cache=false", "--set", "patience=0", *(["--gpu"] if a.device == "cuda" else [])],
                work / "train.log", timeout=3600).check()
    history = json.loads((lake / "runs" / run / "history.json").read_text())
    timed = history[1:]
    seconds = sum(h["train_seconds"] for h in timed)
    path_rate = sum(h["train_images"] for h in timed) / seconds
    waited = sum(h.get("train_feed_wait_seconds", 0.0) for h in timed) / seconds

    gpu = resident["gpu_name"]
    ref = next(((k, *v) for k, v in PUBLISHED.items() if k in gpu), None)
    [version] = (lake / "datasets" / "gpu-path").iterdir()
    out = {"model": a.model, "image_size": a.size, "batch_size": a.batch_size, "device": gpu,
           "train_rows": json.loads((version / "manifest.json").read_text())["rows"]["train"],
           "resident_images_per_s": resident["resident_images_per_s"],
           "host_gather_images_per_s": resident["images_per_s"],
           "path_images_per_s": path_rate, "path_feed_wait_share": waited,
           "path_over_resident": path_rate / resident["resident_images_per_s"],
           "published": {"gpu": ref[0], "images_per_s": ref[1], "source": ref[2],
                         "path_over_published": path_rate / ref[1]} if ref else None,
           "epochs": [{k: h[k] for k in ("epoch", "train_images", "train_seconds", "train_images_per_s",
                                         "train_feed_wait_seconds") if k in h} for h in history]}
    print(f"{a.model} {a.size}px batch {a.batch_size} on {gpu}: on the device "
          f"{out['resident_images_per_s']:.0f} img/s; gathered from host memory "
          f"{out['host_gather_images_per_s']:.0f}; through the data path "
          f"{path_rate:.0f} (waiting for batches {waited:.0%} of the epoch) = "
          f"{out['path_over_resident']:.2f}x the step on resident data"
          + (f"; {out['published']['path_over_published']:.2f}x the published {ref[1]} img/s of one {ref[0]} "
             f"({ref[2]})" if ref else "; no published rate on record for this device"))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
