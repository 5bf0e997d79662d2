"""Storage URIs -> a pyarrow FileSystem plus a path, the one thing every stage needs.

Ray Data (`read_parquet(filesystem=...)`) and Ray Train (`RunConfig(storage_path,
storage_filesystem)`) both accept exactly this pair, so the whole system speaks it.

- a plain path or `file://...`: the local disk (laptop, tests; the embedded default)
- `s3://bucket/prefix`: AWS or any S3-compatible server. Region and credentials come from
  the standard AWS variables / profile / instance role (never passed around by us, never
  printed). The endpoint comes from `BRAINMRI_S3_ENDPOINT`, else `AWS_ENDPOINT_URL_S3`, else
  `AWS_ENDPOINT_URL`: pyarrow ignores the last two, so we honour them ourselves.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ..config import name_problem


class StorageError(RuntimeError):
    """A storage URI that cannot be used; the message is one sentence for the user."""


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def check_name(name: str, what: str = "name") -> str:
    """Names that become path segments (dataset, model, run): no slashes, no '..'."""
    problem = name_problem(name, what)  # the rule lives in config (RetrainConfig checks it too)
    if problem:
        raise StorageError(problem)
    return name


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment (None: AWS), checked: the one reader of these
    variables for pyarrow (storage) and boto3 (storage checks, lock)."""
    for var in ("BRAINMRI_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        ep = os.environ.get(var)
        if ep:
            u = urlparse(ep)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise StorageError(f"{var}={ep!r} must start with http:// or https:// "
                                   "(e.g. http://localhost:9000)")
            return ep
    return None


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


# Settings (never secrets) that Ray workers need to reach the same S3 endpoint as the driver.
_WORKER_VARS = ("BRAINMRI_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION",
                "AWS_DEFAULT_REGION", "BRAINMRI_S3_MAX_ATTEMPTS")


def worker_env() -> dict:
    """Non-secret storage settings to hand to Ray workers (runtime_env env_vars).
    Credentials are not copied: workers resolve them from their own environment, profile
    or instance role, as the driver does."""
    return {k: os.environ[k] for k in _WORKER_VARS if os.environ.get(k)}


# Attempts per S3 request (AWS's standard retry: jittered exponential backoff, 20 s at most
# between tries). 8 rides out an endpoint gone for a few seconds (tests/core/
# test_storage_outage.py) and gives up on a longer outage after roughly 25-55 s; pyarrow's
# default, 3, gives up within a second or three (docs/results.md, "S3 unreachable").
S3_MAX_ATTEMPTS = 8


def s3_max_attempts() -> int:
    raw = os.environ.get("BRAINMRI_S3_MAX_ATTEMPTS", "")
    if not raw:
        return S3_MAX_ATTEMPTS
    if not raw.isdigit() or int(raw) < 1:
        raise StorageError(f"BRAINMRI_S3_MAX_ATTEMPTS={raw!r} must be a whole number >= 1")
    return int(raw)


class S3Storage(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps its settings when pickled. Ray pickles the filesystem
    into every worker and read task (RunConfig.storage_filesystem, read_parquet(filesystem=));
    pyarrow's own pickling keeps the endpoint and timeouts but drops the retry strategy, so a
    worker's checkpoint upload gave up on the first blip. Only settings travel, never
    credentials: each process resolves those itself."""

    def __init__(self, settings: dict):
        settings = dict(settings)
        attempts = settings.pop("max_attempts")
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **settings)
        self.settings = {**settings, "max_attempts": attempts}

    def __reduce__(self):
        return S3Storage, (self.settings,)


def _s3_filesystem() -> S3Storage:
    settings: dict = dict(region=s3_region(), connect_timeout=5, request_timeout=60,
                          max_attempts=s3_max_attempts())
    ep = s3_endpoint()
    if ep:
        u = urlparse(ep)
        settings.update(endpoint_override=u.netloc, scheme=u.scheme)
    return S3Storage(settings)


@dataclass(frozen=True)
class Location:
    """A folder or file in storage: `fs` + `path` (what pyarrow/Ray want) and the `uri`."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def __truediv__(self, part: str) -> "Location":
        part = str(part).strip("/")
        if not part or any(p in ("..", ".") for p in part.split("/")):
            raise StorageError(f"invalid path segment {part!r}")
        return Location(f"{self.uri.rstrip('/')}/{part}", self.fs, posixpath.join(self.path, part))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def relative(self, path: str) -> str:
        """`path` (a FileInfo.path listed below this location) relative to it, by the string
        alone. posixpath.relpath would make an S3 path ('bucket/key', never absolute)
        absolute against the process's working directory first, which fails where that
        folder is gone (a Ray job's working-dir copy on a node) and is never what a key means."""
        root = self.path.rstrip("/") + "/"
        if not path.startswith(root):
            raise StorageError(f"{path!r} is not below {self.uri!r}")
        return path[len(root):]

    # -- queries ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def listdir(self) -> list[str]:
        """Names directly under this folder (empty if it does not exist)."""
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

    def files(self, suffix: str = "") -> list["Location"]:
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=True)
        out = []
        for i in self.fs.get_file_info(sel):
            if i.type == pafs.FileType.File and i.path.endswith(suffix):
                out.append(self / self.relative(i.path))
        return sorted(out, key=lambda loc: loc.path)

    # -- reads -----------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_json(self):
        return json.loads(self.read_bytes())

    # -- writes (atomic: a reader sees the old object or the whole new one) ---------------
    def write_bytes(self, data: bytes) -> None:
        parent = posixpath.dirname(self.path)
        if not self.is_s3:
            # Local: write beside, then rename (atomic on POSIX within one folder).
            self.fs.create_dir(parent, recursive=True)
            # fsync before the rename: after a crash the name never points at lost data.
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{self.name}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        else:
            # S3: an object (multipart or not) only becomes visible once complete.
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def write_json(self, obj) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode() + b"\n")

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)


