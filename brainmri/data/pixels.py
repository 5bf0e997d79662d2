"""Pixel shards: a dataset version's splits preprocessed once and stored beside it.

Training with the worker cache off (a dataset larger than the workers' memory) streams every
epoch. Decoding the JPEGs again each epoch costs ~1.7-1.9 ms of CPU an image at 160 px (1.4 ms
of it the decode itself), a third of a 2-core node's epoch and the same CPUs the model needs.
Pixel shards hold the output of `preprocess` (uint8 [S, S], the one preprocessing rule) as
Parquet, built once per version, image size and rule by Ray Data tasks spread over the
cluster (128 rows a decode task, then a task a file writes and hashes it), so a streamed
epoch only reads and decompresses bytes: Ray Data deals each rank its rows (`read_pixels`), the rank reads
them from the files (`PixelReader`) and views them as uint8 arrays in place (`from_pixels`).
Random augmentation still happens per batch, on the worker.

Layout, beside the version's own shards (which it never touches):

    <version>/pixels/<S>px-<key>/<attempt>/<split>/part-*.parquet   columns x (S*S bytes), label
    <version>/pixels/<S>px-<key>/pixels.json                         written last
    <version>/pixels/<S>px-<key>/build.lease                         one builder at a time

pixels.json lists every shard with its split, rows, size and sha256 (the record the
version's manifest keeps, checked by the same `verify_shards`, after the build and before
every use), and the manifest hash of the version it was built from. A build that dies leaves
an attempt folder that no pixels.json names: no reader ever sees it, and a later build
deletes it once it is STALE_S old. Concurrent trainings (tune trials) wait on the lease and
reuse the first one's build; correctness never depends on the lease (two builds that both
run write separate attempts, and the last pixels.json wins). <key> names the rule
(preprocess.PREPROCESS_ID, the size, Pillow's version): a changed rule or decoder gets a
new folder, never stale pixels.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import time
import uuid

import numpy as np

from ..core.lock import Lease
from ..core.storage import Location, StorageError, open_location
from .datasets import manifest_hash, read_shards, split_files, verify_shards
from .preprocess import PREPROCESS_ID, preprocess_batch

PIXELS_MANIFEST = "pixels.json"
LEASE = "build.lease"
# a shard file holds about this many bytes of pixels before compression (1310 rows at 160 px,
# 128 at 512 px): one build task's memory; a rank holds up to three (the file it takes
# batches from, the next one read ahead, a shuffled copy)
SHARD_BYTES = 32 << 20
# Parquet codec of the shards, by measurement (benchmarks/train.py --only feed): the 4385 train
# scans at 160 px are 112 MB raw, 88 MB lz4, 83 MB zstd; one thread reads them at ~197k, 123k
# and 39k images/s. lz4 keeps most of zstd's saving (object storage) at 3x its read speed
COMPRESSION = "lz4"
STALE_S = 6 * 3600  # unreferenced attempts older than this are a dead build's: deleted
LEASE_TTL_S = 120.0
BUILD_WAIT_S = 24 * 3600.0  # a trial waits this long for another's build before giving up
ATTEMPT_TIME = "%Y%m%d-%H%M%S"  # UTC, the start of each attempt's name


def shard_rows(size: int) -> int:
    return max(1, SHARD_BYTES // (size * size))


def rule_key(size: int) -> str:
    import PIL

    text = f"{PREPROCESS_ID}|{size}|pillow {PIL.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pixels_root(version: Location, size: int) -> Location:
    return version / "pixels" / f"{int(size)}px-{rule_key(size)}"


def split_rows(shards: list[dict], split: str) -> int:
    return sum(s["rows"] for s in shards if s["split"] == split)


def pixel_files(root: Location, pix: dict, split: str) -> list[str]:
    """Paths (for root.fs) of the split's pixel shards, in the order they were built."""
    return [(root / s["path"]).path for s in pix["shards"] if s["split"] == split]


def from_pixels(batch, size: int) -> dict:
    """A pyarrow batch of pixel rows (a shard, a feed batch) -> {'x': uint8 [B, S, S],
    'label': int64 [B]}: a numpy view of the column's one buffer, no per-row Python and no
    copy (except to join a column that comes in several chunks)."""
    import pyarrow as pa

    col = batch.column("x")
    if isinstance(col, pa.ChunkedArray):  # combine_chunks copies even a single chunk
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    n = len(col)
    if n == 0:
        return {"x": np.zeros((0, size, size), np.uint8), "label": np.zeros(0, np.int64)}
    if col.type.byte_width != size * size:
        raise StorageError(f"pixel rows of {col.type.byte_width} bytes are not {size}x{size} images")
    x = np.frombuffer(col.buffers()[1], np.uint8, count=n * size * size, offset=col.offset * size * size)
    label = batch.column("label").to_numpy().astype(np.int64, copy=False)
    return {"x": x.reshape(n, size, size), "label": label}


