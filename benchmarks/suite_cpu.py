"""Where a test run's CPU goes: a command (default: the full suite, the README's pytest command)
run while every process on the machine is sampled from /proc, then the CPU of the processes it
started, summed by kind: Ray Train's actors, Ray Data's tasks and actors, Ray's daemons, the
pytest processes, the commands the tests run, the loopback servers.

    .venv/bin/python -m benchmarks.suite_cpu                          # the full suite (25-35 min)
    .venv/bin/python -m benchmarks.suite_cpu --json cpu.json -- .venv/bin/python -m pytest -q tests/data

Why: the suite is CPU-bound on 2 cores (a third pytest process made it slower, docs/development.md),
so its time is the CPU its processes burn, and most of them are Ray's, started and stopped by
each run. "start-up" is the CPU a process burned in its first 6 s of life (mostly imports: torch,
Ray Train, Ray Data). Linux only. A process that lives less than one sampling interval is not
seen, and one's last interval is lost, so the figures are a floor. Exits with the command's status.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time

from benchmarks import harness

HZ = os.sysconf("SC_CLK_TCK")
YOUNG_S = 6.0  # a process's CPU while this young counts as its start-up

# kind of process by its title (Ray names its workers ray::<actor or task>) or command line
TRAIN_ACTORS = ("TrainContr", "RayTrainWo", "PlacementG", "Synchroniz", "DatasetMan", "SplitCoord",
                "Preemption")
RAY_SYSTEM = ("IDLE", "DashboardA", "_StatsActo", "_Autoscali", "ActorLocat", "JobSuperv", "ServeContr",
              "ProxyActor", "ServeRepli")
BY_COMMAND = (("raylet", "Ray daemons"), ("gcs_server", "Ray daemons"), ("log_monitor", "Ray daemons"),
              ("dashboard", "Ray daemons"), ("runtime_env", "Ray daemons"), ("monitor.py", "Ray daemons"),
              ("default_worker.py", "Ray workers starting"), ("setup_worker.py", "Ray workers starting"),
              ("mlflow", "servers (S3, MLflow)"), ("uvicorn", "servers (S3, MLflow)"),
              ("moto", "servers (S3, MLflow)"),
              ("-m brainmri", "commands (brainmri, jobs/, benchmarks, ray)"),
              ("jobs/", "commands (brainmri, jobs/, benchmarks, ray)"),
              ("benchmarks", "commands (brainmri, jobs/, benchmarks, ray)"),
              ("bin/ray ", "commands (brainmri, jobs/, benchmarks, ray)"),
              ("exec(eval", "pytest processes"), ("pytest", "pytest processes"))


def kind(title: str) -> str:
    if title.startswith("ray::"):
        name = title[5:]
        if name.startswith(TRAIN_ACTORS):
            return "Ray Train run actors"
        if name.startswith(RAY_SYSTEM):
            return "Ray system actors"
        return "Ray Data and other tasks"
    for word, k in BY_COMMAND:
        if word in title:
            return k
    return "pytest processes" if title == "python" else "other"  # a pytest-xdist worker renamed


def _boot_time() -> float:
    return time.time() - float(open("/proc/uptime").read().split()[0])


def sample(seen: dict, boot: float, skip: set) -> None:
    """One pass over /proc: each process's title, start time and CPU seconds so far
    ({pid-starttime: {...}}: a pid reused is another process)."""
    now = time.time()
    for pid, name, fields in harness.proc_stats():
        if pid in skip:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
        except OSError:  # gone meanwhile
            continue
        cpu = (int(fields[11]) + int(fields[12])) / HZ  # utime + stime
        start = boot + int(fields[19]) / HZ
        p = seen.setdefault(f"{pid}-{fields[19]}", {"title": cmd or name, "start": start, "cpu": 0.0,
                                                     "young_cpu": 0.0})
        if cmd and not cmd.startswith("ray::IDLE"):  # an idle Ray worker takes its actor's name
            p["title"] = cmd
        p["cpu"] = cpu
        if now - start <= YOUNG_S:
            p["young_cpu"] = cpu


def summarise(seen: dict, since: float) -> dict:
    """The processes started at or after `since`, by kind: CPU seconds, processes, start-up."""
    by = collections.defaultdict(lambda: {"cpu_s": 0.0, "processes": 0, "startup_cpu_s": 0.0})
    for p in seen.values():
        if p["start"] < since - 1:  # running before the command: not its
            continue
        k = by[kind(p["title"])]
        k["cpu_s"] += p["cpu"]
        k["processes"] += 1
        k["startup_cpu_s"] += p["young_cpu"]
    total = sum(k["cpu_s"] for k in by.values())
    return {"cpu_s": total, "processes": sum(k["processes"] for k in by.values()),
            "startup_cpu_s": sum(k["startup_cpu_s"] for k in by.values()),
            "kinds": dict(sorted(by.items(), key=lambda kv: -kv[1]["cpu_s"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--json", default="", help="also write the figures here")
    ap.add_argument("cmd", nargs=argparse.REMAINDER,
                    help="the command (after --; default: the full suite)")
    a = ap.parse_args(argv)
    cmd = (a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd) or [sys.executable, "-m", "pytest", "-q"]
    boot, seen, done = _boot_time(), {}, threading.Event()

    def sampler():
        while not done.is_set():
            sample(seen, boot, {os.getpid()})
            done.wait(a.interval)

    t = threading.Thread(target=sampler, daemon=True)
    since, t0 = time.time(), time.perf_counter()
    t.start()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    sample(seen, boot, {os.getpid()})
    out = {"cmd": cmd, "returncode": rc, "wall_s": wall, "cpus": os.cpu_count(), **summarise(seen, since)}
    print(f"{' '.join(cmd)}: exit {rc}, {wall:.0f} s wall on {out['cpus']} CPUs; the processes it started "
          f"burned {out['cpu_s']:.0f} CPU-s ({out['cpu_s'] / (wall * out['cpus']):.0%} of the machine), "
          f"{out['startup_cpu_s']:.0f} of them in their first {YOUNG_S:.0f} s of life, in "
          f"{out['processes']} processes")
    for name, k in out["kinds"].items():
        print(f"  {k['cpu_s']:7.0f} CPU-s {k['cpu_s'] / max(out['cpu_s'], 1e-9):4.0%}  {k['processes']:5d} "
              f"processes, {k['startup_cpu_s']:6.0f} s starting  {name}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return rc


if __name__ == "__main__":
    sys.exit(main())
