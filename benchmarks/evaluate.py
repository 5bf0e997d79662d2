"""Benchmark `brainmri evaluate` and `brainmri predict` against a plain PyTorch loop.

    .venv/bin/python -m benchmarks.evaluate [--model URI] [--limit N] [--batch-size B]
        [--concurrency C] [--threads T] [--latency-images R] [--gpu]

The same N real scans (the first N/4 of each class of the shared Training set, copied into a
temporary Kaggle-layout folder) go through:

  plain      read, validate (inspect_image), preprocess, batched forward, in this process:
             the floor any evaluation must pay
  pipeline   evaluate's Ray Data pass alone (read/validate/preprocess, actor pool): cold
             (including starting the actors, which every run pays once) and steady (from
             the first batch out to the last: what larger evaluations converge to)
  calibrate  the in-process temperature fit on the model's val split (evaluate does it
             when the model has no calibration.json; `brainmri calibrate` saves it)
  evaluate   the whole `evaluate()`: pipeline + calibration on the val split + leakage check
             + figures (Grad-CAM included) + report writing
  predict    single-image Predictor.predict latency (model loaded once), p50/p95, versus a
             batch-of-one plain forward on the same images

--model defaults to the newest published version under ./lake/models/brainnet; without one,
a tiny brainnet (width 8, 64 px) is fitted in this process on a few scans (seconds, no Ray
Train), so the figures then describe that tiny model. Torch runs --threads threads (default
1) here and one per actor (Ray gives a 1-CPU actor OMP_NUM_THREADS=1), so the comparison is
per core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import REPO, copy_scans, publish_small_model
from brainmri.config import CLASSES, EvaluateConfig


def subset_folder(dest: Path, limit: int, offset: int = 0) -> list[Path]:
    """limit/4 real scans a class copied into dest/<class>/; the copies."""
    return copy_scans(dest, max(1, limit // len(CLASSES)), offset)


def tiny_model(work: Path) -> str:
    """Fallback: ingest 12 scans a class and fit a width-8 brainnet for 20 full-batch steps."""
    import pyarrow.parquet as pq
    import torch

    from brainmri.config import IngestConfig, TrainConfig
    from brainmri.data.datasets import manifest_hash, split_files
    from brainmri.data.ingest import ingest
    from brainmri.data.transforms import preprocess_many, to_model_input
    from brainmri.models.zoo import create_model

    src = work / "src" / "Training"
    subset_folder(src, 48, offset=1000)
    res = ingest(str(src.parent), str(work / "lake"),
                 IngestConfig(val_fraction=0.25, test_fraction=0.25, workers=1))
    t = pq.read_table(split_files(res.location, res.manifest, "train")[0], columns=["image", "label"])
    x = to_model_input(torch.from_numpy(preprocess_many(t.column("image").to_pylist(), 64)))
    y = torch.as_tensor(np.asarray(t.column("label"), dtype=np.int64))
    model = create_model("brainnet", 4, 1, image_size=64, width=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfg = TrainConfig(data=res.location.uri, out=str(work / "lake"), name="bench-tiny", image_size=64,
                      model_args={"width": 8})
    return publish_small_model(work / "lake", cfg, model, dataset={
        "uri": res.location.uri, "name": res.manifest["name"], "version": res.manifest["version"],
        "manifest_hash": manifest_hash(res.manifest)})


def default_model(work: Path) -> str:
    from brainmri.core.storage import StorageError, open_location
    from brainmri.models.checkpoints import latest_model

    try:
        return latest_model(open_location(str(REPO / "lake" / "models" / "brainnet"))).uri
    except StorageError:
        print("no published model under ./lake/models/brainnet: fitting a tiny one", flush=True)
        return tiny_model(work)


def plain_loop(files: list[Path], model_uri: str, batch_size: int) -> float:
    """Seconds for the plain in-process loop over the files (same checks, same math)."""
    from brainmri.data import images as im
    from brainmri.data.transforms import preprocess_many
    from brainmri.evaluation.inference import forward_logits, load_network, open_model

    ref = open_model(model_uri)
    net = load_network(ref.weights.uri, ref.sha256)
    t0 = time.perf_counter()
    for s in range(0, len(files), batch_size):
        blobs = [f.read_bytes() for f in files[s:s + batch_size]]
        for b in blobs:
            im.inspect_image(b)
        forward_logits(net, preprocess_many(blobs, ref.image_size))
    return time.perf_counter() - t0


def latencies(files: list[Path], model_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image seconds: Predictor.predict on one image vs a plain batch-of-one forward."""
    from brainmri.data import images as im
    from brainmri.data.transforms import preprocess_many
    from brainmri.evaluation.inference import forward_logits
    from brainmri.evaluation.predict import Predictor

    pred = Predictor(model_uri)
    blobs = [f.read_bytes() for f in files]
    pred.predict([("warm-up", blobs[0])])
    lp, lf = [], []
    for f, b in zip(files, blobs, strict=True):
        t0 = time.perf_counter()
        pred.predict_paths([str(f)]).__next__()  # read from disk + checks + forward
        lp.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        im.inspect_image(f.read_bytes())
        forward_logits(pred.model, preprocess_many([b], pred.ref.image_size))
        lf.append(time.perf_counter() - t0)
    return np.array(lp), np.array(lf)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model URI (default: latest ./lake/models/brainnet, else a tiny one)")
    ap.add_argument("--limit", type=int, default=64, help="images to evaluate (default 64)")
    ap.add_argument("--batch-size", type=int, default=32, help="inference batch size (default 32)")
    ap.add_argument("--concurrency", type=int, default=1, help="evaluate's inference actors (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1)")
    ap.add_argument("--latency-images", type=int, default=20,
                    help="images timed one by one for predict latency (default 20)")
    ap.add_argument("--gpu", action="store_true", help="evaluate with one GPU per actor")
    a = ap.parse_args()

    import ray
    import torch

    from brainmri.evaluation.evaluate import evaluate, inference_dataset, temperature_for
    from brainmri.evaluation.inference import open_model
    from brainmri.evaluation.sources import open_source

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="brainmri-bench-eval-"))
    try:
        model = a.model or default_model(work)
        files = subset_folder(work / "folder", a.limit)
        n = len(files)
        ref = open_model(model)
        print(f"model {ref.name}/{ref.version} ({ref.image_size} px, {ref.state.get('params')} params); "
              f"{n} images; batch {a.batch_size}; {a.concurrency} actor(s); {a.threads} thread(s); "
              f"{os.cpu_count()} CPUs{' + GPU' if a.gpu else ''}", flush=True)

        t_plain = plain_loop(files, model, a.batch_size)
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
        src = open_source(str(work / "folder"), ref.classes)
        run = {"batch_size": a.batch_size, "gpu": a.gpu, "concurrency": a.concurrency}
        t0 = time.perf_counter()
        rows, t_first = 0, None
        for b in inference_dataset(src, ref, **run).iter_batches(batch_size=None, batch_format="numpy"):
            if t_first is None:
                t_first, first_rows = time.perf_counter(), len(b["path"])
            rows += len(b["path"])
        t_pipe = time.perf_counter() - t0
        assert rows == n
        steady = (n - first_rows) / (t0 + t_pipe - t_first) if n > first_rows else float("nan")
        t0 = time.perf_counter()
        cal = temperature_for(ref, a.batch_size)
        t_cal = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = evaluate(EvaluateConfig(model=model, data=str(work / "folder"), out=str(work / "out"), **run))
        t_eval = time.perf_counter() - t0
        lp, lf = latencies(files[:a.latency_images], model)

        print(f"plain loop         {n / t_plain:8.1f} images/s  ({t_plain:.2f} s)")
        print(f"evaluate pipeline  {n / t_pipe:8.1f} images/s  ({t_pipe:.2f} s, actor start included)"
              f"  = {t_plain / t_pipe:.2f}x plain")
        print(f"  steady state     {steady:8.1f} images/s  (after the first batch of {first_rows})"
              f"  = {steady * t_plain / n:.2f}x plain")
        print(f"calibration        {t_cal:8.2f} s on {(cal.get('fit') or {}).get('n', 0)} val images "
              f"({cal['source'][:40]}...)")
        print(f"evaluate, whole    {n / t_eval:8.1f} images/s  ({t_eval:.2f} s: + calibration, leakage, "
              f"figures, report)  = {t_plain / t_eval:.2f}x plain")
        p50, p95 = np.percentile(lp, [50, 95]) * 1e3
        f50, f95 = np.percentile(lf, [50, 95]) * 1e3
        print(f"predict latency    p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  ({len(lp)} single images)")
        print(f"plain batch of 1   p50 {f50:7.1f} ms  p95 {f95:7.1f} ms  -> predict/plain p50 "
              f"{p50 / f50:.2f}x, p95 {p95 / f95:.2f}x")
        print(f"report: {res.report_uri} (deleted with the temp folder)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
