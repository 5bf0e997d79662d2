"""What a serving replica does, without Ray: find the model to serve, load it through
predict's Predictor, turn an HTTP body into image bytes, and a Row into an answer.

Every prediction rule lives in brainmri.evaluation.predict (ingest's checks before decoding,
the preprocessing, the temperature from calibration.json, the abstain rule): a replica holds
one `Predictor` and hands it (name, bytes) pairs, exactly what `brainmri predict` does with
files, so an answer over HTTP equals predict's row for the same bytes.
"""

from __future__ import annotations

import email.message
import posixpath
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..config import ConfigError, ServeConfig, from_dict, to_dict
from ..core.storage import Location, StorageError, open_location
from ..data import images as im
from ..evaluation.predict import Predictor, Row, row_fields
from ..models.checkpoints import model_file
from ..ops.retrain import state_root

# ServeConfig fields a replica is configured with (its user_config); the others place the
# application (HTTP address, replicas, CPUs) and belong to Serve's own config
REPLICA_KEYS = ("store", "dataset", "model", "abstain_below", "max_batch_size", "batch_wait_ms",
                "poll_s")
MULTIPART_SLACK = 64 * 1024  # headers and boundaries around one image in a multipart body
CHAMPION_KEYS = ("model", "dataset", "frozen_test", "test", "promoted_at", "audit", "previous")


def replica_config(args: dict) -> ServeConfig:
    """A replica's settings (Serve user_config, or a RayService's application args) ->
    validated ServeConfig; keys that are not replica settings are refused, not ignored."""
    extra = sorted(set(args or {}) - set(REPLICA_KEYS))
    if extra:
        raise ConfigError(f"not replica settings: {', '.join(extra)}; known: {', '.join(REPLICA_KEYS)}")
    return from_dict(ServeConfig, dict(args or {}))


def replica_args(cfg: ServeConfig) -> dict:
    d = to_dict(cfg)
    return {k: d[k] for k in REPLICA_KEYS}


# -- what to serve -----------------------------------------------------------------------------
def champion_file(cfg: ServeConfig) -> Location:
    return state_root(open_location(cfg.store), cfg.dataset) / "champion.json"


def resolve(cfg: ServeConfig) -> tuple[str, dict | None]:
    """The weights file to serve now, and retrain's champion record when serving a store.
    Cheap (one small read for a store): replicas call it every poll_s seconds."""
    if cfg.model:
        return model_file(cfg.model).uri, None
    f = champion_file(cfg)
    rec = f.read_json() if f.exists() else {}
    if not rec.get("model"):  # absent, or holding only a lease's fence stamp
        raise StorageError(f"no champion in {f.uri} yet (retrain has not promoted one); "
                           "serve a model with --model instead")
    return model_file(rec["model"]).uri, rec


@dataclass
class Served:
    """One loaded model version. A replica swaps whole Served objects, never their parts, so
    whatever answers a request comes from one version, the one `identity` names."""

    predictor: Predictor
    weights_uri: str
    champion: dict | None
    loaded_at: float

    @property
    def identity(self) -> dict:
        ref = self.predictor.ref
        return {"name": ref.name, "version": ref.version, "sha256": ref.sha256}

    def card(self) -> dict:
        """GET /model: what the version is, from its metadata.json (and the champion record)."""
        p, ref = self.predictor, self.predictor.ref
        meta, state = ref.metadata, ref.state
        return {**self.identity, "uri": posixpath.dirname(self.weights_uri),
                "stage": meta.get("stage"), "created_at": meta.get("created_at"),
                "architecture": state["config"].get("model"), "params": state.get("params"),
                "classes": ref.classes, "image_size": ref.image_size, "dataset": state.get("dataset"),
                "metrics": meta.get("metrics", {}), "versions": meta.get("versions") or state.get("versions"),
                "calibration": {"calibrated": p.calibrated, "temperature": p.temperature},
                "abstain_below": p.abstain_below,
                "champion": {k: self.champion.get(k) for k in CHAMPION_KEYS} if self.champion else None,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at))}


def load(weights_uri: str, champion: dict | None, cfg: ServeConfig) -> Served:
    return Served(Predictor(weights_uri, cfg.abstain_below), weights_uri, champion, time.time())


def answer(row: Row, served: Served) -> tuple[int, dict]:
    """predict's fields for the row, plus which model answered; 422 for a file predict
    rejects (the reason is ingest's, e.g. not_an_image), never a server error."""
    body = row_fields(row)
    body.update(model=served.identity, calibrated=served.predictor.calibrated)
    return (200 if row.ok else 422), body


# -- the request -------------------------------------------------------------------------------
class BadRequest(ValueError):
    """A request we refuse before any model sees it; `status` is the HTTP 4xx."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(f"{error}: {detail}")
        self.status, self.error, self.detail = status, error, detail

    def fields(self) -> dict:
        return {"ok": False, "error": self.error, "detail": self.detail}


def body_limit(limits: im.ImageLimits) -> int:
    return limits.max_bytes + MULTIPART_SLACK


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit`: from its
    Content-Length before reading, else while reading, never holding more than limit bytes."""
    if declared and declared.strip().isdigit() and int(declared) > limit:
        raise BadRequest(413, im.TOO_LARGE, f"{int(declared)} bytes > {limit}")
    parts, n = [], 0
    async for chunk in chunks:
        n += len(chunk)
        if n > limit:
            raise BadRequest(413, im.TOO_LARGE, f"more than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _header(name: str, value: str) -> email.message.Message:
    m = email.message.Message()  # RFC 2231/quoted parameters, as mail and HTTP share them
    m[name] = value
    return m


def image_from_body(content_type: str, body: bytes) -> tuple[str, bytes]:
    """(file name or '', image bytes): a multipart/form-data body must carry exactly one file
    part; any other body is the image itself (raw bytes)."""
    ctype = _header("content-type", content_type or "application/octet-stream")
    if ctype.get_content_type() != "multipart/form-data":
        return "", body
    boundary = ctype.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise BadRequest(400, "bad_multipart", "multipart/form-data without a boundary")
    files = [p for p in _multipart_parts(body, boundary.encode("latin-1")) if p[0] is not None]
    if len(files) != 1:
        raise BadRequest(400, "bad_multipart", f"{len(files)} file parts; send one image per request")
    return files[0]


def _multipart_parts(body: bytes, boundary: bytes) -> list[tuple[str | None, bytes]]:
    """(file name, or None for a plain field; content) per part (RFC 7578). Binary content is
    kept byte for byte: a delimiter is CRLF + '--' + boundary, which the sender chose so that
    it occurs nowhere in the content."""
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary)
    if len(chunks) < 2:
        raise BadRequest(400, "bad_multipart", "no part starts with the declared boundary")
    out = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the close delimiter: what follows is epilogue
            return out
        head, sep, content = chunk.lstrip(b" \t").removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise BadRequest(400, "bad_multipart", "a part has no blank line after its headers")
        out.append((_part_filename(head), content))
    raise BadRequest(400, "bad_multipart", "the body ends before the closing boundary (truncated)")


def _part_filename(head: bytes) -> str | None:
    for line in head.decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            disp = _header("content-disposition", value.strip())
            name = disp.get_filename()
            if name is not None:
                return posixpath.basename(name.replace("\\", "/"))[:200]  # a name, never a path
            return "" if disp.get_param("name", header="content-disposition") in ("file", "image") else None
    return None
