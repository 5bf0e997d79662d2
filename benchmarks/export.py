"""CPU inference speed of a published model on its three runtimes: PyTorch eager (model.pt),
TorchScript (model.torchscript.pt) and ONNX Runtime (model.onnx, CPU provider).

    .venv/bin/python -m benchmarks.export [--model URI] [--images N] [--batch-size 32]
        [--threads T] [--latency-images R] [--rounds K]

The same N real scans (the first N/4 of each class of the shared Training set, through the
project's preprocessing) go through each runtime, loaded by the code predict and evaluate
use (`load_network`) and called the same way (`forward_logits`), with the same thread
count (torch's intra-op threads = ONNX Runtime's intra-op threads = --threads):

  throughput   images/s over all N in batches of --batch-size (one warm-up pass first)
  latency      one image at a time, --latency-images of them: p50 and p95 in ms
  max |dlogit| the largest difference from eager's logits over the N images

Runtimes take turns for --rounds rounds and each figure is the median over rounds, so that
a neighbour's load on a shared machine weighs on all three alike. --model defaults to an
untrained brainnet at 160 px (TrainConfig's defaults: speed does not depend on the weights),
published into a temporary folder by `publish_model`, which makes the exports.
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

from benchmarks.harness import publish_small_model, read_scans
from brainmri.config import CLASSES


def real_images(n: int, size: int) -> np.ndarray:
    """The first n/4 real scans of each class, preprocessed at `size`."""
    from brainmri.data.transforms import preprocess_many

    return preprocess_many(read_scans(max(1, n // len(CLASSES)))[0], size)


def throughput(net, x: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
    """(images/s, logits) for one pass over x in batches."""
    from brainmri.evaluation.inference import forward_logits

    t0 = time.perf_counter()
    out = [forward_logits(net, x[s:s + batch_size]) for s in range(0, len(x), batch_size)]
    return len(x) / (time.perf_counter() - t0), np.concatenate(out)


def latencies(net, x: np.ndarray) -> np.ndarray:
    from brainmri.evaluation.inference import forward_logits

    out = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        forward_logits(net, x[i:i + 1])
        out.append(time.perf_counter() - t0)
    return np.array(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="published model version URI (default: an untrained brainnet, 160 px)")
    ap.add_argument("--images", type=int, default=128, help="real scans for throughput (default 128)")
    ap.add_argument("--batch-size", type=int, default=32, help="throughput batch size (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime (default 1)")
    ap.add_argument("--latency-images", type=int, default=50, help="images timed one by one (default 50)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all runtimes (default 3)")
    a = ap.parse_args()

    import torch

    from brainmri.config import RUNTIMES
    from brainmri.evaluation.inference import load_network, open_model

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="brainmri-bench-export-"))
    try:
        model = a.model or publish_small_model(work)  # untrained: TrainConfig's network
        ref = open_model(model)
        x = real_images(a.images, ref.image_size)
        nets = {r: load_network(*ref.runtime_file(r), runtime=r) for r in RUNTIMES}
        print(f"model {ref.name}/{ref.version} ({ref.state['config']['model']}, {ref.image_size} px, "
              f"{ref.state.get('params')} params{', untrained' if not a.model else ''}); {len(x)} real "
              f"scans; batch {a.batch_size}; {a.threads} thread(s) each; {a.rounds} rounds; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}",
              flush=True)
        for net in nets.values():  # warm-up: first calls allocate and pick kernels
            throughput(net, x, a.batch_size)
            latencies(net, x[:5])
        ips = {r: [] for r in RUNTIMES}
        lat = {r: [] for r in RUNTIMES}
        logits = {}
        for _ in range(a.rounds):
            for r in RUNTIMES:
                speed, logits[r] = throughput(nets[r], x, a.batch_size)
                ips[r].append(speed)
                lat[r].append(latencies(nets[r], x[:a.latency_images]))
        med = {r: float(np.median(ips[r])) for r in RUNTIMES}
        p50 = {r: float(np.median([np.percentile(v, 50) for v in lat[r]])) * 1e3 for r in RUNTIMES}
        p95 = {r: float(np.median([np.percentile(v, 95) for v in lat[r]])) * 1e3 for r in RUNTIMES}
        # ratios > 1 mean faster than eager, for throughput and latency alike
        print(f"\n| runtime | images/s (batch {a.batch_size}) | x eager | p50 ms | p95 ms | x eager (p50) "
              f"| max abs dlogit |\n| --- | --- | --- | --- | --- | --- | --- |")
        for r in RUNTIMES:
            d = float(np.abs(logits[r] - logits["torch"]).max())
            print(f"| {r} | {med[r]:.1f} | {med[r] / med['torch']:.2f} | {p50[r]:.2f} | {p95[r]:.2f} | "
                  f"{p50['torch'] / p50[r]:.2f} | {d:.2g} |")
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
