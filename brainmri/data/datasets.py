"""Finding and reading dataset versions written by `brainmri ingest`.

A version is complete when its manifest.json exists (ingest writes it last); readers only
ever see complete versions. A dataset is named by a version folder URI, or by
`STORE/datasets/NAME` (meaning its latest complete version), or STORE plus a name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..core.storage import Location, StorageError, check_name, open_location

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
SHARD_BLOCK_BYTES = 4 << 20  # Ray Data blocks of a version's encoded rows: ~200 scans (read_shards)
# a read task of a version's shards covers this many rows (2 of ingest's 64-row groups, about
# one block): whatever is fused after the read (decoding: ~2.3 ms an image, 0.3 s a task) then
# runs on every free CPU, not in one task a file (`--only data`'s 1024 scans decoded in 2 tasks)
SHARD_TASK_ROWS = 128


def dataset_root(store: Location, name: str) -> Location:
    return store / "datasets" / check_name(name, "dataset name")


def complete_versions(root: Location) -> list[tuple[float, str, dict]]:
    out = []
    for v in root.listdir():
        m = root / v / MANIFEST
        if m.exists():
            man = m.read_json()
            out.append((man.get("created_unix", 0.0), v, man))
    return sorted(out)


def latest_version(store: Location, name: str) -> Location:
    root = dataset_root(store, name)
    versions = complete_versions(root)
    if not versions:
        raise StorageError(f"no complete version of dataset {name!r} under {root.uri}")
    return root / versions[-1][1]


def resolve_dataset(uri: str, name: str | None = None) -> tuple[Location, dict]:
    """URI of a version folder, of a dataset folder (-> latest), or of a store + name."""
    loc = open_location(uri, check=True)
    versions = [] if (loc / MANIFEST).exists() else complete_versions(loc)
    if (loc / MANIFEST).exists():
        pass
    elif versions:  # a dataset folder: its latest complete version
        loc = loc / versions[-1][1]
    elif name:  # a store: datasets/<name>/<latest>
        loc = latest_version(loc, name)
    else:
        raise StorageError(f"{loc.uri} is not a complete dataset version (no {MANIFEST}) "
                           "nor a dataset folder holding one (for a store, give the dataset name)")
    return loc, load_manifest(loc)


def load_manifest(version: Location) -> dict:
    m = version / MANIFEST
    if not m.exists():
        raise StorageError(f"{version.uri} is incomplete: it has no {MANIFEST}")
    return m.read_json()


def manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def split_files(version: Location, manifest: dict, split: str) -> list[str]:
    """Paths (for version.fs) of the split's shards, as listed in the manifest."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [(version / s["path"]).path for s in manifest["shards"] if s["split"] == split]


def read_split(version: Location, manifest: dict, split: str, columns: list[str], batch_size: int = 64):
    """The split's rows as pyarrow RecordBatches of `columns`, shard after shard, one batch in
    memory at a time; the shards are verified against the manifest first."""
    import pyarrow.parquet as pq

    verify_shards(version, manifest, (split,))
    for path in split_files(version, manifest, split):
        pf = pq.ParquetFile(version.fs.open_input_file(path))
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)


@dataclass(frozen=True)
class RowRange:
    """A read task's function (read_known_files): rows [lo, hi) of a Parquet file of `rows`
    rows, as tables of at most `step` rows of `columns`. A class at module level rather than
    a closure: Ray Data pickles every read task at the start of every pass, and cloudpickle
    copies a closure's code by value but names a module's class (storing a 1024-scan pass's 9
    tasks: 21 ms of the driver with closures, 8 ms with this)."""

    root: Location
    path: str
    rows: int
    lo: int
    hi: int
    step: int
    columns: tuple

    def __call__(self):
        import pyarrow.parquet as pq

        lo, hi = self.lo, self.hi
        with self.root.fs.open_input_file(self.path) as src:
            f = pq.ParquetFile(src)  # pre_buffer (its default): a row group's columns in one read
            if f.metadata.num_rows != self.rows:
                raise StorageError(f"{self.path} holds {f.metadata.num_rows} rows, its record {self.rows}")
            at = 0  # the first row of row group g
            for g in range(f.metadata.num_row_groups):
                n = f.metadata.row_group(g).num_rows
                if at < hi and at + n > lo:
                    # decoded on this thread: a task has one CPU, and Arrow's CPU pool waits
                    # for CPUs the other tasks are decoding on (a task's two row groups, the
                    # other CPU busy: up to 17-49 ms with the pool, at most 2.4-4.9 without)
                    t = f.read_row_group(g, columns=list(self.columns), use_threads=False)
                    t = t.slice(max(lo - at, 0), min(hi, at + n) - max(lo, at))
                    yield from (t.slice(i, self.step) for i in range(0, t.num_rows, self.step))
                at += n