def read_pixels(root: Location, pix: dict, split: str, *, limit: int = 0):
    """The split's pixel shards (as the verified pixels.json lists them) as a Ray Data dataset
    of references, one row an image: {'path' (under root), 'rows' (the file's, as recorded),
    'row'}, one block a shard file, in the manifest's order. `limit`: the first `limit` rows
    only (0: all). A worker turns its blocks into pixels with `PixelReader`.

    Why references and not the pixels themselves: pixel shards need no work but reading, and
    moving the bytes through Ray's object store costs more than reading them. Measured on this
    2-core machine (benchmarks/results/feed-20261207b.md): a 34 MB block's put takes ~20 ms
    against 4 ms for a memcpy, and read tasks on one CPU handed on 4,385 train images at
    17-19k images/s a pass where one pyarrow thread reads them at ~100k. Ray Data still plans
    every epoch: which rank gets which rows (streaming_split, equal for training, every row
    once for validation), re-made when a worker group is replaced; each rank reads the shard
    files its rows name, from the bucket, on its own node."""
    import pyarrow as pa
    import ray.data

    def refs(path: str, rows: int, n: int):  # the first n rows of a file of `rows`
        return pa.table({"path": pa.array([path] * n, pa.string()),
                         "rows": pa.array(np.full(n, rows, np.int64)),
                         "row": pa.array(np.arange(n, dtype=np.int64))})

    tables, left = [], limit or split_rows(pix["shards"], split)
    for s in pix["shards"]:
        if s["split"] == split and left > 0:
            n = min(int(s["rows"]), left)
            left -= n
            tables.append(refs(s["path"], int(s["rows"]), n))
    return ray.data.from_arrow(tables or [refs("", 0, 0)])


class PixelReader:
    """A worker's side of the pixel feed: blocks of `read_pixels` references -> their pixel
    rows {'x': uint8 [N, S, S], 'label': int64 [N]}, read from the shard files by this process
    (pyarrow, whole files: a shard is one row group). The file a block names is read once
    (a next block of the same file, a split's remainder, reuses it); rows that are a run of
    the file are a view of it, others a gather. A file that cannot be read or does not hold
    its recorded rows raises StorageError naming it. `rows_of` reads one block ahead on a
    thread (pyarrow releases the GIL), so the next file's read overlaps this one's training."""

    def __init__(self, uri: str, size: int):
        self.uri, self.size = uri, int(size)
        self._root, self._file = None, (None, None)

    def _read(self, path: str, rows: int) -> dict:
        import pyarrow.parquet as pq

        name, got = self._file
        if name == path:
            return got
        self._root = self._root or open_location(self.uri)
        where = self._root / path  # a path from the verified pixels.json; `/` refuses '..'
        try:
            t = pq.read_table(where.path, filesystem=self._root.fs, columns=["x", "label"], use_threads=False)
        except OSError as e:  # a missing file, storage that does not answer: one line, naming it
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise StorageError(f"pixel shard {where.uri} could not be read: {first}") from None
        if t.num_rows != rows:
            raise StorageError(f"{where.uri} holds {t.num_rows} rows, its record {rows}")
        got = from_pixels(t, self.size)
        self._file = (path, got)
        return got

    def rows(self, block) -> dict:
        """One block of references -> its pixel rows, in the block's order."""
        n = block.num_rows
        if n == 0:
            return {"x": np.zeros((0, self.size, self.size), np.uint8), "label": np.zeros(0, np.int64)}
        paths = block.column("path").to_numpy(zero_copy_only=False)
        recorded = block.column("rows").to_numpy()
        row = block.column("row").to_numpy()
        cuts = [0, *(np.flatnonzero(paths[1:] != paths[:-1]) + 1).tolist(), n]
        xs, ys = [], []
        for a, b in zip(cuts[:-1], cuts[1:]):
            f, r = self._read(str(paths[a]), int(recorded[a])), row[a:b]
            if np.all(np.diff(r) == 1):  # a run of the file: a view
                xs.append(f["x"][r[0]:r[-1] + 1])
                ys.append(f["label"][r[0]:r[-1] + 1])
            else:
                xs.append(f["x"][r])
                ys.append(f["label"][r])
        if len(xs) == 1:
            return {"x": xs[0], "label": ys[0]}
        return {"x": np.concatenate(xs), "label": np.concatenate(ys)}

    def rows_of(self, blocks):
        """`rows` of each block, the next block's read started before this one is handed on."""
        from concurrent.futures import ThreadPoolExecutor

        try:
            with ThreadPoolExecutor(1, thread_name_prefix="pixel-read") as pool:
                ahead = None
                for block in blocks:
                    nxt = pool.submit(self.rows, block)
                    if ahead is not None:
                        yield ahead.result()
                    ahead = nxt
                if ahead is not None:
                    yield ahead.result()
        finally:
            self._file = (None, None)  # not held between epochs


