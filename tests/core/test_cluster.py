"""brainmri.core.cluster: the Ray a driver starts for itself is lean (no dashboard, none of the
background parts one machine has no use for), every process it starts sees that, and a value
the user exported wins. A real local Ray, in its own process (the suite's shared Ray is
already up in this one). Also the private Ray functions behind it, pinned."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray._private import services
from ray._private import state as ray_state

from brainmri.core import console
from brainmri.core.cluster import LOCAL_RAY_ENV, autoscaler_max_resources, starts_ray

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, ray
from brainmri.core.cluster import LOCAL_RAY_ENV, autoscaler_max_resources, init_ray
init_ray(address="local")

@ray.remote(num_cpus=0)
def seen():
    return {k: os.environ.get(k) for k in LOCAL_RAY_ENV}

node = ray._private.worker._global_node
none_yet = autoscaler_max_resources()
# what an autoscaler keeps in the GCS: 4 GPU nodes of 8 CPUs at most, and 2 CPU-only nodes of 4
from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY as KEY, GCS_AUTOSCALER_STATE_NAMESPACE as NS
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_put
config = autoscaler_pb2.ClusterConfig(node_group_configs=[
    autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, max_count=4),
    autoscaler_pb2.NodeGroupConfig(name="cpu", resources={"CPU": 4}, max_count=2)])
_internal_kv_put(KEY, config.SerializeToString(), namespace=NS)
print(json.dumps({"worker": ray.get(seen.remote()), "webui": node.address_info.get("webui_url"),
                  "max": [none_yet, autoscaler_max_resources()]}))
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
    # no autoscaler, no maximum; then the one an autoscaler's config in the GCS gives
    assert got["max"] == [None, {"CPU": 40.0, "GPU": 4.0}]


def test_a_ray_named_by_ray_address_is_joined_not_started(monkeypatch):
    """RAY_ADDRESS (ray job submit) means join: nothing of LOCAL_RAY_ENV or the dashboard
    choice is applied to someone else's Ray; address="local" always starts one."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not starts_ray()
    assert starts_ray("local")


def test_the_private_ray_functions_behind_cluster_are_as_pinned():
    """starts_ray and autoscaler_max_resources each call one private function of the pinned Ray:
    an upgrade that moves or changes either fails here, not in a run."""
    assert list(inspect.signature(services.canonicalize_bootstrap_address).parameters) == ["addr", "temp_dir"]
    assert isinstance(ray_state.state, ray_state.GlobalState)
    read = ray_state.state.get_max_resources_from_cluster_config
    assert inspect.signature(read).parameters == {}


# (address, RAY_ADDRESS): the cases the public settings decide, without looking for a Ray
CASES = [("local", None), ("local", "10.0.0.2:6379"), (None, "10.0.0.2:6379"), ("auto", "10.0.0.2:6379"),
         ("10.0.0.2:6379", None)]


def test_without_rays_function_starts_ray_keeps_rays_rule_and_says_so_once(monkeypatch, capsys):
    def rule() -> list[bool]:
        out = []
        for address, env in CASES:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
            if env:
                monkeypatch.setenv("RAY_ADDRESS", env)
            out.append(starts_ray(address))
        return out

    rays = rule()
    assert rays == [True, True, False, False, False]
    monkeypatch.setattr(console, "_missing_said", set())
    monkeypatch.delattr(services, "canonicalize_bootstrap_address")
    assert rule() == rays
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert starts_ray() and not starts_ray("auto")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ray._private.services.canonicalize_bootstrap_address" in err


def test_autoscaler_max_resources_is_none_without_an_autoscaler_or_rays_function(monkeypatch, capsys):
    """No ray.init in this process, or the suite's local Ray: either way no maximum; and without
    the private function, None with one line."""
    assert autoscaler_max_resources() is None
    monkeypatch.setattr(console, "_missing_said", set())
    monkeypatch.delattr(ray_state.GlobalState, "get_max_resources_from_cluster_config")
    assert autoscaler_max_resources() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "get_max_resources_from_cluster_config (AttributeError" in err
