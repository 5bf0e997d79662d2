"""The real submission path: `ray start --head` on loopback, `ray job submit` of jobs/*.py with
jobs/runtime_env.yaml (as the README documents), outputs checked in storage."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from brainmri.models.checkpoints import load_model_state

from support.data import REPO
from support.tiny import small_lake

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head on 127.0.0.1 with the dashboard (the Jobs API lives there), its own
    token, and our interpreter first on PATH (the job driver runs `python`). `--block` ties
    the head's processes to this Popen, so stopping it stops only this cluster (`ray stop`
    would stop every Ray instance on the machine, the test session's own included). Its own
    short --temp-dir keeps `ray start` from recording itself in /tmp/ray/ray_current_cluster,
    where every later plain `ray.init()` on this machine would try to join it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    port, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths must fit
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--temp-dir", temp,
         "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--include-dashboard", "true", "--num-cpus", "4", "--disable-usage-stats",
         # Ray's fixed defaults (52365, 10001) collide with any other Ray on this machine, and
         # an agent that cannot bind leaves the head unable to take jobs
         "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client)],
        env=env, stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:  # the Jobs API answers (401 without the token is an answer too)
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ray head did not start:\n" + (tmp_path / "head.log").read_text()[-3000:])
                time.sleep(1)
        yield url, env
    finally:
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def submit(url: str, env: dict, *argv: str, timeout: int = 900) -> str:
    """`ray job submit` exactly as the README documents it; returns the job's output."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--", "python", *argv]
    for _ in range(20):  # the dashboard answers before its job agent has registered
        p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in p.stderr + p.stdout:
            break
        time.sleep(3)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "succeeded" in p.stdout + p.stderr
    return p.stdout + p.stderr


@pytest.mark.timeout(1800)
def test_submitted_jobs_train_and_report_into_storage(tmp_path, ray_head):
    url, env = ray_head
    lake, version = small_lake(tmp_path, per_class=16)
    out = tmp_path / "store"
    log = submit(url, env, "jobs/train.py", "--data", version, "--out", str(out), "--name", "job-run",
                 "--epochs", "2", "--image-size", "64", "--batch-size", "8", "--num-workers", "1",
                 "--set", "model_args={width: 8}")
    assert "published model" in log
    run = out / "runs" / "job-run"
    assert len(list(run.glob("checkpoint_*/checkpoint.pt"))) >= 1
    assert len(json.loads((run / "history.json").read_text())) == 2
    (model,) = (out / "models" / "brainnet").iterdir()
    assert (model / "metadata.json").exists()
    assert load_model_state(str(model))["dataset"]["uri"] == version

    log = submit(url, env, "jobs/evaluate.py", "--model", str(model), "--data", version,
                 "--out", str(out))
    (report,) = out.glob("reports/*/*/report.html")
    assert report.stat().st_size > 10_000 and "accuracy" in log
