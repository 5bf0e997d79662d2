"""A Ray cluster of separate hosts on one Linux machine, built from nothing and torn down whole.

Each host is a network namespace with its own address on one Linux bridge (veth pairs), and
its own mount namespace in which a private folder is mounted over /tmp and a fresh tmpfs
over /dev/shm: its own local disk, Ray temp dir (/tmp/ray: worker nodes take the head's
path, so a shared /tmp would mix the nodes' runtime-env folders) and object store; and its
own hostname (UTS namespace) resolving to its own address (/etc/hosts). The hosts:

    head   `ray start --head`, 0 CPUs (as a production head: no work scheduled on it), the
           dashboard and job API on http://<head>:8265; job drivers run here
    w1..wN `ray start --address <head>:6379 --num-cpus 1`
    s3     moto's S3 server: the only storage the hosts share

This machine's own namespace (the caller: a test, a person) reaches them through the
bridge's address, like a laptop on the cluster's network: it submits jobs with `ray job
submit` and reads the bucket back. Every node runs the project's venv, from a clean
environment: S3 settings (BRAINMRI_S3_ENDPOINT, test credentials), Ray's token auth, HOME
and TMPDIR on its own disk; the job's code travels in its runtime env (`--working-dir .`).

Everything is named after the cluster (`<name>-br`, `<name>-head`, ...), so `down(name)`
finds and removes it from the names alone: idempotent, and usable after a crash. It leaves
none of: processes (all those in the namespaces, SIGKILLed: a host powered off),
namespaces, veths, the bridge, mounts (they live in the nodes' mount namespaces, which end
with their last process). `watch` does it when the owning process dies. Only the standard
library and benchmarks.harness at import time: the by-hand script (benchmarks/cluster.py)
imports it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import harness as bench

REPO = bench.REPO
VENV_BIN = REPO / ".venv" / "bin"
SUBNETS = "10.213"  # 10.213.<k>.0/24, one free k per cluster
DASHBOARD_PORT, GCS_PORT, S3_PORT = 8265, 6379, 5000
OBJECT_STORE = 256 << 20  # bytes a node's object store may hold (its /dev/shm is 512 MiB)
# every node's `ray start`: in the foreground (the host's process tree), a small object store
RAY_START = [str(VENV_BIN / "ray"), "start", "--block", "--object-store-memory", str(OBJECT_STORE),
             "--disable-usage-stats"]
LOCK = Path("/run/lock/brainmri-cluster.lock")  # picking a subnet and making the bridge
_SUBMISSIONS = itertools.count()  # job ids unique within this process
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,5}$")  # `<name>-head` must fit an interface name (15)


def unavailable() -> str | None:
    """Why namespaces cannot make hosts here, in one line; None where they can."""
    if sys.platform != "linux":
        return "the cluster needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the cluster needs root (network and mount namespaces, a bridge)"
    for tool in ("ip", "unshare", "mount"):
        if not shutil.which(tool):
            return f"the cluster needs `{tool}` (iproute2/util-linux), not found on PATH"
    for tool in ("ray", "moto_server"):
        if not (VENV_BIN / tool).exists():
            return f"the cluster needs {VENV_BIN / tool} (the project's venv)"
    # every host mounts its own disk over /tmp: a checkout or venv under /tmp is hidden there
    for what, path in (("checkout", REPO), ("venv", VENV_BIN)):
        for p in {Path(os.path.abspath(path)), path.resolve()}:
            if p == Path("/tmp") or Path("/tmp") in p.parents:
                return (f"the cluster's hosts each mount a private /tmp, which hides this {what} ({p}): "
                        "run the cluster tier from a checkout outside /tmp")
    # what a node needs, tried in a namespace of its own that ends with the probe
    probe = subprocess.run(["unshare", "--net", "--mount", "--uts", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /dev/shm && ip link set lo up && hostname probe"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode:
        why = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        return f"namespaces are unavailable here (unshare --net --mount --uts: {why})"
    return None


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and r.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")
    return r


@dataclass
class Node:
    name: str  # head, s3, w1, ...
    ns: str  # its network namespace (and host-side veth)
    ip: str
    disk: Path  # its local disk on this machine: mounted at /tmp inside
    argv: list[str] = field(default_factory=list)  # its one long-lived command
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.disk.parent / f"{self.name}.log"


@dataclass
class Cluster:
    """A cluster to `up()`; `down()` (or `down(name)` from anywhere) removes it. `work` holds
    the nodes' disks and logs and is kept (Ray's logs: /tmp/ray/session_latest/logs inside)."""

    name: str
    work: Path
    workers: int = 3
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    subnet: str = ""  # 10.213.<k>, chosen by up()
    nodes: dict[str, Node] = field(default_factory=dict)
    bucket: str = "lake"

    def __post_init__(self):
        if not NAME_RE.match(self.name):
            raise ValueError(f"cluster name {self.name!r}: a lowercase letter, then up to 5 of [a-z0-9]")
        self.work = Path(self.work)

    # -- addresses and environments ----------------------------------------------------------
    @property
    def head(self) -> Node:
        return self.nodes["head"]

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.nodes['s3'].ip}:{S3_PORT}"

    def s3_env(self) -> dict:
        """What every S3 client needs here (brainmri.core.storage reads the endpoint)."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_REGION": "us-east-1", "BRAINMRI_S3_ENDPOINT": self.s3_endpoint}

    def node_env(self) -> dict:
        """A node's whole environment: nothing inherited from the machine's."""
        return {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/tmp/home", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                **self.s3_env()}

    def client_env(self) -> dict:
        """This machine's environment for the cluster's client: `ray job` and S3 reach it,
        other Ray, AWS and brainmri settings of the caller's left out."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "AWS_", "BRAINMRI_"))}
        return {**env, "PATH": f"{VENV_BIN}:{env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token, **self.s3_env()}

    @contextlib.contextmanager
    def as_client(self):
        """This process as a client of the cluster's S3 (brainmri.core.storage, boto3)."""
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.client_env())
        try:
            yield self
        finally:
            os.environ.clear()
            os.environ.update(saved)

    # -- building ------------------------------------------------------------------------------
    def up(self, timeout: float = 300) -> Cluster:
        """Bridge, hosts, S3 (its bucket made), head, then workers; returns once the job API
        answers and every worker has joined. On any failure it tears down what it made."""
        down(self.name)  # what a killed run of the same name left
        try:
            self._network()
            self._start("s3", [str(VENV_BIN / "moto_server"), "-H", self.nodes["s3"].ip, "-p", str(S3_PORT)])
            self._start("head", [*RAY_START, "--head", "--node-ip-address", self.head.ip,
                                 "--port", str(GCS_PORT), "--dashboard-host", self.head.ip,
                                 "--dashboard-port", str(DASHBOARD_PORT), "--num-cpus", "0"])
            deadline = time.monotonic() + timeout
            self._wait(lambda: self._http(self.s3_endpoint) is not None, "the S3 server", deadline, "s3")
            self._make_bucket()
            # the workers once the head node is registered: on a loaded machine, starting
            # them meanwhile slows its raylet past `ray start`'s fixed 30 s registration wait
            self._wait(lambda: len(self.alive_nodes()) == 1, "the head node", deadline, "head")
            for i in range(1, self.workers + 1):
                self.add_worker(f"w{i}", wait=False)
            self._wait(lambda: len(self.alive_nodes()) == 1 + self.workers,
                       f"{self.workers} workers joining", deadline, *self._worker_names())
            return self
        except BaseException:
            self.down()
            raise

    def _network(self) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two clusters never pick the same subnet
            addrs = sh("ip", "-4", "-o", "addr").stdout
            used = set(re.findall(rf"inet {re.escape(SUBNETS)}\.(\d+)\.", addrs))
            k = next((k for k in range(1, 255) if str(k) not in used), None)
            if k is None:
                raise RuntimeError(f"no free {SUBNETS}.<k>.0/24 subnet for the cluster's bridge")
            self.subnet = f"{SUBNETS}.{k}"
            br = f"{self.name}-br"
            sh("ip", "link", "add", br, "type", "bridge")
            sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", br)
            sh("ip", "link", "set", br, "up")
        self._host("s3", 2)
        self._host("head", 10)

    def _host(self, name: str, octet: int) -> Node:
        """A namespace with its own address on the bridge (lo up too: Ray uses it)."""
        ns = f"{self.name}-{name}"
        node = Node(name, ns, f"{self.subnet}.{octet}", self.work / "nodes" / name / "disk")
        shutil.rmtree(node.disk, ignore_errors=True)
        node.disk.mkdir(parents=True)
        self.nodes[name] = node
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", ns, "master", f"{self.name}-br", "up")
        sh("ip", "-n", ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return node

    def _start(self, name: str, argv: list[str]) -> None:
        """Run argv as the host's one long-lived process tree: in its network namespace, in a
        mount namespace of its own (private propagation: nothing mounted here reaches this
        machine), with its disk at /tmp and a fresh /dev/shm, from a clean environment; and
        with its own hostname, resolving to its own address as a real host's does (torch's
        Gloo backend, DDP on CPUs, tells the other ranks the address its hostname resolves
        to: this machine's resolves to 127.0.0.1)."""
        node = self.nodes[name]
        node.argv, node.starts = argv, node.starts + 1
        hosts = node.disk.parent / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n{node.ip} {node.ns}\n")
        inner = ('hostname "$2" && mount --bind "$1" /etc/hosts '
                 '&& mount -t tmpfs -o size=512m,mode=1777 tmpfs /dev/shm && mount --bind "$0" /tmp '
                 '&& mkdir -p /tmp/home && cd /tmp && shift 2 && exec "$@"')
        env = [f"{k}={v}" for k, v in self.node_env().items()]
        cmd = ["ip", "netns", "exec", node.ns, "unshare", "--mount", "--uts", "--propagation", "private",
               "sh", "-c", inner, str(node.disk), str(hosts), node.ns, "env", "-i", *env, *argv]
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd="/")

    def add_worker(self, name: str, wait: bool = True, timeout: float = 180) -> Node:
        """A worker host joining the running cluster (as the autoscaler would add one)."""
        octet = 10 + int(name[1:]) if re.fullmatch(r"w\d{1,2}", name) else None
        if octet is None or name in self.nodes:
            raise ValueError(f"worker name {name!r}: w1..w99, not one of {sorted(self.nodes)}")
        self._host(name, octet)
        ip = self.nodes[name].ip
        self._start(name, [*RAY_START, "--address", f"{self.head.ip}:{GCS_PORT}",
                           "--node-ip-address", ip, "--num-cpus", "1"])
        if wait:  # by its address: a host killed just before may still count as alive
            self._wait(lambda: any(n.get("node_ip") == ip for n in self.alive_nodes()), f"{name} joining",
                       time.monotonic() + timeout, name)
        return self.nodes[name]

    def _worker_names(self) -> list[str]:
        return [n for n in self.nodes if n not in ("head", "s3")]

    def _make_bucket(self) -> None:
        import boto3

        env = self.s3_env()
        boto3.client("s3", endpoint_url=env["BRAINMRI_S3_ENDPOINT"], region_name=env["AWS_REGION"],
                     aws_access_key_id="testing", aws_secret_access_key="testing"
                     ).create_bucket(Bucket=self.bucket)

    def _wait(self, ready, what: str, deadline: float, *nodes: str, starts: int = 3) -> None:
        """Until ready(). A node among `nodes` whose command exited (a `ray start` that gave up
        on a loaded machine) is started again, up to `starts` times in all."""
        while not ready():
            dead = [n for n in nodes if self.nodes[n].proc and self.nodes[n].proc.poll() is not None]
            again = [n for n in dead if self.nodes[n].starts < starts and time.monotonic() < deadline]
            for n in again:
                self.nodes[n].proc.wait()
                _kill_namespace(self.nodes[n].ns)  # what the failed start left running
                self._start(n, self.nodes[n].argv)
                dead.remove(n)
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else "timed out"
                tails = "\n".join(f"--- {n}: {self.nodes[n].log}\n{tail(self.nodes[n].log)}" for n in nodes)
                raise RuntimeError(f"cluster {self.name}: {what}: {why}\n{tails}")
            time.sleep(1)

    def request(self, url: str, data: bytes | None = None, method: str | None = None,
                headers: dict | None = None, timeout: float = 5) -> tuple[int | None, bytes | None]:
        """(HTTP status, body) of a request from this machine to the cluster's network, with
        the cluster's token (Ray's APIs ask for it; a Serve route ignores it); (None, None)
        while nothing answers."""
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return None, None

    def _http(self, url: str, timeout: float = 5) -> bytes | None:
        """The body at url (None: no answer yet, or a server error)."""
        status, body = self.request(url, timeout=timeout)
        return body if status is not None and status < 500 else None

    def alive_nodes(self) -> list[dict]:
        """Ray's live nodes ({node_id, node_ip, is_head_node, ...}), by the State API."""
        body = self._http(f"{self.dashboard}/api/v0/nodes?limit=100&detail=false")
        try:
            rows = json.loads(body)["data"]["result"]["result"]
        except (TypeError, ValueError, KeyError):
            return []
        return [r for r in rows if r.get("state") == "ALIVE"]

    # -- using -----------------------------------------------------------------------------------
    def submit(self, entrypoint: list[str], log: Path | str, timeout: float = 600) -> bench.Run:
        """`ray job submit` of `python <entrypoint...>` from the repository, as users submit
        (jobs/runtime_env.yaml, the code in the job's working dir); waits for the job's end."""
        deadline = time.monotonic() + timeout
        for attempt in range(20):  # the job API answers before the head's job agent has registered
            job_id = f"{self.name}-{os.getpid()}-{next(_SUBMISSIONS)}"
            cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard, "--submission-id",
                   job_id, "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--", "python",
                   *entrypoint]
            r = bench.run(cmd, log, timeout=max(1.0, deadline - time.monotonic()), env=self.client_env(),
                          append=True)
            if r.returncode is None:
                # killing the client leaves the job running on the cluster, holding its CPUs
                # (a later test's job would then wait for them): stop it
                self.stop_job(job_id, log)
            if r.ok or "No available agent to submit job" not in r.tail():
                return r
            time.sleep(3)
        return r

    def stop_job(self, job_id: str, log: Path | str) -> None:
        """`ray job stop` (which waits for the job to end), then what it said to the log."""
        bench.run([str(VENV_BIN / "ray"), "job", "stop", "--address", self.dashboard, job_id], log,
                  timeout=120, env=self.client_env(), append=True)

    def submit_bg(self, entrypoint: list[str], log: Path | str, timeout: float = 600
                  ) -> concurrent.futures.Future:
        """submit() in a thread of its own: the future's result is the harness Run, while the
        caller does something to the cluster meanwhile (kills a host, a driver)."""
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-job")
        try:
            return pool.submit(self.submit, entrypoint, log, timeout)
        finally:
            pool.shutdown(wait=False)

    def s3(self):
        """A boto3 S3 client of this machine's for the cluster's bucket."""
        import boto3

        env = self.s3_env()
        return boto3.client("s3", endpoint_url=env["BRAINMRI_S3_ENDPOINT"], region_name=env["AWS_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def read_json(self, key: str, client=None):
        """The JSON object at key in the bucket; None while there is none (or it is torn)."""
        try:
            body = (client or self.s3()).get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return json.loads(body)
        except Exception:  # NoSuchKey, a connection refused: not there (yet)
            return None

    def node_by_ip(self, ip: str) -> Node:
        [node] = [n for n in self.nodes.values() if n.ip == ip]
        return node

    def pids(self, name: str, *words: str) -> list[int]:
        """Live processes on host `name` whose command line holds every one of `words`."""
        out = []
        for pid in _ns_pids(self.nodes[name].ns):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            line = " ".join(a.decode(errors="replace") for a in argv)
            if all(w in line for w in words):
                out.append(pid)
        return out

    def upload(self, local: Path, prefix: str) -> list[str]:
        """Copy the files below `local` into the bucket under `prefix`, keyed by their path
        relative to `local` (from this machine, as a client would); the keys."""
        import boto3

        env = self.s3_env()
        s3 = boto3.client("s3", endpoint_url=env["BRAINMRI_S3_ENDPOINT"], region_name=env["AWS_REGION"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        keys = []
        for p in sorted(Path(local).rglob("*")):
            if p.is_file():
                keys.append(f"{prefix.strip('/')}/{p.relative_to(local).as_posix()}")
                s3.upload_file(str(p), self.bucket, keys[-1])
        return keys

    def kill(self, name: str) -> None:
        """Power a host off: SIGKILL every process in its namespace, no notice."""
        _kill_namespace(self.nodes[name].ns)
        if self.nodes[name].proc:
            self.nodes[name].proc.wait()

    def link(self, name: str, up: bool) -> None:
        """Unplug (up=False) or plug back host `name`'s network cable: the bridge side of its
        veth pair goes down or up; its processes keep running, unreachable meanwhile."""
        sh("ip", "link", "set", self.nodes[name].ns, "up" if up else "down")

    @contextlib.contextmanager
    def supervise(self, name: str):
        """While inside: host `name`'s supervisor (systemd's Restart=always, say) runs Ray on it
        again whenever its `ray start --block` exits (it does when its raylet exits: a raylet
        the head declared dead exits on hearing so, which may be long after its network came
        back). Yields a dict: restarts (count), errors (a restart that failed)."""
        seen = {"restarts": 0, "errors": []}
        stop = threading.Event()

        def watch():
            while not stop.wait(0.5):
                proc = self.nodes[name].proc
                if proc is None or proc.poll() is None:
                    continue
                try:
                    self.restart(name)
                    seen["restarts"] += 1
                except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
                    seen["errors"].append(f"{type(e).__name__}: {e}")
                    return

        t = threading.Thread(target=watch, name=f"{self.name}-supervise-{name}", daemon=True)
        t.start()
        try:
            yield seen
        finally:
            stop.set()
            t.join()

    def restart(self, name: str, timeout: float = 180) -> None:
        """Host `name`'s Ray again, as its supervisor (or the autoscaler) would after the
        raylet gave up: what is left of it killed, its `ray start` run again, joined."""
        self.kill(name)
        self._start(name, self.nodes[name].argv)
        ip = self.nodes[name].ip
        self._wait(lambda: any(n.get("node_ip") == ip for n in self.alive_nodes()), f"{name} rejoining",
                   time.monotonic() + timeout, name)

    def down(self) -> None:
        for node in self.nodes.values():
            if node.proc:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
        down(self.name)
        for node in self.nodes.values():
            if node.proc:
                node.proc.wait()

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


def pipeline_jobs(bucket: str, run: str) -> list[tuple[str, list[str]]]:
    """(step, entrypoint) of the pipeline across hosts, every path in the bucket: ingest of
    s3://<bucket>/src (Kaggle layout) with the ray engine, training with 2 workers spread
    over the hosts (run name `run`), evaluation of the model it publishes on the test split."""
    lake = f"s3://{bucket}/lake"
    return [
        ("ingest", ["jobs/ingest.py", f"s3://{bucket}/src", lake, "--engine", "ray"]),
        ("train", ["jobs/train.py", "--data", lake, "--out", lake, "--name", run, "--num-workers", "2",
                   "--placement", "spread", "--epochs", "2", "--batch-size", "8", "--image-size", "64",
                   "--set", "model_args.width=8"]),
        ("evaluate", ["jobs/evaluate.py", "--model", f"{lake}/models/brainnet",
                      "--data", f"{lake}/datasets/brain-tumor-mri", "--out", lake]),
    ]


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_bytes()[-chars:].decode(errors="replace")
    except OSError:
        return "(no log)"


# -- tearing down, by name ---------------------------------------------------------------------------
def namespaces(name: str) -> list[str]:
    """The network namespaces of cluster `name` that exist now."""
    out = sh("ip", "netns", "list", check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(f"{name}-")]


def links(name: str) -> list[str]:
    """Its interfaces in this machine's namespace (bridge and host-side veths)."""
    out = sh("ip", "-o", "link", "show", check=False).stdout
    names = [m.split("@")[0] for m in re.findall(r"^\d+: (\S+):", out, re.M)]
    return [n for n in names if n.startswith(f"{name}-")]


def _ns_pids(ns: str) -> list[int]:
    """The live processes whose network namespace is `ns` (as `ip netns pids`)."""
    try:
        want = os.stat(f"/run/netns/{ns}").st_ino
    except FileNotFoundError:
        return []
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}/ns/net").st_ino == want and alive(int(d)):
                    out.append(int(d))
            except OSError:  # gone meanwhile
                pass
    return out


def alive(pid: int) -> bool:
    """Whether process pid exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_namespace(ns: str, wait_s: float = 30) -> None:
    """SIGKILL every process in the namespace until none is left (Ray forks while dying)."""
    deadline = time.monotonic() + wait_s
    while pids := _ns_pids(ns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in namespace {ns} survive SIGKILL")
        time.sleep(0.1)


def down(name: str, wait_s: float = 30) -> list[str]:
    """Remove cluster `name` whole: its processes, namespaces, veths and bridge. Idempotent;
    returns the names it found to remove (a host's namespace and veth share one)."""
    found = sorted(set(namespaces(name) + links(name)))
    for ns in namespaces(name):
        _kill_namespace(ns)
        sh("ip", "netns", "del", ns, check=False)
    for link in links(name):
        sh("ip", "link", "del", link, check=False)  # a veth goes with its namespace, a bridge not
    deadline = time.monotonic() + wait_s
    while namespaces(name) or links(name):  # the kernel removes veths asynchronously
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster {name}: still there after down: {namespaces(name) + links(name)}")
        time.sleep(0.2)
    return found


def processes(name: str) -> list[int]:
    """The live processes in cluster `name`'s namespaces: its hosts' Ray, S3 and job processes."""
    return [pid for ns in namespaces(name) for pid in _ns_pids(ns)]


def leftovers(name: str) -> list[str]:
    """What of cluster `name` exists now (empty after down): namespaces, links."""
    return namespaces(name) + links(name)


def watch(owner: int, name: str) -> subprocess.Popen:
    """A process of its own that tears cluster `name` down once process `owner` is gone,
    however it ended (SIGKILL included); kill it after a normal down."""
    code = ("import os, sys, time\n"
            "from tests.cluster.harness import down\n"
            "owner = int(sys.argv[1])\n"
            "while os.path.exists(f'/proc/{owner}'):\n"
            "    time.sleep(1)\n"
            "down(sys.argv[2])\n")
    return subprocess.Popen([sys.executable, "-c", code, str(owner), name], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
