"""The lease lock in storage: local folder and a real S3-protocol server (conditional writes)."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from brainmri.core import lock
from brainmri.core.lock import Lease, LockHeld
from brainmri.core.storage import open_location


@pytest.fixture(params=["local", "s3"])
def lock_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "state" / "lock.json")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/state/lock.json"


def expiry_wait(loc) -> float:
    """Long enough for a 0.2 s lease to expire on the store's clock (S3 dates have 1 s steps)."""
    return 2.2 if loc.is_s3 else 0.4


def test_one_holder_at_a_time_and_release(lock_uri):
    loc = open_location(lock_uri)
    a = Lease(loc, ttl_s=60, purpose="a").acquire()
    assert loc.read_json()["holder"] == a.id
    with pytest.raises(LockHeld, match="held by .* loses it 60 s after"):
        Lease(loc, ttl_s=60).acquire()
    a.release()
    assert loc.read_json()["released"] and loc.read_json()["holder"] is None
    with Lease(loc, ttl_s=60) as b:
        assert loc.read_json()["holder"] == b.id
        assert b.generation == a.generation + 1 == 2  # the fencing token only grows
    assert loc.read_json()["released"]


def test_an_expired_lease_is_taken_over_and_its_holder_knows(lock_uri):
    loc = open_location(lock_uri)
    dead = Lease(loc, ttl_s=0.2).acquire()  # a holder that "dies": never renews or releases
    time.sleep(expiry_wait(loc))
    new = Lease(loc, ttl_s=60).acquire()
    assert loc.read_json()["holder"] == new.id
    with pytest.raises(LockHeld, match="lost the lease"):
        dead.renew()
    dead.release()  # must not delete the new holder's lease
    assert loc.read_json()["holder"] == new.id
    new.renew()
    new.release()
    assert loc.read_json()["released"]


def test_racing_takeovers_of_an_expired_lease_have_one_winner(lock_uri):
    loc = open_location(lock_uri)
    Lease(loc, ttl_s=0.1).acquire()
    time.sleep(expiry_wait(loc))
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


def test_the_heartbeat_and_the_holders_own_writes_never_lose_the_lease(lock_uri):
    """The heartbeat renews while the holder writes its state (each write renews first): the
    two renewals must not swap against each other's versions and call a held lease lost."""
    loc = open_location(lock_uri)
    lease = Lease(loc, ttl_s=60).acquire()
    state = open_location(lock_uri.rsplit("/", 1)[0] + "/seen.json")
    lease.claim(state)
    errors: list[BaseException] = []

    def renew_often():
        try:
            for _ in range(15):
                lease.renew()
        except BaseException as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)

    beats = [threading.Thread(target=renew_often) for _ in range(2)]
    for t in beats:
        t.start()
    for k in range(15):
        lease.write(state, {"k": k})
    for t in beats:
        t.join()
    assert not errors and not lease.lost.is_set()
    assert state.read_json()["k"] == 14 and loc.read_json()["holder"] == lease.id
    lease.release()


def test_waiting_for_a_live_holder(lock_uri):
    loc = open_location(lock_uri)
    a = Lease(loc, ttl_s=60).acquire()
    threading.Timer(0.5, a.release).start()
    t0 = time.time()
    b = Lease(loc, ttl_s=60).acquire(wait_s=10, poll_s=0.1)
    assert 0.4 < time.time() - t0 < 9.5 and loc.read_json()["holder"] == b.id
    b.release()


def test_expiry_uses_the_stores_clock_not_the_holders(lock_uri, monkeypatch):
    """A holder whose clock is an hour behind (or ahead) does not lose or keep its lease
    for it: only the storage's clock decides."""
    import brainmri.core.lock as lock

    loc = open_location(lock_uri)
    real = time.time
    monkeypatch.setattr(lock.time, "time", lambda: real() - 3600)
    a = Lease(loc, ttl_s=60).acquire()
    monkeypatch.setattr(lock.time, "time", lambda: real() + 3600)
    a.renew()
    monkeypatch.setattr(lock.time, "time", real)
    with pytest.raises(LockHeld):
        Lease(loc, ttl_s=60).acquire()
    a.release()


def test_heartbeat_keeps_a_lease_and_interrupts_work_when_it_is_lost(lock_uri):
    # Python's own SIGINT handler (a Ray Train fit earlier in the process may have left its own)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _heartbeat(lock_uri)
    finally:
        signal.signal(signal.SIGINT, old)


def _heartbeat(lock_uri):
    loc = open_location(lock_uri)
    ttl = 2.4 if loc.is_s3 else 0.6
    a = Lease(loc, ttl_s=ttl).acquire()
    a.start_heartbeat()
    try:
        time.sleep(2.5 * ttl)  # would have expired twice over without the heartbeat
        with pytest.raises(LockHeld):
            Lease(loc, ttl_s=ttl).acquire()
        # someone takes the lease from under it (as a takeover after a long pause would);
        # the heartbeat may renew between the thief's read and write: the thief retries
        while True:
            _, tag = lock.read_tagged(loc)
            if lock.write_if(loc, b'{"holder": "thief", "generation": 99, "ttl_s": 600}', tag):
                break
        with pytest.raises(KeyboardInterrupt):  # the main thread's work is stopped...
            for _ in range(int(5 * ttl / 0.05)):  # in short steps: interrupt_main lands between
                time.sleep(0.05)  # Python steps, never inside one blocking call
        assert a.lost.is_set()
        with pytest.raises(LockHeld, match="lost the lease"):  # ...and it knows why
            a.check()
    finally:
        a.stop_heartbeat()  # never leave a heartbeat that could interrupt a later test
    a.release()  # writes nothing over the new holder
    assert loc.read_json()["holder"] == "thief"


def test_fencing_no_write_of_an_old_holder_completes_after_a_takeover(lock_uri):
    loc = open_location(lock_uri)
    state = loc.__class__(loc.uri.rsplit("/", 1)[0] + "/champion.json", loc.fs,
                          loc.path.rsplit("/", 1)[0] + "/champion.json")
    old = Lease(loc, ttl_s=0.2).acquire()
    old.claim(state)
    old.write(state, {"model": "m1"})
    assert state.read_json() == {"model": "m1", "fence": 1}
    old.renew()  # it renews, then stalls (GC, a frozen VM) past its ttl...
    time.sleep(expiry_wait(loc))
    new = Lease(loc, ttl_s=60).acquire()  # ...and a new holder takes over and claims
    new.claim(state)
    with pytest.raises(LockHeld, match="newer lease holder"):  # the write after its renewal
        old._fenced_write(state, lambda _: {"model": "stale", "fence": old.generation})
    with pytest.raises(LockHeld):  # and the whole guarded write
        old.write(state, {"model": "stale"})
    assert state.read_json() == {"model": "m1", "fence": 2}
    new.write(state, {"model": "m2"})
    assert state.read_json() == {"model": "m2", "fence": 2}
    new.release()
