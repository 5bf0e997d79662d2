"""S3 unreachable for a while: requests are retried with backoff across a short outage; a
longer one fails; a write cut half-way never leaves an object a reader would take as complete.
The endpoint really goes away (support.outage: the relay in front of the tests' moto server
closes its connections and refuses new ones), no client is patched."""

import pickle
import time

import pyarrow.fs as pafs
import pytest
from support.outage import OutageRelay

from brainmri.core.storage import S3_MAX_ATTEMPTS, S3Storage, StorageError, open_location, s3_max_attempts


@pytest.fixture
def relay(s3_server, monkeypatch):
    with OutageRelay(s3_server) as r:
        monkeypatch.setenv("BRAINMRI_S3_ENDPOINT", r.endpoint)
        yield r


def test_the_filesystem_keeps_its_retries_when_pickled_and_never_carries_credentials(s3_server, monkeypatch):
    """Ray pickles the filesystem into every worker and read task; pyarrow's own pickling
    dropped the retry strategy there."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret-value")
    fs = open_location("s3://any-bucket/x").fs
    blob = pickle.dumps(fs)
    assert b"AKIAEXAMPLEKEY123" not in blob and b"example-secret-value" not in blob
    back = pickle.loads(blob)
    assert isinstance(back, S3Storage) and isinstance(back, pafs.S3FileSystem)
    assert back.settings == fs.settings and back.settings["max_attempts"] == S3_MAX_ATTEMPTS
    assert back.settings["endpoint_override"] == s3_server.removeprefix("http://")


def test_max_attempts_comes_from_the_environment_and_is_checked(monkeypatch):
    monkeypatch.setenv("BRAINMRI_S3_MAX_ATTEMPTS", "3")
    assert s3_max_attempts() == 3
    monkeypatch.setenv("BRAINMRI_S3_MAX_ATTEMPTS", "0")
    with pytest.raises(StorageError, match="BRAINMRI_S3_MAX_ATTEMPTS='0' must be a whole number >= 1"):
        s3_max_attempts()


@pytest.mark.parametrize("method", ["PUT", "GET"])
def test_a_write_or_a_read_cut_by_a_short_outage_is_retried_to_the_end(relay, s3_bucket, method):
    loc = open_location(f"s3://{s3_bucket}/ckpt/checkpoint_000000/model.pt")
    data = bytes(range(256)) * 4096  # 1 MiB
    if method == "GET":
        loc.write_bytes(data)
    outage = relay.arm(method, r"/checkpoint_000000/model\.pt", seconds=4)
    t0 = time.time()
    got = loc.write_bytes(data) if method == "PUT" else loc.read_bytes()
    took = time.time() - t0
    assert outage.started is not None, "the request never went through the relay"
    assert took >= 3.5, took  # it waited the outage out...
    assert loc.read_bytes() == data and (method == "PUT" or got == data)  # ...and all of it arrived


def test_a_longer_outage_fails_the_write_and_leaves_no_object(relay, s3_bucket, monkeypatch):
    monkeypatch.setenv("BRAINMRI_S3_MAX_ATTEMPTS", "2")  # gives up within seconds, not half a minute
    loc = open_location(f"s3://{s3_bucket}/ckpt/checkpoint_000001/model.pt")
    outage = relay.arm("PUT", r"/checkpoint_000001/", seconds=15)
    with pytest.raises(OSError, match="NETWORK_CONNECTION|Could not connect|connection"):
        loc.write_bytes(b"x" * (1 << 20))
    assert outage.started is not None and time.time() < outage.started + 15  # failed inside it
    assert relay.wait(outage, 30)
    assert not loc.exists()  # the half-sent upload is nowhere a reader would find it
