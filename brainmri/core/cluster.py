"""Joining Ray: the one place a driver starts or joins a cluster."""

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
}


def starts_ray(address: str | None = None) -> bool:
    """Whether ray.init(address) starts a new Ray rather than joining one: RAY_ADDRESS, or a
    Ray that `ray start` left running on this machine, is joined (Ray's own rule, the pinned
    version's function)."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address) is None


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
