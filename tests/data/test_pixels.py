"""Pixel shards (data.pixels): a version's splits preprocessed once, stored beside it, verified
when read, and fed to training exactly as the decoding feed would have fed it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brainmri.config import IngestConfig, TrainConfig
from brainmri.core.storage import StorageError
from brainmri.data import pixels as P
from brainmri.data.datasets import read_split, resolve_dataset
from brainmri.data.ingest import ingest
from brainmri.data.preprocess import preprocess_many
from brainmri.training.train import BlockBatches, build_datasets

from support.data import real_subset

SIZE = 48


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pixels")
    src = real_subset(tmp / "src", per_class=12)
    ingest(str(src), str(tmp / "lake"), IngestConfig(val_fraction=0.25, test_fraction=0.1, workers=1))
    return tmp / "lake"


def _source(version, manifest, split):
    blobs, labels = [], []
    for b in read_split(version, manifest, split, ["image", "label"]):
        blobs += b.column("image").to_pylist()
        labels += b.column("label").to_pylist()
    return preprocess_many(blobs, SIZE), np.asarray(labels)


def _rows(x, y) -> list[tuple[int, bytes]]:
    return [(int(label), img.tobytes()) for img, label in zip(x, y, strict=True)]


def _feed(version, manifest, pixels, split):
    """The rows as a training worker gets them (train.BlockBatches over the dataset)."""
    cfg = TrainConfig(data=str(version.uri), image_size=SIZE, cache=False)
    xs, ys = [], []
    reader = P.PixelReader(pixels[0].uri, SIZE) if pixels else None
    feed = BlockBatches(build_datasets(cfg, version, manifest, pixels)[split], SIZE, reader)
    for b in feed.iter_torch_batches(batch_size=7):
        xs.append(b["x"].numpy())
        ys.append(b["label"].numpy())
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("task_rows", [3, 12], ids=["tasks-under-a-file", "tasks-over-a-file"])
def test_pixel_feed_is_the_decoding_feed_row_for_row(lake, ray_local, monkeypatch, task_rows):
    """Several shard files a split (uneven last one), every row once, in the source order,
    bit-identical to the preprocessing rule; the manifest lands last and names every file.
    Read (and decode) tasks of fewer rows than a file (joined across tasks) and of more
    (cut within one)."""
    import brainmri.data.datasets as D

    monkeypatch.setattr(P, "SHARD_BYTES", 5 * SIZE * SIZE)  # 5 rows a file
    monkeypatch.setattr(D, "SHARD_TASK_ROWS", task_rows)
    version, manifest = resolve_dataset(str(lake), "brain-tumor-mri")
    pix = P.build_pixels(version, manifest, SIZE)
    root = P.pixels_root(version, SIZE)
    assert (root / P.PIXELS_MANIFEST).read_json() == pix and pix["image_size"] == SIZE
    for split in ("train", "val"):
        n = manifest["rows"][split]
        shards = [s for s in pix["shards"] if s["split"] == split]
        # files of exactly 5 rows, the split's last fewer, whatever the decode tasks' blocks
        # (a task's rows, a source file's remainder) are
        assert sum(s["rows"] for s in shards) == n and len(shards) == -(-n // 5)
        assert [s["rows"] for s in shards[:-1]] == [5] * (len(shards) - 1) and 1 <= shards[-1]["rows"] <= 5
        x, y = _feed(version, manifest, (root, pix), split)
        ref_x, ref_y = _source(version, manifest, split)
        assert x.dtype == np.uint8 and x.shape == (n, SIZE, SIZE)
        # the feed's order is Ray Data's (training shuffles anyway): the same rows, as a set
        assert sorted(_rows(x, y)) == sorted(_rows(ref_x, ref_y))
        # the decoding feed (cached runs, a first epoch) hands over the very same rows
        dx, dy = _feed(version, manifest, None, split)
        assert dx.dtype == np.uint8 and sorted(_rows(dx, dy)) == sorted(_rows(ref_x, ref_y))
        # the shards themselves, read in the manifest's order, are the source's order
        stored = pa.concat_tables([pq.read_table(p, filesystem=root.fs)
                                   for p in P.pixel_files(root, pix, split)])
        got = P.from_pixels(stored, SIZE)
        assert np.array_equal(got["x"], ref_x) and np.array_equal(got["label"], ref_y)
    # nothing else under the attempt: every written file is listed, and only those
    attempt = pix["shards"][0]["path"].split("/")[0]
    listed = {s["path"] for s in pix["shards"]}
    on_disk = {f"{attempt}/{f.path[len((root / attempt).path) + 1:]}" for f in (root / attempt).files()}
    assert listed == on_disk
    # a second call reuses (and verifies) them: no new attempt
    again = P.ensure_pixels(version, manifest, SIZE)[1]
    assert again["shards"] == pix["shards"]


def test_ray_data_deals_references_and_the_rank_reads_the_rows(lake, ray_local, monkeypatch):
    """The pixel feed's blocks hold references, one block a shard file (the bytes never cross
    Ray's object store); PixelReader reads what a block names, in the block's order, whatever
    slice, mix of files or order Ray Data's split hands a rank, and refuses a file that does
    not hold its recorded rows."""
    import pyarrow.compute as pc

    monkeypatch.setattr(P, "SHARD_BYTES", 5 * SIZE * SIZE)  # 5 rows a file
    version, manifest = resolve_dataset(str(lake), "brain-tumor-mri")
    pix = P.build_pixels(version, manifest, SIZE)
    root = P.pixels_root(version, SIZE)
    shards = [s for s in pix["shards"] if s["split"] == "train"]
    blocks = list(P.read_pixels(root, pix, "train").iter_batches(batch_size=None, batch_format="pyarrow"))
    assert [b.num_rows for b in blocks] == [s["rows"] for s in shards] and len(shards) >= 3
    assert set(blocks[0].column_names) == {"path", "rows", "row"}  # no pixels
    cut = P.read_pixels(root, pix, "train", limit=7).iter_batches(batch_size=None, batch_format="pyarrow")
    assert sum(b.num_rows for b in cut) == 7

    def stored(i):  # shard i as written
        return P.from_pixels(pq.read_table((root / shards[i]["path"]).path, filesystem=root.fs), SIZE)

    reader = P.PixelReader(root.uri, SIZE)
    a, b = blocks[0], blocks[1]
    mixed = pa.concat_tables([a.slice(3, 2), b.take([4, 0, 2])])  # a run of one file, a gather of another
    got = reader.rows(mixed)
    want_x = np.concatenate([stored(0)["x"][3:5], stored(1)["x"][[4, 0, 2]]])
    want_y = np.concatenate([stored(0)["label"][3:5], stored(1)["label"][[4, 0, 2]]])
    assert np.array_equal(got["x"], want_x) and np.array_equal(got["label"], want_y)
    assert reader.rows(a.slice(0, 0))["x"].shape == (0, SIZE, SIZE)
    # rows_of reads a block ahead on its thread: the same rows, the blocks' order
    ahead = list(reader.rows_of(iter(blocks)))
    assert [len(r["x"]) for r in ahead] == [s["rows"] for s in shards]
    assert all(np.array_equal(r["x"], stored(i)["x"]) for i, r in enumerate(ahead))
    assert reader._file == (None, None)  # no file held between epochs
    # a record that does not match its file: one line naming the file, from the thread too
    wrong = a.set_column(1, "rows", pc.add(a.column("rows"), 1))
    name = shards[0]["path"]
    with pytest.raises(StorageError, match=rf"{name} holds {shards[0]['rows']} rows, its record"):
        P.PixelReader(root.uri, SIZE).rows(wrong)
    with pytest.raises(StorageError, match="its record"):
        list(P.PixelReader(root.uri, SIZE).rows_of(iter([b, wrong])))
    gone = a.set_column(0, "path", pa.array(["gone/part-x.parquet"] * a.num_rows))
    with pytest.raises(StorageError, match=r"pixel shard .*gone/part-x.parquet could not be read: "):
        P.PixelReader(root.uri, SIZE).rows(gone)


def test_another_size_or_dataset_version_is_another_set(lake, ray_local):
    version, manifest = resolve_dataset(str(lake), "brain-tumor-mri")
    P.ensure_pixels(version, manifest, SIZE)
    assert P.pixels_root(version, SIZE).uri != P.pixels_root(version, SIZE + 16).uri
    assert P.load_pixels(version, manifest, SIZE + 16) is None
    changed = {**manifest, "version": "something-else"}
    assert P.load_pixels(version, changed, SIZE) is None  # stale for another manifest: never reused
    assert P.load_pixels(version, manifest, SIZE, ("train", "val", "test")) is None  # test not built


def test_damaged_pixel_shard_is_refused_then_rebuilt(lake, ray_local, tmp_path):
    import shutil

    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    version, manifest = resolve_dataset(str(copy), "brain-tumor-mri")
    root, pix = P.ensure_pixels(version, manifest, SIZE)
    shard = Path(root.path) / pix["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"pixel.*sha256|sha256.*manifest records"):
        P.load_pixels(version, manifest, SIZE)
    lines = []
    root2, pix2 = P.ensure_pixels(version, manifest, SIZE, log=lines.append)
    assert "fail verification" in lines[0] and "preprocessed" in lines[1]
    assert pix2["shards"][0]["path"] != pix["shards"][0]["path"]  # a new attempt, verified
    assert P.load_pixels(version, manifest, SIZE) == pix2


def test_a_build_that_loses_rows_records_nothing(lake, ray_local, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    version, manifest = resolve_dataset(str(copy), "brain-tumor-mri")
    shutil.rmtree(Path(version.path) / "pixels", ignore_errors=True)  # whatever other tests built
    real = P._write_part

    def drops_one(table, **kw):  # a writer that loses a row
        return real(table.slice(1), **kw)

    monkeypatch.setattr(P, "_write_part", drops_one)
    with pytest.raises(StorageError, match="pixel shards of train hold .* rows, dataset .* has"):
        P.build_pixels(version, manifest, SIZE)
    assert not (P.pixels_root(version, SIZE) / P.PIXELS_MANIFEST).exists()


def test_manifest_records_the_rule(lake, ray_local):
    version, manifest = resolve_dataset(str(lake), "brain-tumor-mri")
    root, pix = P.ensure_pixels(version, manifest, SIZE)
    stored = json.loads(Path(root.path, P.PIXELS_MANIFEST).read_text())
    assert stored["preprocess"] == P.PREPROCESS_ID and stored["rule_key"] == P.rule_key(SIZE)
    assert stored["dataset_version"] == manifest["version"] and root.name.startswith(f"{SIZE}px-")


def test_from_pixels_reads_sliced_and_chunked_columns():
    """Ray hands the feed sliced blocks (limits, 4 MiB block splits) and multi-chunk columns:
    the rows come out whole and in order either way."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (9, 6, 6), dtype=np.uint8)
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(36), 9, [None, pa.py_buffer(x)])
    t = pa.table({"x": col, "label": pa.array(np.arange(9, dtype=np.int64))})
    got = P.from_pixels(t.slice(3, 4), 6)
    assert np.array_equal(got["x"], x[3:7]) and got["label"].tolist() == [3, 4, 5, 6]
    chunked = pa.concat_tables([t.slice(0, 2), t.slice(5, 3)])
    got = P.from_pixels(chunked, 6)
    assert np.array_equal(got["x"], np.concatenate([x[0:2], x[5:8]]))
    assert P.from_pixels(t.slice(0, 0), 6)["x"].shape == (0, 6, 6)
    with pytest.raises(StorageError, match="not 5x5 images"):
        P.from_pixels(t, 5)


