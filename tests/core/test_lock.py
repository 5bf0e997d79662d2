"""The lease lock in storage: local folder and a real S3-protocol server (conditional writes)."""

from __future__ import annotations

import threading
import time

import pytest

from brainmri.core.lock import Lease, LockHeld
from brainmri.core.storage import open_location


@pytest.fixture(params=["local", "s3"])
def lock_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "state" / "lock.json")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/state/lock.json"


def test_one_holder_at_a_time_and_release(lock_uri):
    loc = open_location(lock_uri)
    a = Lease(loc, ttl_s=60, purpose="a").acquire()
    assert loc.read_json()["holder"] == a.id
    with pytest.raises(LockHeld, match="held by .* until"):
        Lease(loc, ttl_s=60).acquire()
    a.release()
    assert not loc.exists()
    with Lease(loc, ttl_s=60) as b:
        assert loc.read_json()["holder"] == b.id
    assert not loc.exists()


def test_an_expired_lease_is_taken_over_and_its_holder_knows(lock_uri):
    loc = open_location(lock_uri)
    dead = Lease(loc, ttl_s=0.2).acquire()  # a holder that "dies": never renews or releases
    time.sleep(0.4)
    new = Lease(loc, ttl_s=60).acquire()
    assert loc.read_json()["holder"] == new.id
    with pytest.raises(LockHeld, match="lost the lease"):
        dead.renew()
    dead.release()  # must not delete the new holder's lease
    assert loc.read_json()["holder"] == new.id
    new.renew()
    new.release()
    assert not loc.exists()


def test_racing_takeovers_of_an_expired_lease_have_one_winner(lock_uri):
    loc = open_location(lock_uri)
    Lease(loc, ttl_s=0.1).acquire()
    time.sleep(0.3)
    winners, errors = [], []

    def contend():
        try:
            winners.append(Lease(loc, ttl_s=60).acquire())
        except LockHeld as e:
            errors.append(e)

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(errors) == 5
    assert loc.read_json()["holder"] == winners[0].id


def test_waiting_for_a_live_holder(lock_uri):
    loc = open_location(lock_uri)
    a = Lease(loc, ttl_s=60).acquire()
    threading.Timer(0.5, a.release).start()
    t0 = time.time()
    b = Lease(loc, ttl_s=60).acquire(wait_s=10, poll_s=0.1)
    assert 0.4 < time.time() - t0 < 9.5 and loc.read_json()["holder"] == b.id
    b.release()
