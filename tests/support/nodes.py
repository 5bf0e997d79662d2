"""A local Ray node a test can kill the way a machine dies: every one of its processes at once.

A `brainmri` command run with its own local Ray puts the driver, Ray's daemons and its workers
in different process groups (Ray makes itself a group leader for its reaper; workers are the
raylet's children), so killing the command's group leaves its workers training until they
notice the raylet is gone, sometimes long enough to finish the run. Tagging the command's
environment marks every process it starts, Ray's included (they inherit it)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

TAG = "BRAINMRI_TEST_NODE"


def node_env(env: dict) -> dict:
    """`env` with a new node tag: pass it to the command, then kill_node(returned env)."""
    return {**env, TAG: uuid.uuid4().hex}


def node_pids(env: dict) -> list[int]:
    mark = f"{TAG}={env[TAG]}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:  # gone, or not ours to read
                pass
    return found


def kill_node(env: dict) -> int:
    """SIGKILL every process started with this node's tag, again until none is left (one may
    have been forked while the first were killed); how many were killed."""
    killed: set[int] = set()
    for _ in range(50):
        pids = [p for p in node_pids(env) if p not in killed]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed.update(pids)
        time.sleep(0.05)
    return len(killed)