def test_unreadable_manifest_is_rebuilt_and_dead_attempts_are_tidied(lake, ray_local, tmp_path):
    import shutil

    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    version, manifest = resolve_dataset(str(copy), "brain-tumor-mri")
    root, pix = P.ensure_pixels(version, manifest, SIZE)
    base = Path(root.path)
    (base / P.PIXELS_MANIFEST).write_text('{"shards": [')  # torn
    old = base / "20200101-000000-deadbeef" / "train"  # a build that died years ago
    young = base / (time.strftime(P.ATTEMPT_TIME, time.gmtime()) + "-0000beef") / "train"  # running
    for d in (old, young):
        d.mkdir(parents=True)
        (d / "part-x.parquet").write_bytes(b"partial")
    lines = []
    _, pix2 = P.ensure_pixels(version, manifest, SIZE, log=lines.append)
    assert "not readable JSON" in lines[0] and "building them again" in lines[0]
    assert P.load_pixels(version, manifest, SIZE) == pix2
    assert not old.parent.exists() and young.exists()  # dead attempt gone, a running one kept


def test_a_second_builder_waits_for_the_first_and_reuses_its_build(lake, ray_local, tmp_path):
    import shutil
    import threading

    from brainmri.core.lock import Lease

    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    version, manifest = resolve_dataset(str(copy), "brain-tumor-mri")
    shutil.rmtree(Path(version.path) / "pixels", ignore_errors=True)
    root = P.pixels_root(version, SIZE)
    first = Lease(root / P.LEASE, 60, "the first builder").acquire()
    out, lines = {}, []
    waiter = threading.Thread(target=lambda: out.update(
        got=P.ensure_pixels(version, manifest, SIZE, log=lines.append)[1]))
    waiter.start()
    time.sleep(3)
    assert waiter.is_alive()  # waiting on the lease, building nothing
    built = P.build_pixels(version, manifest, SIZE)
    first.release()
    waiter.join(timeout=120)
    assert out["got"] == built and lines == []  # reused, not built again
    attempts = {s["path"].split("/")[0] for s in built["shards"]}
    names = {p.name for p in Path(root.path).iterdir() if not p.name.startswith(P.LEASE)}
    assert names == {*attempts, P.PIXELS_MANIFEST}  # one build


