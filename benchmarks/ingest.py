"""Benchmark `brainmri ingest` on the full shared Training set (5712 JPEGs).

    .venv/bin/python -m benchmarks.ingest [--source DIR] [--skip-s3] [--workers N]

Phases, each in a fresh Python process so that its peak-memory numbers are its own:

  peer        a plain sequential loop: read file, sha256, PIL full decode (the floor any
              ingest must pay once per image; ingest also pHashes, thumbnails, dedups,
              re-reads and writes Parquet)
  local-1/4   ingest of a 1/4 subset (every 4th file of each class) to a local temp folder
  local       ingest of the full set to a fresh local temp folder
  s3          ingest of the full set to s3://<bucket>/lake on a loopback moto S3 server that
              this script starts (moto keeps objects in its own memory, in this process,
              not in the measured one)

Memory, per phase: ru_maxrss of the phase process (RUSAGE_SELF) and of its largest
finished child (RUSAGE_CHILDREN: the forked decode/hash workers), and the peak RSS of the
phase process sampled from /proc/self/statm every 5 ms during the work alone (no psutil).
Comparing local-1/4 with local shows whether memory grows with the dataset.
The file cache is warmed first, so every phase reads from memory, not disk.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import (
    PeakRSS,
    child_result,
    copy_scans,
    data_root,
    loopback_s3,
    mib,
    print_result,
    scans,
)


def _image_files(source: Path) -> list[Path]:
    return [f for per_class in scans(root=source).values() for f in per_class]


def phase_peer(source: Path) -> dict:
    from PIL import Image

    files = _image_files(source)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        for p in files:
            data = p.read_bytes()
            hashlib.sha256(data).hexdigest()
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        secs = time.perf_counter() - t0
    return dict(files=len(files), seconds=secs, cpu_seconds=rss.cpu_seconds,
                start_rss=rss.start_rss, peak_rss=rss.peak)


def phase_ingest(source: Path, dest: str, workers: int) -> dict:
    from brainmri.config import IngestConfig
    from brainmri.data.ingest import ingest

    with PeakRSS() as rss:
        t0 = time.perf_counter()
        res = ingest(str(source), dest, IngestConfig(workers=workers))
        secs = time.perf_counter() - t0
    m = res.manifest
    return dict(files=m["files"]["seen"], seconds=secs, cpu_seconds=rss.cpu_seconds,
                start_rss=rss.start_rss,
                peak_rss=rss.peak, version=res.version, created=res.created,
                counts=m["files"], rows=m["rows"],
                shards=len(m["shards"]), shard_bytes=sum(s["bytes"] for s in m["shards"]),
                exact_groups=m["duplicates"]["exact_groups"],
                near_pairs=m["duplicates"]["near_duplicate_pairs"],
                label_conflicts=len(m["label_conflicts"]))


def run_phase(args) -> None:
    """Child entry point: do one phase, print one JSON line with its numbers."""
    if args.phase == "peer":
        out = phase_peer(Path(args.source))
    else:
        out = phase_ingest(Path(args.source), args.dest, args.workers)
    out["maxrss_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["maxrss_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print_result(out)


# -- the driver --------------------------------------------------------------------------------
def spawn(phase: str, source: Path, log: Path, dest: str = "", workers: int = 0, env=None) -> dict:
    """One phase in a fresh process (this module's --phase): its numbers."""
    cmd = [sys.executable, "-m", "benchmarks.ingest", "--phase", phase, "--source", str(source),
           "--workers", str(workers)]
    if dest:
        cmd += ["--dest", dest]
    try:
        return child_result(cmd, log, env=env)
    except RuntimeError as e:
        sys.exit(f"phase {phase}: {e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(data_root()),
                    help="dataset folder holding Training/<class>/*.jpg (default: $BRAINMRI_BENCH_DATA, "
                         "else shared/data/brain-tumor-mri beside the repo: %(default)s)")
    ap.add_argument("--skip-s3", action="store_true",
                    help="skip the ingest to the loopback moto S3 server")
    ap.add_argument("--workers", type=int, default=0,
                    help="ingest decode/hash processes (default 0 = all cores)")
    ap.add_argument("--phase", choices=["peer", "ingest"],
                    help="internal: run a single phase in this process and print its numbers")
    ap.add_argument("--dest", help="internal: destination URI for --phase ingest")
    args = ap.parse_args(argv)
    if args.phase:
        return run_phase(args)

    source = Path(args.source).resolve()
    if not (source / "Training").is_dir():
        sys.exit(f"no Training/ folder under {source}")
    files = _image_files(source)
    total_bytes = sum(p.stat().st_size for p in files)
    print(f"source {source}: {len(files)} files, {total_bytes / 2**20:.1f} MiB")
    print(f"machine: {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    for p in files:  # warm the file cache: every phase reads from memory
        p.read_bytes()

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="brainmri-bench-") as tmp:
        tmp = Path(tmp)
        log = tmp / "phase.log"
        results["peer (sha256 + PIL decode, 1 process)"] = spawn("peer", source, log)
        quarter = tmp / "quarter"
        copy_scans(quarter / "Training", every=4, root=source)  # every 4th file of each class
        results["ingest local, 1/4 subset"] = spawn(
            "ingest", quarter, log, str(tmp / "lake-quarter"), args.workers)
        results["ingest local, full"] = spawn(
            "ingest", source, log, str(tmp / "lake-full"), args.workers)
        if not args.skip_s3:
            with loopback_s3("bench") as env:
                results["ingest s3 (loopback moto), full"] = spawn(
                    "ingest", source, log, "s3://bench/lake", args.workers, env=env)

    print(f"load average {os.getloadavg()[0]:.2f} at end "
          "(other work on this machine slows every phase alike)\n")
    w = max(map(len, results))
    print(f"{'phase':{w}}  {'files':>5}  {'seconds':>7}  {'images/s':>8}  {'CPU s':>6}  "
          f"{'img/CPU-s':>9}  {'RSS at start':>12}  {'peak RSS (sampled)':>18}  "
          f"{'maxrss SELF':>11}  {'maxrss CHILDREN':>15}")
    for name, r in results.items():
        print(f"{name:{w}}  {r['files']:5d}  {r['seconds']:7.1f}  {r['files'] / r['seconds']:8.1f}  "
              f"{r['cpu_seconds']:6.1f}  {r['files'] / r['cpu_seconds']:9.1f}  "
              f"{mib(r['start_rss']):>12}  {mib(r['peak_rss']):>18}  {mib(r['maxrss_self']):>11}  "
              f"{mib(r['maxrss_children']):>15}")
    peer = results["peer (sha256 + PIL decode, 1 process)"]
    peer_rate = peer["files"] / peer["seconds"]
    peer_cpu_rate = peer["files"] / peer["cpu_seconds"]
    print("\n(files seen by ingest = the images + README.md and SHA256SUMS at the dataset root,"
          " which it rejects as outside_known_class_folder)")
    for name, r in results.items():
        if name.startswith("ingest"):
            print(f"{name}: {r['files'] / r['seconds'] / peer_rate:.2f}x the peer's images/s, "
                  f"{r['files'] / r['cpu_seconds'] / peer_cpu_rate:.2f}x its images/CPU-s "
                  f"({r['files']} files, version {r['version']}, {r['counts']}, "
                  f"rows {r['rows']}, {r['shards']} shards {mib(r['shard_bytes']).strip()}, "
                  f"exact-dup groups {r['exact_groups']}, near pairs {r['near_pairs']}, "
                  f"label conflicts {r['label_conflicts']})")
    q, f = results["ingest local, 1/4 subset"], results["ingest local, full"]
    print(f"\nmemory vs dataset size (local ingest): {q['files']} files -> peak RSS "
          f"{mib(q['peak_rss']).strip()} (workers {mib(q['maxrss_children']).strip()}); "
          f"{f['files']} files -> {mib(f['peak_rss']).strip()} "
          f"(workers {mib(f['maxrss_children']).strip()}); "
          f"growth {mib(f['peak_rss'] - q['peak_rss']).strip()} for "
          f"{f['files'] - q['files']} more files "
          f"({(f['peak_rss'] - q['peak_rss']) / max(1, f['files'] - q['files']) / 1024:.1f} KiB/file)")


if __name__ == "__main__":
    main()