def pixel_table(x: np.ndarray, label, size: int):
    """uint8 [N, S, S] images (N may be 0) and their labels -> the pixel-shard (and feed)
    table: x as fixed_size_binary[S*S] over the same buffer (no copy), label int64."""
    import pyarrow as pa

    x = np.ascontiguousarray(x, np.uint8)
    n = len(x)
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(size * size), n, [None, pa.py_buffer(x)])
    return pa.table({"x": col, "label": pa.array(np.asarray(label, np.int64))})


def decode_pixels(batch: dict, size: int):
    """Ray Data map_batches function, the decoding feed: {'image': bytes, 'label'} -> the
    pixel-shard table, so both feeds hand the workers the same rows (read by `from_pixels`)."""
    x = preprocess_batch(batch, size)
    return pixel_table(x["x"], x["label"], size)


def decoded_split(version: Location, manifest: dict, split: str, size: int, limit: int = 0):
    """The split's first `limit` rows (0: all) as a Ray Data dataset of pixel rows (`pixel_table`'s),
    decoded with the one rule in the read tasks themselves: the decoding training feed's and
    the pixel build's source."""
    # only the two columns are read (the rest of a row is metadata neither uses); the limit is
    # cut in the reads, and the decode maps a block at a time (batch_size None): Ray Data fuses
    # a map into the read task only then (a map with a batch size may not follow a read that
    # could change the number of rows), so the encoded bytes never cross the object store
    d = read_shards(version, manifest, split, ["image", "label"], limit=limit)
    d = d.map_batches(decode_pixels, fn_kwargs={"size": size}, batch_size=None, batch_format="numpy")
    # Ray Data's resource allocator held the decode to one task on 2 free CPUs: as the feed's
    # one operator, at reservation ratio 0.5 or 1.0 (454-547 img/s a warm pass of 1024 scans,
    # 806-874 without: benchmarks/results/train-cpu-20261207-feed.txt), and in the build's
    # three (builds of 12.3-13.5 s with it, 6.3-6.8 without: jpeg-path-20261207b.md). Ray's
    # scheduler still runs no more tasks than there are free CPUs
    d.context.op_resource_reservation_enabled = False
    return d


