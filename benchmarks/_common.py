"""Helpers shared by the benchmark scripts (ingest.py, scale.py): memory sampling, a loopback
S3 server. Imported as `_common` (the scripts put benchmarks/ on sys.path)."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size of this process, sampled from /proc/self/statm.

    tree=True samples instead the proportional set size (PSS, /proc/<pid>/smaps_rollup) of
    this process and all its descendants, summed: forked workers' shared pages counted once."""

    def __init__(self, interval: float = 0.005, tree: bool = False):
        self.interval, self.tree, self.peak, self._stop = interval, tree, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def sample(self) -> int:
        return tree_pss(os.getpid()) if self.tree else self.current()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    @staticmethod
    def cpu() -> float:
        """CPU seconds (user + system) of this process and its finished children."""
        a, b = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def __enter__(self):
        self.start_rss, self.start_cpu = self.sample(), self.cpu()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.sample())
        self.cpu_seconds = self.cpu() - self.start_cpu


def descendants(pid: int) -> list[int]:
    """pid and every process below it (by the parent ids in /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:  # gone meanwhile
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_pss(pid: int) -> int:
    """Bytes: the summed PSS of pid and its descendants (0 for those that vanish meanwhile)."""
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


def mib(b: int) -> str:
    return f"{b / 2**20:7.1f} MiB"


@contextlib.contextmanager
def loopback_s3(bucket: str):
    """A moto S3 server on 127.0.0.1 in this process (its objects live in this process's
    memory, not in a measured child's) with `bucket` created; yields the environment a child
    process needs to reach it through brainmri's storage (BRAINMRI_S3_ENDPOINT)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1", "BRAINMRI_S3_ENDPOINT": endpoint}
        env.pop("AWS_ENDPOINT_URL", None)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing"
                     ).create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


def child_result(cmd: list[str], env=None, cwd=None) -> dict:
    """Run a phase process; its numbers are the JSON on its line starting with RESULT.
    A failed process raises RuntimeError with its output's tail."""
    import json
    import subprocess

    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[1:4])}... failed ({p.returncode}):\n"
                           f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])
