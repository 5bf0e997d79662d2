"""A lease lock object in storage, so two scheduled jobs never work on the same thing at once.

The lock is one small JSON object (holder, acquired/expires times). Taking it is an atomic
create-if-absent; an expired lease (its holder died without releasing it) is taken over by an
atomic compare-and-swap on the exact version that was read, so two jobs that both see it
expired cannot both win. Release and renewal are conditional on still holding that version.

    S3: PutObject with If-None-Match: * (create) / If-Match: <etag> (swap, renew, delete) --
        conditional writes that AWS S3 and S3-compatible servers (MinIO, moto) implement.
    local: link() of a complete temp file (create), and a flock-guarded read-compare-replace
           for the rest.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from contextlib import contextmanager

from .storage import Location, StorageError, s3_endpoint, s3_region


class LockHeld(StorageError):
    """Someone else holds an unexpired lease."""


def _now() -> float:
    return time.time()


class Lease:
    def __init__(self, loc: Location, ttl_s: float, purpose: str = ""):
        self.loc, self.ttl_s, self.purpose = loc, ttl_s, purpose
        self.id = uuid.uuid4().hex
        self._tag: str | None = None  # S3 ETag or local content of our version

    def _body(self) -> bytes:
        t = _now()
        return (json.dumps({"holder": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                            "purpose": self.purpose, "acquired_at": t, "expires_at": t + self.ttl_s},
                           sort_keys=True) + "\n").encode()

    # -- backends: create-if-absent, read (body, tag), swap-if-tag, delete-if-tag -----------
    def _s3(self):
        import boto3

        bucket, _, key = self.loc.path.partition("/")
        return boto3.session.Session().client("s3", endpoint_url=s3_endpoint(),
                                              region_name=s3_region()), bucket, key

    @staticmethod
    def _failed_precondition(e) -> bool:
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")

    def _create(self, body: bytes) -> str | None:
        if self.loc.is_s3:
            import botocore.exceptions as bx

            c, b, k = self._s3()
            try:
                return c.put_object(Bucket=b, Key=k, Body=body, IfNoneMatch="*")["ETag"]
            except bx.ClientError as e:
                if self._failed_precondition(e):
                    return None
                raise
        os.makedirs(os.path.dirname(self.loc.path), exist_ok=True)
        tmp = f"{self.loc.path}.{self.id}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        try:  # link() publishes the complete file or fails if one exists: no torn reads
            os.link(tmp, self.loc.path)
        except FileExistsError:
            return None
        finally:
            os.remove(tmp)
        return body.decode()

    def _read(self) -> tuple[dict | None, str | None]:
        if self.loc.is_s3:
            import botocore.exceptions as bx

            c, b, k = self._s3()
            try:
                r = c.get_object(Bucket=b, Key=k)
            except bx.ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                    return None, None
                raise
            return json.loads(r["Body"].read()), r["ETag"]
        try:
            text = open(self.loc.path, "rb").read().decode()
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(text), text
        except ValueError:  # torn by a crash mid-write of a local file: treat as expired
            return {"expires_at": 0}, text

    @contextmanager
    def _guard(self):
        os.makedirs(os.path.dirname(self.loc.path), exist_ok=True)
        with open(self.loc.path + ".guard", "a") as g:
            fcntl.flock(g, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(g, fcntl.LOCK_UN)

    def _swap(self, tag: str, body: bytes) -> str | None:
        if self.loc.is_s3:
            import botocore.exceptions as bx

            c, b, k = self._s3()
            try:
                return c.put_object(Bucket=b, Key=k, Body=body, IfMatch=tag)["ETag"]
            except bx.ClientError as e:
                if self._failed_precondition(e) or str(e.response.get("Error", {}).get("Code")) == "NoSuchKey":
                    return None
                raise
        with self._guard():
            if self._read()[1] != tag:
                return None
            tmp = f"{self.loc.path}.{self.id}.tmp"
            with open(tmp, "wb") as f:
                f.write(body)
            os.replace(tmp, self.loc.path)
            return body.decode()

    def _delete(self, tag: str) -> bool:
        if self.loc.is_s3:
            import botocore.exceptions as bx

            c, b, k = self._s3()
            try:
                c.delete_object(Bucket=b, Key=k, IfMatch=tag)
                return True
            except bx.ClientError as e:
                if self._failed_precondition(e) or str(e.response.get("Error", {}).get("Code")) == "NoSuchKey":
                    return False
                raise
        with self._guard():
            if self._read()[1] != tag:
                return False
            os.remove(self.loc.path)
            return True

    # -- API ------------------------------------------------------------------------------
    def acquire(self, wait_s: float = 0.0, poll_s: float = 2.0) -> "Lease":
        """Take the lease, waiting up to wait_s for a live holder; raise LockHeld otherwise."""
        deadline = _now() + wait_s
        while True:
            tag = self._create(self._body())
            if tag is None:
                held, old = self._read()
                if held is None:
                    continue  # released between our create and read: try again at once
                if held.get("expires_at", 0) < _now():  # its holder died: take it over
                    tag = self._swap(old, self._body())
            if tag is not None:
                self._tag = tag
                return self
            if _now() >= deadline:
                raise LockHeld(f"{self.loc.uri} is held by {held.get('host')} pid {held.get('pid')} "
                               f"({held.get('purpose', '')}) until "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(held['expires_at']))}")
            time.sleep(min(poll_s, max(0.0, deadline - _now())))

    def renew(self) -> None:
        """Extend the lease; raises if it was lost (expired and taken over)."""
        tag = self._swap(self._tag, self._body()) if self._tag else None
        if tag is None:
            raise LockHeld(f"lost the lease on {self.loc.uri} (expired and taken over)")
        self._tag = tag

    def release(self) -> None:
        if self._tag is not None:
            self._delete(self._tag)
            self._tag = None

    def __enter__(self):
        return self if self._tag else self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
