"""A multi-node Ray cluster on this machine, by hand: a head, worker hosts and an S3 server,
each in its own network and mount namespace on one bridge (tests/cluster/harness.py says how).
Needs root.

    .venv/bin/python -m benchmarks.cluster up [--name bmc] [--workers 3] [--work DIR]
    . DIR/env.sh                          # this shell becomes a client of the cluster
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py \\
        --data s3://lake/lake --out s3://lake/lake --num-workers 2 --placement spread
    .venv/bin/python -m benchmarks.cluster down [--name bmc]

    .venv/bin/python -m benchmarks.cluster run [--name bmc] [--per-class 8] [-- CMD ...]

`up` leaves the cluster running and writes DIR/env.sh (RAY_ADDRESS, Ray's token, the S3
endpoint and test credentials; mode 600); the bucket `lake` exists, empty. `down` removes
everything of the cluster called --name, whatever state it is in (nothing to do is fine).
`run` brings one up, runs CMD with env.sh's environment, or, without CMD, the pipeline the
cluster tests run (a real subset uploaded to s3://lake/src, ingest with the ray engine, train
with 2 workers spread over the hosts, evaluate), prints each step's seconds (RESULT line) and
tears it down, on success, failure, Ctrl-C or SIGTERM alike (a watchdog process does, should
this one be SIGKILLed). DIR (default /tmp/brainmri-cluster/NAME) keeps the nodes' disks and
logs until the next `up` of NAME.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness as bench
from tests.cluster import harness as hx


def env_file(cluster: hx.Cluster) -> Path:
    path = cluster.work / "env.sh"
    extra = {**cluster.s3_env(), "RAY_ADDRESS": cluster.dashboard, "RAY_AUTH_MODE": "token",
             "RAY_AUTH_TOKEN": cluster.token}
    lines = [f"export {k}={shlex.quote(v)}" for k, v in extra.items()]
    path.write_text("\n".join([*lines, f'export PATH="{hx.VENV_BIN}:$PATH"']) + "\n")
    path.chmod(0o600)
    return path


def pipeline(cluster: hx.Cluster, per_class: int) -> dict:
    """The cluster tests' pipeline (hx.pipeline_jobs), timed; raises on a failed job."""
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bench.copy_scans(Path(tmp) / "Training", per_class)
        cluster.upload(Path(tmp), "src")
        seconds["upload"] = time.perf_counter() - t0
    for step, entrypoint in hx.pipeline_jobs(cluster.bucket, "cluster-run"):
        r = cluster.submit(entrypoint, cluster.work / f"{step}.log").check()
        seconds[step] = r.seconds
        print(f"{step}: {r.seconds:.0f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("up", "down", "run"))
    ap.add_argument("--name", default="bmc", help="the cluster's name (its interfaces and namespaces)")
    ap.add_argument("--workers", type=int, default=3, help="worker hosts, 1 CPU each")
    ap.add_argument("--work", type=Path, help="nodes' disks and logs (default /tmp/brainmri-cluster/NAME)")
    ap.add_argument("--per-class", type=int, default=8, help="run: real scans a class in the pipeline")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)  # run's CMD: everything after --
    a, cmd = ap.parse_args(argv[:cut]), argv[cut + 1:]
    if a.action == "down":
        found = hx.down(a.name)
        print(f"cluster {a.name}: " + (f"removed {', '.join(found)}" if found else "nothing to remove"))
        return 0
    why = hx.unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    cluster = hx.Cluster(a.name, a.work or Path(tempfile.gettempdir()) / "brainmri-cluster" / a.name,
                         workers=a.workers)
    t0 = time.perf_counter()
    if a.action == "up":
        cluster.up()
        print(f"cluster {a.name} up in {time.perf_counter() - t0:.0f} s: head {cluster.head.ip}, "
              f"S3 {cluster.s3_endpoint}, {a.workers} workers; logs in {cluster.work}/nodes\n"
              f". {env_file(cluster)}")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally below
    guard = hx.watch(os.getpid(), a.name)  # and should this process die without it (SIGKILL)
    try:
        cluster.up()
        up_s = time.perf_counter() - t0
        print(f"cluster {a.name} up in {up_s:.0f} s", flush=True)
        if cmd:
            env = {**cluster.client_env(), "RAY_ADDRESS": cluster.dashboard}
            return subprocess.run(cmd, cwd=bench.REPO, env=env).returncode
        bench.print_result({"up": up_s, **pipeline(cluster, a.per_class)})
        return 0
    finally:
        t1 = time.perf_counter()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # a 2nd Ctrl-C waits
        cluster.down()
        guard.kill()
        guard.wait()
        print(f"cluster {a.name} down in {time.perf_counter() - t1:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
