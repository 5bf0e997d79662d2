"""A lease in storage, so two scheduled jobs never work on the same thing at once, and fenced
writes, so a job that lost its lease cannot change what the new holder owns.

The lease is one small JSON object (holder, generation, ttl). The rules:

    take       create-if-absent, or compare-and-swap on the exact version read when that
               version is released or expired; two takers that race cannot both win
    expired    judged on the storage's own clock (the object's last-modified time against the
               time the storage reports now), never on two machines' clocks agreeing
    heartbeat  a thread renews the lease every ttl/4 while work runs; if a renewal fails (taken
               over) or none succeeded for 3/4 of a ttl, the lease counts as lost and the main
               thread is interrupted as by a SIGINT, so training or evaluation stops (during a
               Ray Train fit, Ray's own SIGINT handler aborts the run; the next stage
               boundary then raises LockHeld)
    generation +1 on every take: the fencing token. `claim` stamps it into the state objects
               the holder will write, and `write` changes one only by compare-and-swap, after a
               renewal, and never over a higher generation. So once a new holder has claimed
               them, no write of the old holder can complete, even one that was paused between
               its renewal and its write.
    release    a compare-and-swap to a "released" body (the generation keeps counting)

Conditional writes:
    S3: PutObject with If-None-Match: * (create) / If-Match: <etag> (swap) -- what AWS S3 and
        S3-compatible servers (MinIO, moto) implement.
    local: link() of a complete temp file (create), and a flock-guarded read-compare-replace.
"""

from __future__ import annotations

import _thread
import email.utils
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from .storage import Location, StorageError, s3_endpoint, s3_region


class LockHeld(StorageError):
    """Someone else holds the lease (or took it over from us)."""


# -- conditional reads and writes of one object -------------------------------------------------
def _s3(loc: Location):
    import boto3

    bucket, _, key = loc.path.partition("/")
    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint(),
                                          region_name=s3_region()), bucket, key


def _s3_code(e) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _failed_precondition(e) -> bool:
    return _s3_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409",
                           "NoSuchKey", "404")


