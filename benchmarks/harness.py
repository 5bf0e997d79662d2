"""What the benchmark scripts share: running a command (its own process group, its output in a
log file, killed whole on a timeout or Ctrl-C), where the real scans are and reading them per
class, publishing a small model, memory sampling and a loopback S3 server.

Imported as `benchmarks.harness` (the scripts run as `python -m benchmarks.<name>` from the
repository root). Only the standard library and brainmri.config at import time: gpu.py and
sweep.py run on bare GPU machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from brainmri.config import CLASSES

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "BRAINMRI_BENCH_DATA"
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- commands ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """A finished command: exit status (None: killed at its timeout), wall seconds, and where
    its output (stdout and stderr, interleaved as written) lies: log[start:end]."""

    cmd: list[str]
    returncode: int | None
    seconds: float
    log: Path
    start: int
    end: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def output(self) -> str:
        return self._read(self.start)

    def tail(self, chars: int = 4000) -> str:
        return self._read(max(self.start, self.end - chars))

    def _read(self, at: int) -> str:
        with open(self.log, "rb") as f:
            f.seek(at)
            return f.read(self.end - at).decode(errors="replace")

    def describe(self) -> str:
        shown = " ".join("python" if a == sys.executable else a for a in self.cmd)
        how = (f"killed at its timeout after {self.seconds:.0f} s" if self.returncode is None
               else f"exit {self.returncode} after {self.seconds:.0f} s")
        return f"`{shown[:300]}` {how}; the end of its log {self.log}:\n{self.tail()}"

    def check(self) -> Run:
        if not self.ok:
            raise RunFailed(self)
        return self

    def result(self) -> dict:
        """The JSON on the output's last line starting with RESULT (print_result's)."""
        lines = [ln for ln in self.output().splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RunFailed(self, "printed no RESULT line")
        return json.loads(lines[-1][len("RESULT "):])


class RunFailed(RuntimeError):
    def __init__(self, run: Run, why: str = ""):
        super().__init__((why + ": " if why else "") + run.describe())
        self.run = run


def run(cmd: list[str], log: Path | str, *, timeout: float | None = None, env: dict | None = None,
        cwd: Path | str = REPO, append: bool = False) -> Run:
    """Run `cmd` in a session of its own, stdout and stderr written to `log` as they come
    (appended with append=True), for at most `timeout` seconds.

    On the timeout, and on any exception here while it runs (Ctrl-C, a test's timeout), the
    whole process group gets SIGKILL: the command and all it started, a local Ray's GCS,
    raylet and workers included, as when a node dies. After a normal exit the group's
    leftovers get it too, so nothing a command starts outlives it. Either way this returns
    once no process of the group is left. The command runs with RAY_ADDRESS="" (its own local
    Ray, inside its group, never a cluster found on the machine) and unbuffered output."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env, RAY_ADDRESS="", PYTHONUNBUFFERED="1")
    # A Ctrl-C while Popen is still returning (the command may have started its own children
    # already: seen under load) would leave `p` unset and the group running: it is held back
    # until `p` is known, then raised, and the group killed like any other interruption.
    # Python runs signal handlers in the main thread only, so other threads need nothing.
    held: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum)) if main else None
    if main and before is None:  # a handler set outside Python: the default comes closest
        before = signal.SIG_DFL
    p = None
    with open(log, "ab" if append else "wb") as f:
        start = f.tell()
        t0 = time.perf_counter()
        try:
            try:
                p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            finally:
                if main:
                    signal.signal(signal.SIGINT, before)
            if held:
                raise KeyboardInterrupt
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            seconds = time.perf_counter() - t0  # the command's own, not the clean-up's
            if p is not None:
                kill_group(p)
    return Run(list(cmd), rc, seconds, log, start, log.stat().st_size)


