"""The cluster harness itself: where it cannot build hosts it says why in one line (what the
cluster tests skip with), and a cluster whose owner is killed leaves nothing behind."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from tests.cluster import harness as hx


def test_no_root_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert hx.unavailable() == "the cluster needs root (network and mount namespaces, a bridge)"


def test_a_missing_tool_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(hx.shutil, "which", lambda tool: None if tool == "ip" else f"/usr/bin/{tool}")
    assert hx.unavailable() == "the cluster needs `ip` (iproute2/util-linux), not found on PATH"
    monkeypatch.setattr(hx.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(hx, "VENV_BIN", hx.REPO / "no-venv" / "bin")
    assert hx.unavailable() == f"the cluster needs {hx.REPO}/no-venv/bin/ray (the project's venv)"


def test_a_checkout_under_tmp_is_refused_in_one_line(monkeypatch):
    """Every host mounts its own disk over /tmp, which would hide a checkout living there."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(hx.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(hx, "REPO", hx.Path("/tmp/checkout"))
    why = hx.unavailable()
    assert why and why.startswith("the cluster's hosts each mount a private /tmp, which hides this checkout")


def test_namespaces_refused_by_the_kernel_are_refused_in_one_line(monkeypatch, tmp_path):
    """As in a container without CAP_SYS_ADMIN: unshare itself fails."""
    if sys.platform != "linux":
        pytest.skip("Linux only")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(hx.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    assert hx.unavailable() == ("namespaces are unavailable here (unshare --net --mount --uts: "
                                "unshare: unshare failed: Operation not permitted)")


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_owner_leaves_no_process_namespace_interface_or_mount(tmp_path):
    """The process that built a cluster is SIGKILLed (a cancelled CI job): no finalizer runs,
    and its watchdog removes every host process, namespace, veth and the bridge. The hosts'
    mounts never showed on this machine at all (private propagation)."""
    why = hx.unavailable()
    if why:
        pytest.skip(why)
    name = "k" + secrets.token_hex(2)
    code = ("import os, sys, time\n"
            "from tests.cluster import harness as hx\n"
            "c = hx.Cluster(sys.argv[1], sys.argv[2], workers=1)\n"
            "hx.watch(os.getpid(), c.name)\n"
            "c.up()\n"
            "print('up', flush=True)\n"
            "time.sleep(600)\n")
    work = tmp_path / "work"
    with open(tmp_path / "owner.log", "wb") as log:
        owner = subprocess.Popen([sys.executable, "-c", code, name, str(work)], cwd=hx.REPO,
                                 stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    try:
        assert owner.stdout.readline() == b"up\n", hx.tail(tmp_path / "owner.log")
        pids = hx.processes(name)
        assert len(hx.namespaces(name)) == 3 and len(pids) > 3  # s3, head, w1: Ray's processes
        with open("/proc/self/mountinfo") as f:
            assert str(work) not in f.read()
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 120
        while hx.leftovers(name) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not hx.leftovers(name)
        assert not [p for p in pids if hx.alive(p)]
    finally:
        owner.kill()
        owner.wait()
        hx.down(name)
