"""Shared fixtures: the real shared data, a loopback S3 server (moto server mode), local Ray."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "brain-tumor-mri"
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def real_subset(dest: Path, per_class: int, offset: int = 0) -> Path:
    """Copy `per_class` real scans of each class into dest/Training/<class>/ (Kaggle layout)."""
    src = SHARED_DATA / "Training"
    if not src.is_dir():
        pytest.skip(f"shared data not found at {src}")
    for c in CLASSES:
        files = sorted((src / c).iterdir())[offset:offset + per_class]
        (dest / "Training" / c).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / "Training" / c / f.name)
    return dest


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

    # address="local": always a new cluster, never one a `ray start` left on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
