"""Joining Ray: the one place a driver starts or joins a cluster."""

from __future__ import annotations

import os

from . import console
from .storage import worker_env

# A Ray this driver starts for itself (a laptop, CI) leaves out the parts one machine has no use
# for. Each is a process or a timer that wakes every few seconds; on 2 cores those wakeups are
# taken from the training step (about 10 % of a core beside a 1-worker training, measured with
# /proc while it ran; benchmarks/train.py --only trainer gives the overhead they add). Set by
# setdefault: a value the user exported wins. On a cluster (RAY_ADDRESS) nothing changes.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # drain notices of preemptible nodes: none here
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Train's Prometheus gauges: no dashboard to read them
    "RAY_enable_metrics_collection": "0",  # every process's metrics export, same reason
}


def local_ray_kwargs() -> dict:
    """ray.init's arguments for a Ray started here, after putting LOCAL_RAY_ENV in place (the
    processes Ray starts inherit this process's environment). No dashboard: for one, start a
    Ray yourself (`ray start --head`); ray.init joins a Ray running on this machine as it is."""
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)
    env = worker_env()
    return dict(include_dashboard=False, runtime_env={"env_vars": env} if env else None)


def init_ray(address: str | None = None) -> None:
    """Start a local Ray, or join the cluster under `ray job submit` (RAY_ADDRESS set).
    Actors started from this driver (Tune trials, Train controllers, inference actors) get
    the non-secret S3 settings the driver resolved (endpoint, region; never credentials).
    Their output reaches the console only with --verbose (`console`). `address="local"` (the
    benchmarks) always starts a new Ray, never one already running on the machine."""
    import ray

    if ray.is_initialized():
        return
    joined = address is None and os.environ.get("RAY_ADDRESS")
    # under `ray job submit` the job's own runtime_env already applies
    kwargs = {} if joined else local_ray_kwargs()
    ray.init(address=address, configure_logging=False, **kwargs, **console.ray_init_kwargs())
