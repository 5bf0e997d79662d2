"""Pixel shards: a dataset version's splits preprocessed once and stored beside it.

Training with the worker cache off (a dataset larger than the workers' memory) streams every
epoch. Decoding the JPEGs again each epoch costs ~1.9 ms of CPU an image at 160 px (1.3 ms of
it the decode itself), a third of a 2-core node's epoch and the same CPUs the model needs.
Pixel shards hold the output of `preprocess` (uint8 [S, S], the one preprocessing rule) as
Parquet, built once per version, image size and rule by Ray Data tasks spread over the
cluster (each preprocesses, writes and hashes its own file), so a streamed epoch only reads
and decompresses bytes. Random augmentation still happens per batch, on the worker.

Layout, beside the version's own shards (which it never touches):

    <version>/pixels/<S>px-<key>/<attempt>/<split>/part-*.parquet   columns x (S*S bytes), label
    <version>/pixels/<S>px-<key>/pixels.json                         written last

pixels.json lists every shard with its split, rows, size and sha256 (the record the
version's manifest keeps, checked by the same `verify_shards`), and the manifest hash of the
version it was built from. A build that dies leaves an attempt folder that no pixels.json
names: no reader ever sees it. <key> names the rule (preprocess.PREPROCESS_ID, the size,
Pillow's version): a changed rule or decoder gets a new folder, never stale pixels.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid

import numpy as np

from ..core.storage import Location, StorageError
from .datasets import manifest_hash, split_files, verify_shards
from .preprocess import PREPROCESS_ID, preprocess_batch

PIXELS_MANIFEST = "pixels.json"
# rows a shard file: 26 MB at 160 px, before compression; a split decodes on at most as many
# CPUs as it has source files, and streams from at most as many readers as it has these
SHARD_ROWS = 1024


def rule_key(size: int) -> str:
    import PIL

    text = f"{PREPROCESS_ID}|{size}|pillow {PIL.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pixels_root(version: Location, size: int) -> Location:
    return version / "pixels" / f"{int(size)}px-{rule_key(size)}"


def pixel_files(root: Location, pix: dict, split: str) -> list[str]:
    """Paths (for root.fs) of the split's pixel shards, in the order they were built."""
    return [(root / s["path"]).path for s in pix["shards"] if s["split"] == split]


def from_pixels(batch, size: int) -> dict:
    """Ray Data map_batches function (pyarrow batches): the stored S*S bytes of each row ->
    {'x': uint8 [B, S, S], 'label': int64 [B]}, without copying the pixels one row at a time."""
    col = batch.column("x").combine_chunks()
    n = len(col)
    x = np.frombuffer(col.buffers()[1], np.uint8, count=n * size * size, offset=col.offset * size * size)
    return {"x": x.reshape(n, size, size), "label": batch.column("label").to_numpy().astype(np.int64)}


def _write_part(batch: dict, folder: Location, split: str, size: int) -> dict:
    """Ray Data map_batches function: preprocessed rows -> one Parquet file under `folder`
    (atomic write), returned as its shard record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.ascontiguousarray(batch["x"], np.uint8)
    n = len(x)
    if n == 0:
        return {k: np.array([], dtype=object) for k in ("split", "path", "rows", "bytes", "sha256")}
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(size * size), n, [None, pa.py_buffer(x)])
    table = pa.table({"x": col, "label": pa.array(np.asarray(batch["label"], np.int64))})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=False)
    data = buf.getvalue()
    name = f"part-{uuid.uuid4().hex[:16]}.parquet"
    (folder / name).write_bytes(data)
    return {"split": np.array([split], dtype=object),
            "path": np.array([name], dtype=object),
            "rows": np.array([n]), "bytes": np.array([len(data)]),
            "sha256": np.array([hashlib.sha256(data).hexdigest()], dtype=object)}


def build_pixels(version: Location, manifest: dict, size: int, splits=("train", "val")) -> dict:
    """Preprocess `splits` of the version with Ray Data into pixel shards; pixels.json last.
    Every source row is accounted for: a split whose shards do not add up to the manifest's
    row count raises, and no pixels.json is written."""
    import ray.data

    root = pixels_root(version, size)
    attempt = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
    shards = []
    for split in splits:
        files = split_files(version, manifest, split)
        expected = manifest["rows"][split]
        if files:
            folder = root / attempt / split
            d = ray.data.read_parquet(files, filesystem=version.fs).select_columns(["image", "label"])
            d = d.map_batches(preprocess_batch, fn_kwargs={"size": size}, batch_size=32, batch_format="numpy")
            d = d.map_batches(_write_part, fn_kwargs={"folder": folder, "split": split, "size": size},
                              batch_size=SHARD_ROWS, batch_format="numpy")
            # the shards keep the source order: `limit_train`/`limit_val` mean the same rows
            d.context.execution_options.preserve_order = True
            recs = d.take_all()
            shards += [{"split": split, "path": f"{attempt}/{split}/{r['path']}", "rows": int(r["rows"]),
                        "bytes": int(r["bytes"]), "sha256": str(r["sha256"])} for r in recs]
        got = sum(s["rows"] for s in shards if s["split"] == split)
        if got != expected:
            raise StorageError(f"pixel shards of {split} hold {got} rows, dataset {version.uri} has "
                               f"{expected}: not recorded (attempt {attempt} left unreferenced)")
    pix = {"dataset_version": manifest["version"], "dataset_manifest_hash": manifest_hash(manifest),
           "image_size": int(size), "preprocess": PREPROCESS_ID, "rule_key": rule_key(size),
           "splits": list(splits), "rows": {s: manifest["rows"][s] for s in splits},
           "created_unix": time.time(), "shards": shards}
    (root / PIXELS_MANIFEST).write_json(pix)
    return pix


def load_pixels(version: Location, manifest: dict, size: int, splits=("train", "val")) -> dict | None:
    """The complete pixel shards of `splits` for this version and size, verified (size and
    sha256 of every file); None if there are none for this exact version, rule and splits.
    Damaged shards raise StorageError naming the first bad file."""
    m = pixels_root(version, size) / PIXELS_MANIFEST
    if not m.exists():
        return None
    pix = m.read_json()
    if (pix.get("dataset_manifest_hash") != manifest_hash(manifest) or pix.get("rule_key") != rule_key(size)
            or any(s not in pix.get("splits", []) for s in splits)):
        return None
    for s in splits:
        got = sum(r["rows"] for r in pix["shards"] if r["split"] == s)
        if got != manifest["rows"][s]:
            raise StorageError(f"pixel shards {m.uri} list {got} {s} rows, the dataset has "
                               f"{manifest['rows'][s]}")
    verify_shards(pixels_root(version, size), pix, splits)
    return pix


def ensure_pixels(version: Location, manifest: dict, size: int, splits=("train", "val"),
                  log=print) -> tuple[Location, dict]:
    """The verified pixel shards, built first if there are none (or only damaged ones:
    those are left where they are, unreferenced once the rebuild's pixels.json lands)."""
    root = pixels_root(version, size)
    try:
        pix = load_pixels(version, manifest, size, splits)
    except StorageError as e:
        log(f"brainmri: pixel shards under {root.uri} fail verification ({e}); building them again")
        pix = None
    if pix is None:
        t0 = time.time()
        pix = build_pixels(version, manifest, size, splits)
        n = sum(s["rows"] for s in pix["shards"])
        log(f"brainmri: preprocessed {n} images into pixel shards at {size} px in "
            f"{time.time() - t0:.1f} s ({root.uri})")
    return root, pix