def open_location(uri: str | os.PathLike, check: bool = False) -> Location:
    """Parse a storage URI. With check=True, prove it is usable now (bucket exists,
    credentials work, endpoint answers) and fail with one clear sentence otherwise."""
    uri = os.fspath(uri)
    if not uri:
        raise StorageError("empty storage URI")
    if "://" in uri and not uri.startswith(("s3://", "file://")):
        raise StorageError(
            f"unsupported storage URI {uri!r}: use a local path, file://... or s3://bucket/prefix")
    if uri.startswith("s3://"):
        u = urlparse(uri)
        bucket, key = u.netloc, u.path.strip("/")
        if not _BUCKET_RE.match(bucket):
            raise StorageError(f"invalid S3 bucket name {bucket!r} in {uri!r}")
        if any(p in ("..", ".") for p in key.split("/") if p):
            raise StorageError(f"S3 key may not contain '.' or '..' segments: {uri!r}")
        loc = Location(f"s3://{bucket}/{key}".rstrip("/"), _s3_filesystem(),
                       f"{bucket}/{key}".rstrip("/"))
        if check:
            _check_s3(bucket)
        return loc
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if check:
        check_lasting(uri)
    path = os.path.abspath(os.path.expanduser(path))
    loc = Location(path, pafs.LocalFileSystem(), path)
    if check:
        _check_local(path)
    return loc


def check_lasting(uri: str) -> None:
    """Refuse a relative local path inside a Ray job: it would name something in the job's
    temporary copy of --working-dir (deleted with it), not the user's folder. Reads nothing
    (for inputs, which open_location(check=True) would also require to be writable folders)."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" not in path and not os.path.isabs(os.path.expanduser(path)) and _in_job_copy():
        raise StorageError(f"{uri!r} is relative: in a Ray job it would name a folder in the job's "
                           "temporary copy of --working-dir (deleted with it); give an absolute "
                           "path (\"$PWD/lake\") or s3://")


def _in_job_copy() -> bool:
    """Whether this is the driver of a `ray job submit --working-dir`: Ray's job supervisor
    passes the job's runtime_env in this variable, and runs the driver in a temporary copy of
    the working dir (without what runtime_env.yaml excludes, e.g. lake/)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return bool(raw) and bool((json.loads(raw).get("runtime_env") or {}).get("working_dir"))


def _check_local(path: str) -> None:
    p = path
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise StorageError(f"storage path {path!r} is inside a file ({p!r}), not a folder")
    if not os.access(p, os.W_OK):
        raise StorageError(f"storage path {path!r} is not writable (no write access to {p!r})")


def _check_s3(bucket: str) -> None:
    # boto3 gives precise, fast errors (pyarrow retries for minutes on a dead endpoint).
    import boto3
    import botocore.config
    import botocore.exceptions as bx

    # A fresh session, not boto3's module-wide default one: that caches the credentials it
    # first found, so a check would not see the credentials the environment holds now.
    client = boto3.session.Session().client(
        "s3", endpoint_url=s3_endpoint(), region_name=s3_region(),
        config=botocore.config.Config(connect_timeout=3, read_timeout=10,
                                      retries={"max_attempts": 1, "mode": "standard"}))
    where = f"endpoint {s3_endpoint()}" if s3_endpoint() else "AWS S3"
    try:
        client.head_bucket(Bucket=bucket)
    except bx.NoCredentialsError:
        raise StorageError(f"no S3 credentials found for bucket {bucket!r} "
                           "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role)") from None
    except bx.EndpointConnectionError:
        raise StorageError(f"cannot reach the S3 {where} for bucket {bucket!r}") from None
    except bx.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"S3 bucket {bucket!r} does not exist at {where}") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"access to S3 bucket {bucket!r} at {where} was denied "
                               "(check the credentials and their permissions)") from None
        raise StorageError(f"S3 bucket {bucket!r} at {where} answered {code}") from None
    except bx.BotoCoreError as e:
        raise StorageError(f"S3 {where} failed for bucket {bucket!r}: {type(e).__name__}") from None
