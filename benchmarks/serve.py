"""Benchmark `brainmri serve` (Ray Serve over HTTP on 127.0.0.1) against predict's code called
in this process, on the same real scans, at 1, 8 and 32 concurrent clients.

    .venv/bin/python -m benchmarks.serve [--model URI] [--images N] [--requests R]
        [--clients 1,8,32] [--max-batch-size B] [--batch-wait-ms W] [--threads T] [--json FILE]

  in-process  C threads call one `Predictor.predict([(name, bytes)])` (what `brainmri predict`
              runs per file: ingest's checks, preprocessing, forward, calibration, abstain rule),
              one image per call
  serve       C client threads POST the raw bytes to /predict (one replica, `@serve.batch` up
              to B requests per forward, waiting at most W ms for a batch to fill); a request
              goes through Serve's HTTP proxy, the replica, predict's code, and back

Each level sends R requests in all (round robin over the N scans) and reports throughput
(requests/s over the level's wall time) and per-request latency p50/p99. Torch runs T threads
(default 1) here and in the replica (Ray gives a 1-CPU actor OMP_NUM_THREADS=1).

--model defaults to an untrained brainnet of the CPU recipe's shape (configs/cpu.yaml: width
32, 160 px), published in a temporary folder: inference cost does not depend on the weights'
values, so it costs what the trained model costs, without training one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import REPO, publish_small_model, read_scans
from brainmri.config import CLASSES


def recipe_shaped_model(work: Path) -> str:
    """An untrained brainnet shaped like configs/cpu.yaml, published like run_training does."""
    from brainmri.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, REPO / "configs" / "cpu.yaml", {"out": str(work), "name": "bench"})
    return publish_small_model(work, cfg)


def drive(call, images: list[bytes], clients: int, total: int) -> dict:
    """`clients` threads share `total` calls of call(bytes) -> ok; latency per call, wall time."""
    lat: list[float] = []
    failed = []
    counter = iter(range(total))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            ok = call(images[i % len(images)])
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                if not ok:
                    failed.append(i)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"clients": clients, "requests": total, "failed": len(failed), "wall_s": round(wall, 3),
            "throughput_rps": round(total / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model URI (default: an untrained brainnet shaped like configs/cpu.yaml)")
    ap.add_argument("--images", type=int, default=64, help="distinct real scans (default 64)")
    ap.add_argument("--requests", type=int, default=256, help="requests per concurrency level (default 256)")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="serve's @serve.batch size (default 16)")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0, help="serve's batch wait (default 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and per replica (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    a = ap.parse_args()
    levels = [int(c) for c in a.clients.split(",")]

    import ray
    import requests
    import torch
    from ray import serve

    from brainmri.config import ServeConfig
    from brainmri.evaluation.predict import Predictor
    from brainmri.serving.app import APP, application

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="brainmri-bench-serve-"))
    try:
        model = a.model or recipe_shaped_model(work)
        images = read_scans(max(1, a.images // len(CLASSES)), offset=500)[0]
        pred = Predictor(model)
        print(f"model {pred.ref.name}/{pred.ref.version} ({pred.ref.image_size} px, "
              f"{pred.ref.state.get('params')} params); {len(images)} scans; {a.requests} requests per "
              f"level; batch <= {a.max_batch_size}, wait {a.batch_wait_ms} ms; {a.threads} torch "
              f"thread(s); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
        results = {"in-process": [], "serve": []}
        pred.predict([("", images[0])])  # warm-up
        for c in levels:
            one = drive(lambda b: pred.predict([("", b)])[0].ok, images, c, a.requests)
            results["in-process"].append(one)
            print("in-process", results["in-process"][-1], flush=True)

        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(a.threads)}})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(model=model, max_batch_size=a.max_batch_size, batch_wait_ms=a.batch_wait_ms,
                          poll_s=0, port=port)
        serve.run(application(cfg), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}/predict"
        local = threading.local()

        def post(b: bytes) -> bool:
            s = getattr(local, "s", None) or requests.Session()  # keep-alive, one per client
            local.s = s
            return s.post(url, data=b, timeout=120).status_code == 200

        for b in images[:8]:
            post(b)  # warm-up
        for c in levels:
            results["serve"].append(drive(post, images, c, a.requests))
            print("serve     ", results["serve"][-1], flush=True)
        serve.shutdown()
        ray.shutdown()

        print(f"\n{'clients':>7} | {'in-process req/s':>16} {'p50 ms':>7} {'p99 ms':>7} | "
              f"{'serve req/s':>11} {'p50 ms':>7} {'p99 ms':>7} | failed")
        for p, s in zip(results["in-process"], results["serve"], strict=True):
            print(f"{p['clients']:>7} | {p['throughput_rps']:>16} {p['p50_ms']:>7} {p['p99_ms']:>7} | "
                  f"{s['throughput_rps']:>11} {s['p50_ms']:>7} {s['p99_ms']:>7} | "
                  f"{p['failed'] + s['failed']}")
        if a.json:
            Path(a.json).write_text(json.dumps({"model": f"{pred.ref.name}/{pred.ref.version}",
                                                "args": vars(a), "results": results}, indent=2) + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
