"""The cluster in a box (harness.py): one multi-host Ray cluster for the session's cluster
tests, refused with harness.unavailable()'s one line where namespaces are unavailable."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from tests.cluster import harness as hx

HERE = Path(__file__).parent


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


@pytest.fixture(scope="session")
def fault_figures(cluster):
    """What the fault tests measured, {fault: figures}: written to <cluster work>/faults.json
    at the session's end, and to $BRAINMRI_CLUSTER_FIGURES when that names a file."""
    figures: dict = {}
    yield figures
    if figures:
        text = json.dumps(figures, indent=2, sort_keys=True) + "\n"
        (cluster.work / "faults.json").write_text(text)
        if os.environ.get("BRAINMRI_CLUSTER_FIGURES"):
            Path(os.environ["BRAINMRI_CLUSTER_FIGURES"]).write_text(text)


def pytest_itemcollected(item):
    """Under pytest-xdist every cluster test is one group, run by one worker: one cluster.
    Marked as each test is collected, before pytest-xdist reads the groups (tests/conftest.py)."""
    if item.path.parent == HERE:
        item.add_marker(pytest.mark.xdist_group("cluster"))


def pytest_collection_modifyitems(items):
    """The fault tests after the other cluster tests: they kill hosts of the session's
    cluster (test_pipeline's placement and disk checks expect the hosts it started with)."""
    faults = [i for i in items if i.path.name == "test_faults.py" and i.path.parent == HERE]
    if not faults:
        return
    rest = [i for i in items if i not in faults]
    ours = [k for k, i in enumerate(rest) if i.path.parent == HERE]
    at = (max(ours) + 1) if ours else len(rest)
    items[:] = rest[:at] + faults + rest[at:]