def kill_group(p: subprocess.Popen, wait_s: float = 10.0) -> None:
    """SIGKILL every process in p's group (p leads it: start_new_session), reap p, then wait
    up to wait_s for the rest to be gone (the kernel ends them asynchronously)."""
    with contextlib.suppress(ProcessLookupError):  # the group is empty already
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + wait_s
    while group_members(p.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def proc_stats():
    """(pid, name, fields) of each process in /proc now, `fields` being /proc/<pid>/stat after
    the name: [0] state, [1] parent, [2] process group, [11] and [12] user and system CPU in
    clock ticks, [19] start in ticks since boot. A process gone meanwhile is skipped."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:  # gone meanwhile
                continue
            head, _, rest = stat.rpartition(")")  # the name may hold spaces and parentheses
            yield int(d), head[head.find("(") + 1:], rest.split()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is pgid, from /proc."""
    return [pid for pid, _, f in proc_stats() if int(f[2]) == pgid and f[0] != "Z"]


def print_result(out: dict) -> None:
    """A child's numbers for child_result: one line, RESULT and JSON. Written in one call and
    on a line of its own: stderr shares the log, and another thread may be writing to it."""
    sys.stdout.write(f"\nRESULT {json.dumps(out)}\n")
    sys.stdout.flush()


def child_result(cmd: list[str], log: Path | str, env: dict | None = None, append: bool = False) -> dict:
    """Run a phase process (cwd: the repository) and return the JSON it printed with
    print_result; a failed process raises RunFailed with its log's end."""
    return run(cmd, log, env=env, append=append).check().result()


# -- the real scans ------------------------------------------------------------------------------
def data_root() -> Path:
    """The Kaggle-layout dataset the benchmarks read (a folder holding Training/<class>/):
    $BRAINMRI_BENCH_DATA when set, else ../shared/data/brain-tumor-mri beside the repository."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data" / "brain-tumor-mri"


def training_folder(root: Path | str | None = None) -> Path:
    """The folder holding a class folder for each of CLASSES: root/Training, or root itself
    (root: data_root() by default). Exits with status 2 and one line when neither holds them."""
    root = Path(root) if root else data_root()
    for p in (root / "Training", root):
        if all((p / c).is_dir() for c in CLASSES):
            return p
    print(f"error: no class folders ({', '.join(CLASSES)}) under {root} or {root / 'Training'}; "
          f"{DATA_ENV} names the dataset folder", file=sys.stderr)
    raise SystemExit(2)


def scans(per_class: int | None = None, offset: int = 0, every: int = 1,
          root: Path | str | None = None) -> dict[str, list[Path]]:
    """{class: files}, CLASSES in order: each class folder's files by name (hidden ones and
    folders left out), every `every`-th from `offset` on, at most per_class of them. Sorted
    names: the same scans on every machine."""
    folder = training_folder(root)
    out = {}
    for c in CLASSES:
        files = sorted(p for p in (folder / c).iterdir() if p.is_file() and not p.name.startswith("."))
        out[c] = files[offset::every][:per_class]
    return out


def read_scans(per_class: int | None = None, offset: int = 0,
               root: Path | str | None = None) -> tuple[list[bytes], list[int]]:
    """The bytes of scans(per_class, offset) and their class indices, class by class."""
    data, labels = [], []
    for i, files in enumerate(scans(per_class, offset, root=root).values()):
        data += [f.read_bytes() for f in files]
        labels += [i] * len(files)
    return data, labels


def copy_scans(dest: Path, per_class: int | None = None, offset: int = 0, every: int = 1,
               root: Path | str | None = None) -> list[Path]:
    """Copy scans(...) into dest/<class>/ (dest/Training for a Kaggle-layout source); the copies."""
    out = []
    for c, files in scans(per_class, offset, every, root).items():
        (dest / c).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / c / f.name)
            out.append(dest / c / f.name)
    return out


# -- a model to benchmark ------------------------------------------------------------------------
def publish_small_model(store: Path, cfg=None, model=None, dataset: dict | None = None) -> str:
    """Publish a model into store/models/<cfg.model>/ as run_training publishes one; returns the
    version URI. `model`: a network of cfg's model and model_args, its weights as they are;
    None: cfg's network with random weights (seed 0), its whole shape recorded (cfg.shape()),
    for benchmarks of inference, whose cost does not depend on the weights' values. cfg:
    TrainConfig's defaults when None; dataset: the checkpoint's dataset record."""
    import torch

    from brainmri.config import TrainConfig, to_dict
    from brainmri.core.storage import open_location
    from brainmri.models.checkpoints import make_checkpoint, publish_model
    from brainmri.models.zoo import count_params, create_model

    cfg = cfg or TrainConfig()
    if model is None:
        torch.manual_seed(0)
        cfg = dataclasses.replace(cfg, model_args=cfg.shape())  # recorded with the weights they fit
        model = create_model(cfg.model, len(CLASSES), 1, image_size=cfg.image_size, **cfg.model_args)
    ckpt = make_checkpoint(model.eval().state_dict(), epoch=0, best=0.0, bad_epochs=0, history=[],
                           resumes=[], config=to_dict(cfg), classes=list(CLASSES),
                           dataset=dataset or {"uri": "", "name": "none", "version": "none"},
                           params=count_params(model))
    return publish_model(open_location(str(store)), cfg.model, ckpt, {}).uri


# -- memory and CPU ------------------------------------------------------------------------------
def own_cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its children that have ended and
    been waited for (forked workers, a DataLoader's once its iterator is done with them)."""
    a, b = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


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

    def __enter__(self):
        self.start_rss, self.start_cpu = self.sample(), own_cpu_s()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.sample())
        self.cpu_seconds = own_cpu_s() - self.start_cpu


def descendants(pid: int) -> list[int]:
    """pid and every process below it (by the parent ids in /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for p, _, f in proc_stats():
        children.setdefault(int(f[1]), []).append(p)
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


# -- S3 ------------------------------------------------------------------------------------------
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
