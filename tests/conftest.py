"""Shared fixtures: a loopback S3 server (moto server mode), a local Ray cluster, one torch
thread. Helpers the tests import live in `support/`."""

from __future__ import annotations

import os

import pytest


def pytest_itemcollected(item):
    """A test on the shared Ray cluster is marked `ray`, and `slow` unless it is marked
    `quick` (most of them train or run pipelines), so a new Ray test lands in the fast loop
    only when someone has said it is quick. Under pytest-xdist (`-n 2 --dist loadgroup`) the
    Ray tests are one group, run by one worker: one shared Ray cluster, as without xdist.
    Marked as each test is collected: pytest-xdist reads the groups into the test ids in its
    pytest_collection_modifyitems, which runs before a conftest's (groups added there were
    silently ignored, and each worker started a Ray cluster of its own)."""
    if "ray_local" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.ray)
        item.add_marker(pytest.mark.xdist_group("ray"))
        if item.get_closest_marker("quick") is None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server on 127.0.0.1 (moto's server mode); yields its endpoint URL.

    The standard AWS variables point every client (boto3, pyarrow via brainmri.core.storage,
    Ray workers, which inherit the environment) at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "BRAINMRI_S3_ENDPOINT",
        "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_REGION="us-east-1", BRAINMRI_S3_ENDPOINT=endpoint)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the loopback server; yields its name."""
    import uuid

    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray cluster shared by the tests that need one.

    4 logical CPUs on a 2-core machine: two 1-CPU train workers plus room for Ray Data,
    which otherwise starves (deadlock) behind the workers. Started after the S3 server so the
    cluster's processes inherit its credentials, as a real cluster's nodes have theirs."""
    import ray

    from brainmri.core.cluster import local_ray_kwargs

    # address="local": always a new cluster, never one a `ray start` left on this machine; lean
    # as the Ray a command starts for itself (core.cluster)
    ray.init(address="local", num_cpus=4, log_to_driver=False, configure_logging=False,
             ignore_reinit_error=True, **local_ray_kwargs())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts in a tmp folder served
    over HTTP), started once for the tests that track; yields its URL."""
    from support import mlflow_server as srv

    proc, url = srv.start(tmp_path_factory.mktemp("mlflow"))
    yield url
    srv.stop(proc)


@pytest.fixture(scope="module")
def one_thread():
    """Two torch threads on a shared 2-core machine spin against each other (10x slower):
    modules that run many small in-process forwards use it (`pytest.mark.usefixtures`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