@contextmanager
def _guard(loc: Location):
    """Local compare-and-swap: one flock per object, held for read-compare-replace."""
    os.makedirs(os.path.dirname(loc.path), exist_ok=True)
    with open(loc.path + ".guard", "a") as g:
        fcntl.flock(g, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(g, fcntl.LOCK_UN)


def read_tagged(loc: Location) -> tuple[bytes | None, str | None]:
    """(body, version tag), or (None, None) when the object does not exist."""
    if loc.is_s3:
        import botocore.exceptions as bx

        c, b, k = _s3(loc)
        try:
            r = c.get_object(Bucket=b, Key=k)
        except bx.ClientError as e:
            if _s3_code(e) in ("NoSuchKey", "404"):
                return None, None
            raise
        return r["Body"].read(), r["ETag"]
    try:
        with open(loc.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None
    return data, hashlib.sha256(data).hexdigest()


def write_if(loc: Location, data: bytes, tag: str | None) -> str | None:
    """Write `data` only if the object is still at version `tag` (None: only if it does not
    exist). Returns the new tag, or None when the precondition failed (nothing written)."""
    if loc.is_s3:
        import botocore.exceptions as bx

        c, b, k = _s3(loc)
        cond = {"IfMatch": tag} if tag else {"IfNoneMatch": "*"}
        try:
            return c.put_object(Bucket=b, Key=k, Body=data, **cond)["ETag"]
        except bx.ClientError as e:
            if _failed_precondition(e):
                return None
            raise
    os.makedirs(os.path.dirname(loc.path), exist_ok=True)
    tmp = f"{loc.path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if tag is None:  # link() publishes the complete file or fails if one exists
            try:
                os.link(tmp, loc.path)
            except FileExistsError:
                return None
        else:
            with _guard(loc):
                if read_tagged(loc)[1] != tag:
                    return None
                os.replace(tmp, loc.path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return hashlib.sha256(data).hexdigest()


def age_on_store(loc: Location) -> float | None:
    """Seconds since the object was last written, by the storage's clock (None: absent).
    S3: the reply's Date minus the object's LastModified, both set by the server."""
    if loc.is_s3:
        import botocore.exceptions as bx

        c, b, k = _s3(loc)
        try:
            r = c.head_object(Bucket=b, Key=k)
        except bx.ClientError as e:
            if _s3_code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        now = email.utils.parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
        return (now - r["LastModified"]).total_seconds()
    try:  # one machine's filesystem: its mtime and its clock
        return time.time() - os.stat(loc.path).st_mtime
    except FileNotFoundError:
        return None


# -- the lease -----------------------------------------------------------------------------------
class Lease:
    def __init__(self, loc: Location, ttl_s: float, purpose: str = ""):
        self.loc, self.ttl_s, self.purpose = loc, ttl_s, purpose
        self.id = uuid.uuid4().hex
        self.generation = 0
        self._tag: str | None = None  # the version of the lease object we wrote last
        self.lost = threading.Event()
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()
        # The heartbeat and the main thread's fenced writes both renew: unserialised, one of
        # them would swap against the version the other just replaced and call the lease lost.
        self._renewing = threading.Lock()

    def _body(self, released: bool = False) -> bytes:
        return (json.dumps({"holder": None if released else self.id, "host": socket.gethostname(),
                            "pid": os.getpid(), "purpose": self.purpose, "ttl_s": self.ttl_s,
                            "generation": self.generation, "released": released,
                            "written_at": time.time()},  # informational: expiry uses the store's clock
                           sort_keys=True) + "\n").encode()

    def _read(self) -> tuple[dict | None, str | None]:
        data, tag = read_tagged(self.loc)
        if data is None:
            return None, None
        try:
            return json.loads(data), tag
        except ValueError:  # torn by a crash mid-write (not possible with our writes): free
            return {"released": True}, tag

    def _free(self, held: dict) -> bool:
        if held.get("released"):
            return True
        age = age_on_store(self.loc)
        return age is None or age > float(held.get("ttl_s", self.ttl_s))

    # -- API ------------------------------------------------------------------------------
    def acquire(self, wait_s: float = 0.0, poll_s: float = 2.0) -> "Lease":
        """Take the lease, waiting up to wait_s for a live holder; raise LockHeld otherwise."""
        deadline = time.monotonic() + wait_s
        while True:
            held, old = self._read()
            self.generation = int((held or {}).get("generation", 0)) + 1
            free = held is None or self._free(held)
            if free:  # absent, released, or its holder stopped renewing: take it (one winner)
                tag = write_if(self.loc, self._body(), old)
                if tag is not None:
                    self._tag = tag
                    self.lost.clear()
                    return self
                continue  # another taker won between our read and write: look again
            if time.monotonic() >= deadline:
                raise LockHeld(f"{self.loc.uri} is held by {held.get('host')} pid {held.get('pid')} "
                               f"({held.get('purpose', '')}); a holder that stops renewing "
                               f"loses it {float(held.get('ttl_s', self.ttl_s)):.0f} s after its "
                               "last renewal")
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))

    def renew(self) -> None:
        """Extend the lease; raises LockHeld if it was lost (taken over)."""
        with self._renewing:
            tag = (write_if(self.loc, self._body(), self._tag)
                   if self._tag and not self.lost.is_set() else None)
            if tag is None:
                self.lost.set()
                raise LockHeld(f"lost the lease on {self.loc.uri} (expired and taken over)")
            self._tag = tag

    def release(self) -> None:
        self.stop_heartbeat()
        with self._renewing:
            if self._tag is not None and not self.lost.is_set():
                write_if(self.loc, self._body(released=True), self._tag)
            self._tag = None

    def __enter__(self):
        return self if self._tag else self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    # -- heartbeat ------------------------------------------------------------------------
    def start_heartbeat(self, interrupt_main: bool = True) -> None:
        """Renew every ttl/4 in a thread. On loss: `lost` is set and (by default) the main
        thread gets a KeyboardInterrupt, which stops whatever it runs (a Ray Train fit, an
        evaluation); the caller turns it into LockHeld by checking `lost`."""
        self._stop.clear()

        def beat():
            last_ok = time.monotonic()
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.renew()
                    last_ok = time.monotonic()
                    continue
                except LockHeld:
                    pass
                except Exception:  # a flaky store: keep trying while the lease may still be ours
                    if time.monotonic() - last_ok < 0.75 * self.ttl_s:
                        continue
                    self.lost.set()
                if interrupt_main and not self._stop.is_set():
                    _thread.interrupt_main()
                return

        self._beat = threading.Thread(target=beat, name="brainmri-lease-heartbeat", daemon=True)
        self._beat.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join()
        self._beat = None

    def check(self) -> None:
        if self.lost.is_set():
            raise LockHeld(f"lost the lease on {self.loc.uri} (expired and taken over)")

    # -- fenced state objects -------------------------------------------------------------
    def claim(self, *locs: Location) -> None:
        """Stamp our generation into each state object (created as {"fence": n} if absent):
        from now on a writer with an older generation cannot change any of them."""
        for loc in locs:
            self._fenced_write(loc, lambda old: {**(old or {}), "fence": self.generation})

    def write(self, loc: Location, obj: dict) -> None:
        """Write a state object under the lease: renewed first, then a compare-and-swap that
        fails if the object moved or carries a newer generation. Raises LockHeld if fenced out."""
        self.check()
        self.renew()
        self._fenced_write(loc, lambda old: {**obj, "fence": self.generation})

    def _fenced_write(self, loc: Location, make) -> None:
        data, tag = read_tagged(loc)
        old = json.loads(data) if data is not None else None
        if old is not None and int(old.get("fence", 0)) > self.generation:
            self.lost.set()
            raise LockHeld(f"{loc.uri} belongs to a newer lease holder (generation "
                           f"{old['fence']} > ours, {self.generation}); nothing written")
        body = json.dumps(make(old), indent=2, sort_keys=True, default=str).encode() + b"\n"
        if write_if(loc, body, tag) is None:
            self.lost.set()
            raise LockHeld(f"{loc.uri} changed while we held the lease; nothing written")