def read_known_files(name: str, root: Location, records: list[dict], columns: list[str],
                     block_bytes: int, *, task_rows: int = 0, limit: int = 0):
    """A Ray Data dataset over Parquet files a verified record already lists (a version's
    manifest): `records` = [{path (under root), rows, bytes (in memory)}], handing on
    `columns` in blocks of about `block_bytes`, streamed a row group at a time. One read task
    a file, or with `task_rows` one a range of that many rows of a file (the row groups it
    overlaps are read), so that the operator after the read, fused into it, runs on every CPU
    however few the files are.
    `limit`: only the first `limit` rows in the records' order (0: all), cut in the reads
    themselves, so no limit operator stands between the read and the next one (Ray Data fuses
    a read with the map after it, and a limit in between split them into two operators whose
    blocks cross the object store). A file whose rows differ from its record raises
    StorageError.

    Ray 2.60's read_parquet costs two things this does not: a listing operator before the
    first batch of every pass (0.9 s here for 5 local files, 4-13 s on a loaded machine), and,
    given few files, splitting each read task's output into ~200 blocks in all
    (read_op_min_num_blocks; 16-row blocks for 5 files) while its executor costs ~25-30 ms of
    one CPU per block whatever its size: override_num_blocks = the number of tasks."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def task(rec: dict, lo: int, hi: int) -> ReadTask:
        """Rows [lo, hi) of the record's file."""
        path, rows = (root / rec["path"]).path, int(rec["rows"])
        step = max(1, int(block_bytes * rows / max(1, int(rec["bytes"]))))  # rows a block
        size = int(rec["bytes"]) * (hi - lo) // max(1, rows)
        return ReadTask(RowRange(root, path, rows, lo, hi, step, tuple(columns)),
                        BlockMetadata(num_rows=hi - lo, size_bytes=size, input_files=[path],
                                      exec_stats=None))

    tasks, left = [], limit or sum(int(r["rows"]) for r in records)
    for rec in records:
        rows = min(int(rec["rows"]), left)
        per = task_rows or rows or 1
        # an empty file still gets its task: it checks that the file holds no rows either
        tasks += [task(rec, lo, min(lo + per, rows)) for lo in range(0, max(rows, 1), per)]
        left -= rows
        if limit and left <= 0:
            break

    class KnownFiles(Datasource):
        def get_name(self) -> str:
            return name

        def estimate_inmemory_data_size(self) -> int:
            return sum(t.metadata.size_bytes for t in tasks)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None) -> list:
            return tasks

    ds = ray.data.read_datasource(KnownFiles(), override_num_blocks=max(1, len(tasks)))
    ds.context.target_max_block_size = block_bytes  # or Ray Data re-slices each block to its default
    return ds


def read_shards(version: Location, manifest: dict, split: str, columns: list[str],
                block_bytes: int = SHARD_BLOCK_BYTES, limit: int = 0):
    """The split's shards (as the manifest lists them) as a Ray Data dataset of `columns`
    (read_known_files): its first `limit` rows (0: all), streamed in blocks of about
    `block_bytes`, a read task every SHARD_TASK_ROWS rows of a file."""
    records = [s for s in manifest["shards"] if s["split"] == split]
    return read_known_files("DatasetShards", version, records, columns, block_bytes,
                            task_rows=SHARD_TASK_ROWS, limit=limit)


def split_arrays(version: Location, manifest: dict, split: str, size: int, limit: int = 0,
                 batch_size: int = 64):
    """The split's first `limit` rows (all with 0), preprocessed with the one rule at `size`:
    (uint8 [B, size, size], int64 labels [B]) a batch at a time. What a process that feeds a
    network itself reads (the decision rule, calibration, the benchmarks' plain loops)."""
    import numpy as np

    from .preprocess import preprocess_many

    seen = 0
    for b in read_split(version, manifest, split, ["image", "label"], batch_size):
        b = b.slice(0, limit - seen) if limit else b
        seen += b.num_rows
        yield (preprocess_many(b.column("image").to_pylist(), size),
               b.column("label").to_numpy().astype(np.int64))
        if limit and seen >= limit:
            return


def split_column(version: Location, manifest: dict, split: str, column: str, limit: int = 0):
    """One column of the split's first `limit` rows (all with 0), in split_arrays' row order,
    as a numpy array; None when the version's shards have no such column (an older ingest)."""
    import numpy as np
    import pyarrow.parquet as pq

    files = split_files(version, manifest, split)
    if files and column not in pq.read_schema(version.fs.open_input_file(files[0])).names:
        return None
    values = [b.column(column).to_numpy(zero_copy_only=False)
              for b in read_split(version, manifest, split, [column])]
    out = np.concatenate(values) if values else np.zeros(0)
    return out[:limit] if limit else out


_VERIFIED: set[tuple] = set()  # (shard uri, recorded sha256, size, mtime) hashed in this process


def verify_shards(version: Location, manifest: dict, splits=SPLITS, chunk: int = 8 << 20,
                  what: str = "dataset") -> int:
    """Check every shard of `splits` against the manifest's recorded size and sha256, streaming
    each file through sha256 in `chunk`-byte reads (never whole in memory). Raises a one-line
    StorageError naming the first shard that is missing or differs; returns the bytes hashed.
    A shard already verified in this process with unchanged size and mtime is not hashed again.
    `what` names the set in messages (the same record serves data.pixels' shards)."""
    import pyarrow.fs as pafs

    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r}; expected one of {SPLITS}")
    hashed = 0
    for shard in manifest["shards"]:
        if shard["split"] not in splits:
            continue
        loc = version / shard["path"]
        where = f"shard {shard['path']} of {what} {version.uri}"
        info = version.fs.get_file_info(loc.path)
        if info.type != pafs.FileType.File:
            raise StorageError(f"{where} is missing")
        if info.size != shard["bytes"]:
            raise StorageError(f"{where} is {info.size} bytes, the manifest records "
                               f"{shard['bytes']}: it was truncated or replaced")
        key = (loc.uri, shard["sha256"], info.size, info.mtime_ns)
        if key in _VERIFIED:
            continue
        sha = hashlib.sha256()
        with version.fs.open_input_stream(loc.path) as f:
            while block := f.read(chunk):
                sha.update(block)
                hashed += len(block)
        if sha.hexdigest() != shard["sha256"]:
            raise StorageError(f"{where} has sha256 {sha.hexdigest()[:16]}..., the manifest records "
                               f"{shard['sha256'][:16]}...: its content changed after it was written")
        _VERIFIED.add(key)
    return hashed
