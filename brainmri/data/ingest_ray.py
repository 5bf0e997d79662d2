"""The ray engine of `brainmri ingest`: the same three passes as ingest.py, spread over a Ray
cluster, reading SOURCE straight from its storage (an s3:// prefix is never mirrored).

(1) inspect: a Ray Data pipeline over (index, path) items; each worker reads the file
through the source's pyarrow filesystem and runs ingest_rules.inspect_data, the local
engine's rule, returning hashes, pHash, thumbnail and size (never the image bytes). A file
that cannot be read becomes a rejected record (images.UNREADABLE), never a lost row. Files
outside the class folders are only checked for the DICOM magic, as the local engine does.
(2) group and split: on the driver, ingest.publish, as the local engine (ingest.py runs this
module's passes 1 and 3 and its own publish: it imports this module, never the reverse).
(3) write: ingest_rules.plan_shards cuts each split into the same shards as the local engine;
one Ray task per shard reads its files again (checked against pass 1's sha256) and writes
it through ingest_rules.write_shard (local spool file, copy into place, checksum). The driver
then writes inventory.csv, rejects.csv and manifest.json, last.

Same content -> same version id, inventory, rows and shard bytes as the local engine.
DICOM is not handled here: a SOURCE holding DICOM files is refused (use --engine local).
A local SOURCE or DEST must be visible to every node (one machine, or a shared filesystem).
"""

from __future__ import annotations

import functools
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from ..config import ConfigError, IngestConfig
from ..core.storage import Location, open_location
from . import dicom
from . import images as im
from .ingest_rules import (
    Inspected,
    by_split,
    checked,
    inspect_data,
    keep_inspected,
    plan_shards,
    unreadable,
    write_shard,
)
from .walk import FileRecord

BATCH = 32  # files per map_batches call
IO_THREADS = 16  # reads in flight per task: an object store answers each GET in tens of ms,
#                  so one-at-a-time reads would leave the CPUs idle on an s3:// SOURCE
MAX_BLOCKS = 200
# What a worker returns per file (the driver rebuilds an Inspected from it).
_INFO = ("sha256", "phash", "phash_mirror", "height", "width", "mode", "format", "n_bytes", "thumb")


class DicomOnRay(ConfigError):
    """The ray engine met DICOM files; one line that names --engine local."""


