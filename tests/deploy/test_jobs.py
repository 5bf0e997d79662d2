"""The documented local-cluster commands (docs/operations.md), run as written: `ray start
--head` on loopback, `ray job submit` of jobs/*.py with jobs/runtime_env.yaml, outputs checked
in storage.

What the test changes, and only this: the dashboard port 8265 becomes a free port; the `ray
start` line gets flags appended that keep this head apart from any other Ray on the machine
(its own ports and --temp-dir, --block so that it dies with the test, 4 logical CPUs,
no usage stats); `ray stop` is not run (it would stop every Ray on the machine) but the head is
stopped (without Ray's 30 s drain on SIGTERM). The commands run in a copy of the project (its
code, the venv linked in as `.venv`) whose `lake/` holds a small real subset ingested as the
README's main job does, with HOME pointing at an empty folder (a fresh machine: no
~/.ray/auth_token)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from brainmri.config import IngestConfig
from brainmri.data.ingest import ingest

from support.data import REPO, real_subset

pytestmark = [pytest.mark.ray, pytest.mark.slow]
VENV = Path(sys.executable).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DOC = REPO / "docs" / "operations.md"
SECTION = "\n## Jobs on a local Ray cluster\n"


def cluster_commands() -> list[str]:
    """The bash block of the local-cluster section of docs/operations.md, one command a line."""
    text = DOC.read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_documented_cluster_block_is_what_this_test_runs():
    """The shape the test relies on (so a doc edit fails here, not by hanging a cluster)."""
    lines = cluster_commands()
    start = [i for i, line in enumerate(lines) if line.startswith("ray start --head")]
    assert len(start) == 1 and lines[-1] == "ray stop"
    assert all(line.startswith("ray job submit ") for line in lines[start[0] + 1:-1])
    assert sum("--dashboard-port 8265" in line for line in lines) == 1


@pytest.fixture
def project(tmp_path):
    """A copy of the project after the README's main job: code, `.venv`, and a small lake
    (48 real scans a class: over 128 training rows, one batch of 64 for each of the default
    2 workers)."""
    if not (VENV / "bin" / "activate").exists():
        pytest.skip(f"no virtual environment at {VENV}")
    proj = tmp_path / "proj"
    for part in ("brainmri", "jobs"):
        shutil.copytree(REPO / part, proj / part, ignore=shutil.ignore_patterns("__pycache__"))
    (proj / ".venv").symlink_to(VENV)
    ingest(str(real_subset(tmp_path / "src", per_class=48)), str(proj / "lake"), IngestConfig(workers=1))
    return proj


@pytest.fixture
def local_cluster(project, tmp_path):
    """Runs the documented block up to its head, which it starts; yields run(line) for the rest."""
    lines = cluster_commands()
    i = next(i for i, line in enumerate(lines) if line.startswith("ray start --head"))
    dash = free_port()
    lines = [line.replace("8265", str(dash)) for line in lines]
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "BRAINMRI_"))}
    base.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    # the lines before `ray start` (activate, export, token), then the environment they leave
    pre = subprocess.run(["bash", "-ec", "\n".join(lines[:i]) + "\nenv -0"], cwd=project, env=base,
                         capture_output=True, timeout=120)
    assert pre.returncode == 0, pre.stderr.decode()[-3000:]
    env = dict(kv.split("=", 1) for kv in pre.stdout.decode().split("\0") if "=" in kv)
    assert (home / ".ray" / "auth_token").exists() and env["RAY_AUTH_MODE"] == "token"
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert token not in (pre.stdout + pre.stderr).decode()  # the documented lines keep it off screen

    temp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths must fit
    extra = ["--block", "--temp-dir", temp, "--port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port()),
             "--ray-client-server-port", str(free_port()), "--num-cpus", "4", "--disable-usage-stats"]
    # stopped by SIGTERM below: Ray 2.60 then drains the node for up to 30 s first (for Serve
    # proxies under Kubernetes); nothing here serves, so no drain
    head = subprocess.Popen(["bash", "-c", f"exec {lines[i]} {shlex.join(extra)}"], cwd=project,
                            env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
                            stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for_dashboard(dash, head, tmp_path / "head.log")
        yield lambda line, **kw: run_line(line, project, env, **kw), lines[i + 1:-1]
    finally:
        head.terminate()  # `ray start --block` stops its cluster (SIGTERM to all at once: 65 s)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_dashboard(port: int, head: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 120
    while True:  # the Jobs API answers (401 without the token is an answer too)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray head did not start:\n" + log.read_text()[-3000:]) from None
            time.sleep(1)


def run_line(line: str, cwd: Path, env: dict, ok: bool = True) -> str:
    """One documented line in bash (its "$PWD" is the project); returns the job's output."""
    for _ in range(20):  # the dashboard answers before its job agent has registered
        p = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=900)
        if "No available agent to submit job" not in p.stderr + p.stdout:
            break
        time.sleep(3)
    out = p.stdout + p.stderr
    assert (p.returncode == 0) is ok, out[-4000:]
    return out


@pytest.mark.timeout(1800)
def test_the_cluster_commands_work_as_written(local_cluster, project):
    run, (train, evaluate) = local_cluster
    assert "jobs/train.py" in train and "jobs/evaluate.py" in evaluate

    # the job's log is the console: one line per epoch, none of Ray's per-rank reports
    log = run(train)
    assert "succeeded" in log and "published model" in log
    assert [ln[:10] for ln in log.splitlines() if ln.startswith("epoch")] == [
        "epoch 1/3:", "epoch 2/3:", "epoch 3/3:"]
    assert "TrainingReport(" not in log and "pid=" not in log
    (run_dir,) = (project / "lake" / "runs").iterdir()
    assert len(json.loads((run_dir / "history.json").read_text())) == 3
    (model,) = (project / "lake" / "models" / "brainnet").iterdir()
    assert (model / "metadata.json").exists()

    log = run(evaluate)
    (report,) = (project / "lake" / "reports").glob("*/*/report.html")
    assert report.stat().st_size > 10_000 and "accuracy" in log

    # the old form of the line: the job's copy has no lake/, and says so in one line
    log = run(train.replace('"$PWD/lake"', "./lake"), ok=False)
    assert "'./lake' is relative: in a Ray job" in log and "Traceback" not in log
