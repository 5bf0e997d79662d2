"""Joining Ray: the one place a driver starts or joins a cluster, and what it asks of one.

Two questions have no public answer in Ray 2.60, so each is one small function here over the
pinned version's private one, which fails soft with one line (console.private_ray_api_missing)
if an upgrade removes it; tests/core/test_cluster.py pins their signatures:

- `starts_ray`: whether ray.init(address) starts a Ray or joins one (ray._private.services);
- `autoscaler_max_resources`: the most of each resource the autoscaler may bring
  (ray._private.state).
"""

from __future__ import annotations

import os

from . import console
from .storage import worker_env

# A Ray this driver starts for itself (a laptop, CI) leaves out the parts one machine has no use
# for. Each is a process or a timer that wakes every few seconds, and on 2 cores their CPU is
# taken from the training step: during a 1-worker training about fifteen helper processes take
# 13-19 % of a core (/proc over 30 s); these settings cut 2-3 points of it, the rest is each
# Python actor's idle main thread (benchmarks/results/train-cpu-20261129-lean-ray.txt). Set by
# setdefault, so a value the user exported wins; a Ray this driver joins is left as it is.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # drain notices of preemptible nodes: none here
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Train's Prometheus gauges: no dashboard to read them
    "RAY_enable_metrics_collection": "0",  # every process's metrics export, same reason
    # how often Train's controller polls its workers: an epoch's report waits for the poll
    # (its queue holds one), so at Ray's 2 s a short epoch waits up to 2 s and each run ends
    # ~6 s late; on one machine a poll is a few local calls. (Tune trials leave restarts to
    # Tune for this reason: ops/tune.py train_trial.)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


def starts_ray(address: str | None = None) -> bool:
    """Whether ray.init(address) starts a new Ray rather than joining one: RAY_ADDRESS, or a
    Ray that `ray start` left running on this machine, is joined (Ray's own rule, the pinned
    version's function). Without that function, the part of the rule public settings tell:
    "local" starts; an address, "auto" or RAY_ADDRESS joins; no address starts (a Ray left by
    `ray start` is then not seen: ray.init still joins it, only with LOCAL_RAY_ENV set here)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) is None
    except (ImportError, TypeError) as e:
        console.private_ray_api_missing("ray._private.services.canonicalize_bootstrap_address",
                                        "a Ray that `ray start` left on this machine is not seen", e)
    if address in (None, "auto"):
        address = os.environ.get("RAY_ADDRESS") or address
    return address in (None, "local")


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource ({"CPU": 64.0, "GPU": 8.0, ...}) the cluster's autoscaler may
    bring, from the cluster config it keeps in the GCS (what Ray Train's worker group and Ray
    Data read for the same question); None on a cluster without one (a local Ray, a fixed
    cluster), before ray.init, or when it cannot be read."""
    try:
        from ray._private.state import state

        read = state.get_max_resources_from_cluster_config
    except (ImportError, AttributeError) as e:
        console.private_ray_api_missing("ray._private.state.state.get_max_resources_from_cluster_config",
                                        "the autoscaler's maximum is taken as unknown", e)
        return None
    try:
        res = read()
    except Exception:  # not connected, or the GCS did not answer: unknown, never an error
        return None
    return {k: float(v) for k, v in res.items()} if res else None


def local_ray_kwargs() -> dict:
    """ray.init's arguments for a Ray started here, after putting LOCAL_RAY_ENV in place (the
    processes Ray starts inherit this process's environment). No dashboard: for one, start a
    Ray yourself (`ray start --head`); a command joins it as it is."""
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)
    return {"include_dashboard": False}


def init_ray(address: str | None = None) -> None:
    """Start a local Ray, or join a running one (RAY_ADDRESS under `ray job submit`, or one
    `ray start` left on this machine). Actors started from this driver (Tune trials, Train
    controllers, inference actors) get the non-secret S3 settings the driver resolved
    (endpoint, region; never credentials), except under RAY_ADDRESS, where the job's own
    runtime_env applies. Their output reaches the console only with --verbose (`console`).
    `address="local"` (the benchmarks) always starts a new Ray."""
    import ray

    if ray.is_initialized():
        return
    kwargs = local_ray_kwargs() if starts_ray(address) else {}
    env = {} if address is None and os.environ.get("RAY_ADDRESS") else worker_env()
    ray.init(address=address, configure_logging=False, runtime_env={"env_vars": env} if env else None,
             **kwargs, **console.ray_init_kwargs())
