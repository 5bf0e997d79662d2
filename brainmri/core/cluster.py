"""Joining Ray: the one place a driver starts or joins a cluster."""

from __future__ import annotations

import os

from . import console
from .storage import worker_env


def init_ray() -> None:
    """Start a local Ray, or join the cluster under `ray job submit` (RAY_ADDRESS set).
    Actors started from this driver (Tune trials, Train controllers, inference actors) get
    the non-secret S3 settings the driver resolved (endpoint, region; never credentials).
    Their output reaches the console only with --verbose (`console`)."""
    import ray

    if not ray.is_initialized():
        # under `ray job submit` the job's own runtime_env already applies
        env = {} if os.environ.get("RAY_ADDRESS") else worker_env()
        ray.init(configure_logging=False, runtime_env={"env_vars": env} if env else None,
                 **console.ray_init_kwargs())