def _write_part(table, folder: Location, split: str, size: int) -> dict:
    """Ray Data map_batches function: a block of pixel rows (`pixel_table`'s) -> one Parquet
    file under `folder` (atomic write), returned as its shard record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = table.num_rows
    if n == 0:
        return {"split": np.array([], dtype=object), "path": np.array([], dtype=object),
                "rows": np.zeros(0, np.int64), "bytes": np.zeros(0, np.int64),
                "sha256": np.array([], dtype=object)}
    if table.schema.field("x").type != pa.binary(size * size):
        raise ValueError(f"pixel rows of type {table.schema.field('x').type}, expected "
                         f"fixed_size_binary[{size * size}] ({size} px)")
    buf = io.BytesIO()
    pq.write_table(table.select(["x", "label"]), buf, compression=COMPRESSION, use_dictionary=False)
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
    verify_shards(version, manifest, splits)  # the source, as every reader of it does (cached)
    root = pixels_root(version, size)
    attempt = time.strftime(ATTEMPT_TIME, time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    shards = []
    for split in splits:
        files = split_files(version, manifest, split)
        expected = manifest["rows"][split]
        if files:
            folder = root / attempt / split
            # read tasks of SHARD_TASK_ROWS rows with the decode fused into them, so every
            # CPU of the cluster decodes (read_parquet made a task a source file, one of them
            # 4025 of the 4385 train rows, which one CPU decoded while the other idled);
            # then blocks of exactly shard_rows rows (the last fewer: `strict`, or each task's
            # output would be cut on its own, a file a task), a file each
            d = decoded_split(version, manifest, split, size)
            d = d.repartition(target_num_rows_per_block=shard_rows(size), strict=True)
            d = d.map_batches(_write_part, fn_kwargs={"folder": folder, "split": split, "size": size},
                              batch_size=None, batch_format="pyarrow")
            # the manifest lists the files in the source's order (reproducible; the feed
            # itself reads them in whatever order Ray Data's tasks finish)
            d.context.execution_options.preserve_order = True
            recs = d.take_all()
            shards += [{"split": split, "path": f"{attempt}/{split}/{r['path']}", "rows": int(r["rows"]),
                        "bytes": int(r["bytes"]), "sha256": str(r["sha256"])} for r in recs]
        got = split_rows(shards, split)
        if got != expected:
            raise StorageError(f"pixel shards of {split} hold {got} rows, dataset {version.uri} has "
                               f"{expected}: not recorded (attempt {attempt} left unreferenced)")
    pix = {"dataset_version": manifest["version"], "dataset_manifest_hash": manifest_hash(manifest),
           "image_size": int(size), "preprocess": PREPROCESS_ID, "rule_key": rule_key(size),
           "splits": list(splits), "rows": {s: manifest["rows"][s] for s in splits},
           "created_unix": time.time(), "shards": shards}
    verify_shards(root, pix, splits, what="pixel shards")  # what landed, not what was sent
    (root / PIXELS_MANIFEST).write_json(pix)
    _tidy(root, attempt)
    return pix


def _tidy(root: Location, keep: str) -> None:
    """Delete the attempts no pixels.json names (a dead build's, a damaged set's, a
    concurrent loser's) once STALE_S old by the UTC time in their name: a younger one may be
    a build still running."""
    try:
        named = {s["path"].split("/")[0] for s in (root / PIXELS_MANIFEST).read_json()["shards"]}
    except (StorageError, OSError, ValueError, KeyError):
        return
    now = time.time()
    for name in root.listdir():
        if name in named or name == keep or name == PIXELS_MANIFEST or name.startswith((LEASE, ".")):
            continue
        try:
            started = calendar.timegm(time.strptime(name[:15], ATTEMPT_TIME))
        except ValueError:
            continue  # not an attempt of ours: left alone
        if now - started > STALE_S:
            (root / name).delete()


def load_pixels(version: Location, manifest: dict, size: int, splits=("train", "val")) -> dict | None:
    """The complete pixel shards of `splits` for this version and size, verified (size and
    sha256 of every file); None if there are none for this exact version, rule and splits.
    Damaged shards raise StorageError naming the first bad file."""
    m = pixels_root(version, size) / PIXELS_MANIFEST
    if not m.exists():
        return None
    try:
        pix = m.read_json()
    except ValueError as e:
        raise StorageError(f"{m.uri} is not readable JSON ({e})") from None
    if not isinstance(pix, dict) or not isinstance(pix.get("shards"), list) or not all(
            isinstance(r, dict) and {"split", "path", "rows", "bytes", "sha256"} <= r.keys()
            for r in pix["shards"]):
        raise StorageError(f"{m.uri} is not a pixel manifest (no complete shard list)")
    if (pix.get("dataset_manifest_hash") != manifest_hash(manifest) or pix.get("rule_key") != rule_key(size)
            or any(s not in pix.get("splits", []) for s in splits)):
        return None
    for s in splits:
        got = split_rows(pix["shards"], s)
        if got != manifest["rows"][s]:
            raise StorageError(f"pixel shards {m.uri} list {got} {s} rows, the dataset has "
                               f"{manifest['rows'][s]}")
    verify_shards(pixels_root(version, size), pix, splits, what="pixel shards")
    return pix


def ensure_pixels(version: Location, manifest: dict, size: int, splits=("train", "val"),
                  log=print) -> tuple[Location, dict]:
    """The verified pixel shards, built first if there are none (or only damaged ones:
    those are left where they are, unreferenced once the rebuild's pixels.json lands). One
    builder at a time: another caller waits for the lease, then finds its build."""
    root = pixels_root(version, size)

    def usable(say: bool):
        try:
            return load_pixels(version, manifest, size, splits)
        except StorageError as e:
            if say:
                log(f"brainmri: pixel shards under {root.uri} fail verification ({e}); building them again")
            return None

    pix = usable(True)
    if pix is not None:
        return root, pix
    lease = Lease(root / LEASE, LEASE_TTL_S, "pixel shards build").acquire(wait_s=BUILD_WAIT_S, poll_s=5.0)
    lease.start_heartbeat(interrupt_main=False)  # losing it only risks a duplicate build
    try:
        pix = usable(False)  # built while we waited?
        if pix is None:
            t0 = time.time()
            pix = build_pixels(version, manifest, size, splits)
            n = sum(s["rows"] for s in pix["shards"])
            log(f"brainmri: preprocessed {n} images into pixel shards at {size} px in "
                f"{time.time() - t0:.1f} s ({root.uri})")
    finally:
        lease.release()
    return root, pix
