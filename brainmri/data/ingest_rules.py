"""The rules both ingest engines apply to one file and to one shard: ingest.py's local engine
and ingest_ray.py's run them alike, so the same content gives the same version, inventory and
shard bytes on either.

- pass 1, one file: `inspect_data` -> `Inspected` (its scans without their bytes, or why it
  was rejected); `keep_inspected` puts that on the file's record.
- pass 3, one split: `by_split` and `plan_shards` cut it into shards (by image bytes, in a
  seeded shuffle); `write_shard` streams one shard's rows (`SCHEMA`) into place, checked by
  `checked` against pass 1's sha256.

They live here, below both engines, because ingest.py hands work to the ray engine: ingest ->
ingest_ray -> ingest_rules, never back (pyproject.toml's import contracts).
"""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import IngestConfig
from ..core.storage import Location
from . import dicom
from . import images as im
from .datasets import SPLITS
from .walk import FileRecord

SCHEMA = pa.schema([
    ("image", pa.binary()),  # the original encoded file, byte for byte; a DICOM slice as PNG
    ("label", pa.int16()),
    ("class_name", pa.string()),
    ("sha256", pa.string()),
    ("phash", pa.int64()),
    ("phash_mirror", pa.int64()),  # of the left-right mirror image (leakage checks, dedup.py)
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("mode", pa.string()),
    ("format", pa.string()),
    ("path", pa.string()),  # relative to SOURCE
    ("source_split", pa.string()),  # Training / Testing / "" (no split folder)
    ("group", pa.string()),  # duplicate group id: a group never straddles splits
    ("frame", pa.int32()),  # a DICOM slice's frame index in its file; 0 for other images
    ("dicom", dicom.ARROW_TYPE),  # a DICOM slice's de-identified tags; null for other images
])

TMP_PREFIX = ".tmp-"  # a file being written (Location.write_bytes uses the same prefix)


# -- pass 1: one file --------------------------------------------------------------------------
@dataclass
class Inspected:
    """What pass 1 learnt of one file: its scans, or why it was rejected."""

    scans: list[im.Scan] | None = None  # images without their bytes (re-read in pass 3)
    reason: str = ""
    detail: str = ""
    dicom: bool = False  # DICOM by content: its path is written as a pseudonym
    spooled: list[tuple[int, int]] = field(default_factory=list)  # each slice's (offset, length)


def unreadable(e: OSError) -> Inspected:
    return Inspected(reason=im.UNREADABLE, detail=(e.strerror or str(e))[:300])


def inspect_data(data: bytes, limits: im.ImageLimits, salt: bytes | None) -> Inspected:
    """A file's first limits.max_bytes + 1 bytes -> what pass 1 keeps of it: the one rule of
    both engines (ingest.py's local processes, Ray workers in ingest_ray.py)."""
    try:
        scans = im.inspect_scans(data, limits, salt)
    except im.RejectedImage as e:
        return Inspected(reason=e.reason, detail=e.detail[:300], dicom=e.dicom)
    if scans[0].dicom is None:
        scans[0].image = b""  # the parent needs the hashes, not the bytes
    return Inspected(scans, dicom=scans[0].dicom is not None)


def keep_inspected(rec: FileRecord, res: Inspected, spool) -> None:
    """Rejection, or the file's scans (a DICOM slice's PNG to the spool, not to memory)."""
    if res.scans is None:
        rec.status, rec.reason, rec.detail = "rejected", res.reason, res.detail
        return
    for s in res.scans:
        if s.dicom is not None:
            res.spooled.append(spool.put(s.image))
            s.image = b""
    rec.info = res.scans[0].info


# -- pass 3: one shard -------------------------------------------------------------------------
def checked(data: bytes, r: FileRecord) -> bytes:
    if hashlib.sha256(data).hexdigest() != r.info.sha256:
        what = "the spooled slices" if r.spool is not None else r.path
        raise RuntimeError(f"{what} changed while being ingested; run ingest again")
    return data


def plan_shards(rows: list[FileRecord], cfg: IngestConfig, seed: int) -> list[list[FileRecord]]:
    """One split's rows, shuffled so every shard mixes classes, cut into shards of
    ~cfg.shard_mb of image bytes (known from pass 1, so both engines cut alike, before
    anything is written; the other columns add a few KB)."""
    limit = cfg.shard_mb * 1024 * 1024
    chunks, cur, size = [], [], 0
    for k in np.random.default_rng(seed).permutation(len(rows)):
        r = rows[k]
        cur.append(r)
        size += r.spool[1] if r.spool is not None else r.info.n_bytes
        if size >= limit:
            chunks.append(cur)
            cur, size = [], 0
    if cur:
        chunks.append(cur)
    return chunks


def by_split(accepted: list[FileRecord], cfg: IngestConfig):
    """(split, its rows, its plan_shards seed) in SPLITS order: the one order and seed both
    engines cut shards by (their shards must come out alike)."""
    for i, split in enumerate(SPLITS):
        yield split, [r for r in accepted if r.split == split], cfg.seed + i


def write_shard(rows: list[FileRecord], read, split: str, index: int, out: Location,
                cfg: IngestConfig, bar=None) -> dict:
    """Stream `rows` (each image from `read(record)`) into out/split/part-<index>.parquet,
    through a local spool file and _copy_into_place -> the manifest's entry for the shard."""
    name = f"part-{index:05d}.parquet"  # by position: every writer picks the same
    # Nameless (O_TMPFILE, or unlinked at once): the OS reclaims it even on SIGKILL.
    with tempfile.TemporaryFile(prefix="brainmri-spool-", suffix=".parquet") as tmp:
        writer = pq.ParquetWriter(tmp, SCHEMA, write_page_checksum=True, compression={
            c: ("NONE" if c == "image" else "ZSTD") for c in SCHEMA.names})
        batch = []
        for r in rows:
            data, i = read(r), r.info
            batch.append(dict(image=data, label=r.label, class_name=cfg.classes[r.label],
                              sha256=i.sha256, phash=i.phash, phash_mirror=i.phash_mirror,
                              height=i.height, width=i.width,
                              mode=i.mode, format=i.format, path=r.path,
                              source_split=r.source_split, group=r.group, frame=r.frame,
                              dicom=r.scan.dicom if r.scan is not None else None))
            if len(batch) >= cfg.row_group_rows:
                writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
                batch = []
            if bar is not None:
                bar.update()
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
        writer.close()
        tmp.seek(0)
        rows_in = pq.ParquetFile(tmp).metadata.num_rows
        tmp.seek(0)
        size, sha = _copy_into_place(tmp, out / split, name)
    return {"path": f"{split}/{name}", "split": split, "rows": rows_in, "bytes": size, "sha256": sha}


def _copy_into_place(src, folder: Location, name: str) -> tuple[int, str]:
    """Stream `src` to folder/name, returning (bytes, sha256). Locally through a temp file of
    this writer's own (uuid) name, then renamed: a reader, or a concurrent ingest of the same
    content writing the same name, only ever sees a whole shard. S3 objects appear whole."""
    sha, size = hashlib.sha256(), 0
    dest = folder / name
    tmp = dest if dest.is_s3 else folder / f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
    if not dest.is_s3:
        folder.mkdir()
    try:
        with dest.fs.open_output_stream(tmp.path) as f:
            while chunk := src.read(1 << 20):
                sha.update(chunk)
                size += len(chunk)
                f.write(chunk)
        if tmp is not dest:
            dest.fs.move(tmp.path, dest.path)
    except BaseException:
        if tmp is not dest:
            tmp.delete()
        raise
    return size, sha.hexdigest()