# -- pass 1 -------------------------------------------------------------------------------------
def inspect_on_ray(source: str, src: Location, records: list[FileRecord], cfg: IngestConfig) -> None:
    """Inspect every pending record (and check files outside the class folders for the DICOM
    magic) on the cluster; records are updated in place as inspect_all does."""
    import ray.data

    limits = im.ImageLimits(min_side=cfg.min_side, max_pixels=cfg.max_pixels)
    items = [{"i": i, "path": r.path, "magic_only": r.status != "pending"}
             for i, r in enumerate(records)
             if r.status == "pending" or r.reason == im.UNKNOWN_CLASS]
    if not items:
        return
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours is below
    blocks = max(1, min(len(items) // (4 * BATCH) + 1, MAX_BLOCKS))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        inspect_batch, batch_size=BATCH, batch_format="numpy",
        fn_kwargs={"root_uri": src.uri, "limits": limits})
    seen, n_dicom = set(), 0
    bar = tqdm(total=len(items), desc="inspect", unit="img", disable=None)
    for b in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        for k, i in enumerate(b["i"]):
            i = int(i)
            seen.add(i)
            res = _result(b, k)
            if res.dicom:
                n_dicom += 1
            elif records[i].status == "pending":
                keep_inspected(records[i], res, None)
        bar.update(len(b["i"]))
    bar.close()
    missing = len({it["i"] for it in items} - seen)
    if missing:  # never a silently smaller dataset
        raise RuntimeError(f"{missing} files of {source!r} came back uninspected; run ingest again")
    if n_dicom:
        raise DicomOnRay(f"SOURCE {source!r} holds {n_dicom} DICOM files: the ray engine does not "
                         "ingest DICOM; run with --engine local on a local copy of SOURCE")


def inspect_batch(batch: dict, root_uri: str, limits: im.ImageLimits) -> dict:
    """Ray Data map_batches: read each file through the source's filesystem and inspect it
    (ingest_rules.inspect_data); one output row per input row, whatever happens to the file."""
    root = _location(root_uri)
    jobs = [(str(rel), bool(m)) for rel, m in zip(batch["path"], batch["magic_only"], strict=True)]
    with ThreadPoolExecutor(IO_THREADS) as pool:  # the reads overlap; inspection is CPU work
        read = list(pool.map(lambda job: _read_one(root, *job, limits), jobs))
    out: dict[str, list] = {k: [] for k in ("i", "reason", "detail", "dicom") + _INFO}
    for i, (_, magic_only), data in zip(batch["i"], jobs, read, strict=True):
        res = _inspect_read(data, magic_only, limits)
        info = res.scans[0].info if res.scans else None
        out["i"].append(int(i))
        out["reason"].append(res.reason)
        out["detail"].append(res.detail)
        out["dicom"].append(res.dicom)
        for k in _INFO:
            out[k].append(getattr(info, k) if info is not None else _EMPTY[k])
    types = {"i": np.int64, "dicom": bool, "phash": np.int64, "phash_mirror": np.int64, "height": np.int32,
             "width": np.int32, "n_bytes": np.int64}
    return {k: np.asarray(v, dtype=types.get(k, object)) for k, v in out.items()}


_EMPTY = {"sha256": "", "phash": 0, "phash_mirror": 0, "height": 0, "width": 0, "mode": "", "format": "",
          "n_bytes": 0, "thumb": b""}


@functools.lru_cache(maxsize=4)
def _location(uri: str) -> Location:
    """One filesystem client per worker process and URI (an S3 client is not free to make)."""
    return open_location(uri)


def _read_one(root: Location, rel: str, magic_only: bool, limits: im.ImageLimits) -> bytes | OSError:
    """The file's bytes (its first bytes when only the DICOM magic is wanted), or the error."""
    try:
        with root.fs.open_input_stream(posixpath.join(root.path, rel)) as f:
            return f.read(dicom.MAGIC_AT + 4 if magic_only else limits.max_bytes + 1)
    except (OSError, pa.ArrowException) as e:
        return e if isinstance(e, OSError) else OSError(str(e))


def _inspect_read(data: bytes | OSError, magic_only: bool, limits: im.ImageLimits) -> Inspected:
    if isinstance(data, OSError):
        return unreadable(data)
    if magic_only:  # outside the class folders: only whether it is a DICOM export
        return Inspected(dicom=dicom.has_magic(data))
    # DICOM is refused on the driver: no salt here, so its UIDs stay out of the result
    return inspect_data(data, limits, None)


def _result(b: dict, k: int) -> Inspected:
    if b["dicom"][k]:
        return Inspected(dicom=True)
    if b["reason"][k]:
        return Inspected(reason=str(b["reason"][k]), detail=str(b["detail"][k]))
    info = im.ImageInfo(sha256=str(b["sha256"][k]), phash=int(b["phash"][k]),
                        phash_mirror=int(b["phash_mirror"][k]),
                        height=int(b["height"][k]), width=int(b["width"][k]),
                        mode=str(b["mode"][k]), format=str(b["format"][k]),
                        n_bytes=int(b["n_bytes"][k]), thumb=bytes(b["thumb"][k]))
    return Inspected([im.Scan(b"", info)])


# -- pass 3 -------------------------------------------------------------------------------------
def write_on_ray(src: Location, accepted: list[FileRecord], out: Location, cfg: IngestConfig) -> list[dict]:
    """Every shard of every split as one Ray task; shards listed in the local engine's order."""
    import ray

    task = ray.remote(num_cpus=1)(_shard_task)
    refs = []
    for split, rows, seed in by_split(accepted, cfg):
        for k, chunk in enumerate(plan_shards(rows, cfg, seed)):
            for r in chunk:
                r.info.thumb = b""  # pass 2 is done: the task needs no thumbnails
            refs.append(task.remote(chunk, src.uri, split, k, out.uri, cfg))
    bar = tqdm(total=len(accepted), desc="write", unit="img", disable=None)
    done, pending = {}, list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done[ready[0]] = ray.get(ready[0])
        bar.update(done[ready[0]]["rows"])
    bar.close()
    return [done[r] for r in refs]


def _shard_task(rows: list[FileRecord], src_uri: str, split: str, index: int, out_uri: str,
                cfg: IngestConfig) -> dict:
    src, out = _location(src_uri), open_location(out_uri)

    def fetch(r: FileRecord) -> bytes:
        with src.fs.open_input_stream(posixpath.join(src.path, r.path)) as f:
            return f.read()

    # write_shard asks for the rows in order, once each: read them ahead, IO_THREADS at a
    # time (a shard's bytes, shard_mb, is what this can hold in memory)
    with ThreadPoolExecutor(IO_THREADS) as pool:
        ahead = zip(rows, pool.map(fetch, rows), strict=True)

        def read(r: FileRecord) -> bytes:
            got, data = next(ahead)
            if got is not r:
                raise RuntimeError(f"shard {split}/{index}: rows read out of order at {r.path}")
            return checked(data, r)

        return write_shard(rows, read, split, index, out, cfg)
