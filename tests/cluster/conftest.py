"""The cluster in a box (harness.py): one multi-host Ray cluster for the session's cluster
tests, refused with harness.unavailable()'s one line where namespaces are unavailable."""

from __future__ import annotations

import os
import secrets

import pytest

from tests.cluster import harness as hx


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A head, 3 one-CPU worker hosts and the S3 host, up; torn down after the session's last
    cluster test, on failure and Ctrl-C too, and by a watchdog if pytest itself is killed.
    Three workers: two for a spread train run, one left for Ray Data (the head has no CPUs)."""
    why = hx.unavailable()
    if why:
        pytest.skip(why)
    name = "t" + secrets.token_hex(2)  # several sessions may run clusters at once
    c = hx.Cluster(name, tmp_path_factory.mktemp(f"cluster-{name}"), workers=3)
    guard = hx.watch(os.getpid(), name)
    try:
        yield c.up()
    finally:
        c.down()
        guard.kill()
        guard.wait()
    assert not hx.leftovers(name)