def test_both_feeds_hand_the_workers_the_pixels_of_preprocess():
    """The decoding feed's map function and the worker's batches (train.BlockBatches): the
    same uint8 pixels and int64 labels as `preprocess_batch`, a batch reading its block's own
    buffer (no copy of an unsliced single-chunk block) whatever slice or chunking Ray hands it."""
    import io

    import torch
    from PIL import Image

    from brainmri.data.preprocess import preprocess_batch

    class Blocks:  # a DataIterator's blocks, as Ray Data hands them over
        def __init__(self, *tables):
            self.tables = tables

        def iter_batches(self, batch_size, batch_format, **kw):
            assert batch_size is None and batch_format == "pyarrow"
            return iter(self.tables)

    def batches(*tables):
        return list(BlockBatches(Blocks(*tables), SIZE).iter_torch_batches(batch_size=5))

    rng = np.random.default_rng(1)
    blobs = []
    for shape in ((40, 30), (25, 50), (33, 33), (60, 20), (20, 20)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    batch = {"image": np.array(blobs, dtype=object), "label": np.array([3, 0, 2, 1, 0])}
    ref = preprocess_batch(batch, SIZE)
    t = P.decode_pixels(batch, SIZE)
    assert t.schema.field("x").type == pa.binary(SIZE * SIZE)
    [got] = batches(t)
    assert got["x"].dtype == torch.uint8 and got["label"].dtype == torch.int64
    assert np.array_equal(got["x"].numpy(), ref["x"]) and got["label"].tolist() == [3, 0, 2, 1, 0]
    assert got["x"].data_ptr() == t.column("x").chunk(0).buffers()[1].address  # a view, not a copy
    [part] = batches(pa.concat_tables([t.slice(1, 2), t.slice(4, 1)]))
    assert np.array_equal(part["x"].numpy(), ref["x"][[1, 2, 4]]) and part["label"].tolist() == [0, 2, 0]
    empty = P.decode_pixels({"image": np.array([], dtype=object), "label": np.array([], np.int64)}, SIZE)
    assert empty.num_rows == 0 and batches(empty) == []


def test_shards_are_written_with_the_measured_compression(lake, ray_local):
    version, manifest = resolve_dataset(str(lake), "brain-tumor-mri")
    root, pix = P.ensure_pixels(version, manifest, SIZE)
    meta = pq.ParquetFile(P.pixel_files(root, pix, "train")[0], filesystem=root.fs).metadata
    codec = meta.row_group(0).column(0).compression
    assert codec.lower() == {"none": "uncompressed"}.get(P.COMPRESSION, P.COMPRESSION)
