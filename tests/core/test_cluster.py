"""brainmri.core.cluster: the Ray a driver starts for itself is lean (no dashboard, none of the
background parts one machine has no use for), every process it starts sees that, and a value
the user exported wins. A real local Ray, in its own process (the suite's shared Ray is
already up in this one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brainmri.core.cluster import LOCAL_RAY_ENV

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, ray
from brainmri.core.cluster import LOCAL_RAY_ENV, init_ray
init_ray(address="local")

@ray.remote(num_cpus=0)
def seen():
    return {k: os.environ.get(k) for k in LOCAL_RAY_ENV}

node = ray._private.worker._global_node
print(json.dumps({"worker": ray.get(seen.remote()), "webui": node.address_info.get("webui_url")}))
ray.shutdown()
"""


@pytest.mark.slow  # starts a Ray of its own
@pytest.mark.ray
def test_a_ray_started_here_is_lean_and_the_users_values_win():
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_RAY_ENV and k != "RAY_ADDRESS"}
    env["RAY_TRAIN_METRICS_ENABLED"] = "1"  # the user's own choice
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["worker"] == dict(LOCAL_RAY_ENV, RAY_TRAIN_METRICS_ENABLED="1")
    assert not got["webui"]  # no dashboard server (Ray keeps a headless process for its own use)


def test_a_ray_named_by_ray_address_is_joined_not_started(monkeypatch):
    """RAY_ADDRESS (ray job submit) means join: nothing of LOCAL_RAY_ENV or the dashboard
    choice is applied to someone else's Ray; address="local" always starts one."""
    from brainmri.core.cluster import starts_ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not starts_ray()
    assert starts_ray("local")
