"""A real `mlflow server` on 127.0.0.1 for the tracking tests: sqlite backend, artifacts served
by the server itself (the client uploads over HTTP, as against a team's server) into a local
folder. Started and stopped by a fixture (conftest.py `mlflow_server`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """(the server process, its URL) once /health answers; the process leads its own group
    (the server runs uvicorn as a child) so that `stop` ends both."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "wb")
    # MLflow's background job runner (huey) is not installed nor needed for tracking
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited {proc.returncode}: "
                               f"{(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"mlflow server did not answer within {timeout_s} s: "
                       f"{(root / 'server.log').read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
