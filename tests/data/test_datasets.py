"""Dataset versions are checked against their manifest before anything reads them: a shard
whose bytes, size or presence differ from what ingest recorded is refused, naming the shard."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from brainmri.config import IngestConfig, TrainConfig
from brainmri.core.storage import StorageError, open_location
from brainmri.data.datasets import load_manifest, verify_shards
from brainmri.data.ingest import frozen_test_hashes, ingest
from brainmri.training.train import prepare

from support.data import real_subset


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> Path:
    """A version ingested from 8 real scans per class (train, val and test shards)."""
    tmp = tmp_path_factory.mktemp("verify")
    src = real_subset(tmp / "src", per_class=8)
    res = ingest(str(src), str(tmp / "lake"),
                 IngestConfig(val_fraction=0.25, test_fraction=0.25, workers=1))
    return Path(res.location.path)


def _copy(version: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy" / version.name
    shutil.copytree(version, dest)
    return dest


def _flip(path: Path, offset: int, n: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _train_shard(v: Path) -> tuple[str, Path]:
    man = load_manifest(open_location(str(v)))
    rel = next(s["path"] for s in man["shards"] if s["split"] == "train")
    return rel, v / rel


def _flip_image_bytes(v: Path) -> str:
    rel, shard = _train_shard(v)
    jpeg = pq.read_table(shard, columns=["image"]).column("image")[0].as_py()
    at = shard.read_bytes().find(jpeg)  # the image column is stored uncompressed
    assert at > 0
    _flip(shard, at + len(jpeg) // 2, 64)
    # silent to the reader: the shard still decodes, one image is just wrong
    assert pq.read_table(shard, columns=["image"]).column("image")[0].as_py() != jpeg
    return rel


def _flip_label_bytes(v: Path) -> str:
    rel, shard = _train_shard(v)
    md = pq.ParquetFile(shard).metadata
    col = md.row_group(0).column(md.schema.names.index("label"))
    start = col.dictionary_page_offset or col.data_page_offset
    _flip(shard, start + col.total_compressed_size - 8, 4)
    return rel


def _swap_in_test_shard(v: Path) -> str:
    man = load_manifest(open_location(str(v)))
    rel, shard = _train_shard(v)
    test = next(s for s in man["shards"] if s["split"] == "test")
    train = next(s for s in man["shards"] if s["path"] == rel)
    assert test["rows"] != train["rows"]
    shutil.copyfile(v / test["path"], shard)
    return rel


def _truncate(v: Path) -> str:
    rel, shard = _train_shard(v)
    shard.write_bytes(shard.read_bytes()[:-100])
    return rel


def _delete(v: Path) -> str:
    rel, shard = _train_shard(v)
    shard.unlink()
    return rel


@pytest.mark.parametrize("tamper, what", [
    (_flip_image_bytes, "sha256"), (_flip_label_bytes, "sha256"),
    (_swap_in_test_shard, "bytes"), (_truncate, "bytes"), (_delete, "missing")])
def test_tampered_shard_is_refused_before_training(version, tmp_path, tamper, what):
    v = _copy(version, tmp_path)
    rel = tamper(v)
    loc = open_location(str(v))
    with pytest.raises(StorageError, match=f"shard {rel} of dataset .*{what}") as e:
        verify_shards(loc, load_manifest(loc))
    assert "\n" not in str(e.value)
    with pytest.raises(StorageError, match=f"shard {rel} "):  # the driver's entry point
        prepare(TrainConfig(data=str(v), out=str(tmp_path / "out"), num_workers=1, batch_size=4))
    verify_shards(loc, load_manifest(loc), ("test",))  # other splits are not concerned


def test_untampered_copy_passes_and_tampered_test_split_is_refused(version, tmp_path):
    v = _copy(version, tmp_path)
    loc = open_location(str(v))
    man = load_manifest(loc)
    assert verify_shards(loc, man) == sum(s["bytes"] for s in man["shards"])
    assert len(frozen_test_hashes(str(v))) == man["rows"]["test"]
    rel = next(s["path"] for s in man["shards"] if s["split"] == "test")
    _flip(v / rel, 200, 64)
    with pytest.raises(StorageError, match=f"shard {rel} of dataset .*sha256"):
        frozen_test_hashes(str(v))


def test_shards_carry_parquet_page_checksums(version, tmp_path):
    """A reader that asks for page checksum verification catches a flipped image by itself."""
    v = _copy(version, tmp_path)
    _, shard = _train_shard(v)
    pq.read_table(shard, page_checksum_verification=True)  # intact: reads
    _flip_image_bytes(v)
    with pytest.raises(OSError, match="(?i)checksum"):
        pq.read_table(shard, columns=["image"], page_checksum_verification=True)


@pytest.mark.parametrize("limit", [0, 5, 6, 7, 100])
def test_split_arrays_are_the_rule_on_the_rows_in_order_up_to_the_limit(version, limit):
    """The one reader of preprocessed rows a process feeds a network itself: batches of 3 cut
    at the limit (across a batch boundary, on one, past the end), rows in shard order."""
    import numpy as np

    from brainmri.data.datasets import read_split, split_arrays, split_column
    from brainmri.data.preprocess import preprocess

    loc = open_location(str(version))
    manifest = load_manifest(loc)
    rows = [(img, lab) for b in read_split(loc, manifest, "train", ["image", "label"])
            for img, lab in zip(b.column("image").to_pylist(), b.column("label").to_pylist(), strict=True)]
    assert len(rows) > 7  # 5 and 7 cut a batch of 3, 6 ends on one, 100 is past the end
    want = rows[:limit] if limit else rows
    got = list(split_arrays(loc, manifest, "train", 32, limit, batch_size=3))
    assert all(len(x) <= 3 and x.dtype == np.uint8 and y.dtype == np.int64 for x, y in got)
    x, y = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    assert y.tolist() == [lab for _, lab in want]
    assert np.array_equal(x, np.stack([preprocess(img, 32) for img, _ in want]))
    # any other column of the same rows, in the same order (the decision check's groups)
    assert split_column(loc, manifest, "train", "label", limit).tolist() == y.tolist()
    groups = split_column(loc, manifest, "train", "group", limit)
    assert len(groups) == len(y) and all(isinstance(g, str) and g for g in groups)
    assert split_column(loc, manifest, "train", "no_such_column", limit) is None


def test_ray_reads_each_listed_shard_in_blocks_of_its_rows_and_refuses_a_short_one(version, tmp_path,
                                                                                    ray_local):
    """datasets.read_shards (the decoding feed's reader): every row of the split once, in
    blocks of about block_bytes cut from each file (not Ray Data's ~200 slivers, not a whole
    file), nothing listed; a shard holding other rows than its record says fails the read in
    one line naming the file."""
    from brainmri.data.datasets import read_shards, read_split

    loc = open_location(str(version))
    manifest = load_manifest(loc)
    [shard] = [s for s in manifest["shards"] if s["split"] == "train"]
    per_row = shard["bytes"] / shard["rows"]
    ds = read_shards(loc, manifest, "train", ["image", "label"], block_bytes=int(3 * per_row))
    blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    # pieces of at most 3 rows (the file's row groups may cut them shorter), merged by Ray
    # Data up to about block_bytes: many small blocks, none a whole file
    sizes = [b.num_rows for b in blocks]
    assert len(blocks) >= shard["rows"] // 6 and max(sizes) <= 6, sizes
    assert blocks[0].column_names == ["image", "label"]
    want = [r for b in read_split(loc, manifest, "train", ["image", "label"]) for r in b.to_pylist()]
    assert [r for b in blocks for r in b.to_pylist()] == want  # every row once, in file order
    short = dict(manifest, shards=[{**s, "rows": s["rows"] + 1} if s is shard else s
                                   for s in manifest["shards"]])
    with pytest.raises(Exception, match=f"{shard['path']} holds {shard['rows']} rows, its record"):
        read_shards(loc, short, "train", ["label"], block_bytes=1 << 20).materialize()


def test_reads_cut_at_a_limit_in_row_ranges_and_the_decode_fuses_into_them(version, tmp_path, ray_local):
    """read_known_files with task_rows: a read task a range of rows of a file (the range's
    row groups read, sliced to it), so the operator fused after it runs on every CPU; with
    a limit, only the first rows in file order are read, so no limit operator sits between
    the read and the decode, and Ray Data fuses them (the encoded bytes never cross the
    object store)."""
    from brainmri.data.datasets import read_known_files, read_split
    from brainmri.training.train import build_datasets

    loc = open_location(str(version))
    manifest = load_manifest(loc)
    records = [s for s in manifest["shards"] if s["split"] == "train"]
    want = [r for b in read_split(loc, manifest, "train", ["image", "label"]) for r in b.to_pylist()]
    assert len(want) > 13
    for task_rows, limit in ((5, 13), (5, 0), (0, 7), (64, 0)):
        ds = read_known_files("Rows", loc, records, ["image", "label"], 1 << 20, task_rows=task_rows,
                              limit=limit)
        ds.context.execution_options.preserve_order = True
        got = [r for b in ds.iter_batches(batch_size=None, batch_format="pyarrow") for r in b.to_pylist()]
        assert got == want[:limit or len(want)], (task_rows, limit)  # each row once, in file order
        tasks = -(-(limit or len(want)) // task_rows) if task_rows else 1
        assert ds.stats().count("tasks executed") == 1 and f"{tasks} tasks executed" in ds.stats()

    # a read task's function is a module's class: pickled by name (Ray Data pickles every task
    # at every pass; a closure's code went by value), and the copy reads the same rows
    import ray.cloudpickle

    from brainmri.data.datasets import RowRange

    rr = RowRange(loc, (loc / records[0]["path"]).path, int(records[0]["rows"]), 2, 9, 4, ("label",))
    blob = ray.cloudpickle.dumps(rr)
    assert b"co_code" not in blob and b"brainmri.data.datasets" in blob and b"RowRange" in blob
    copy = ray.cloudpickle.loads(blob)
    assert [t.to_pylist() for t in copy()] == [t.to_pylist() for t in rr()]
    assert [t.num_rows for t in rr()] == [4, 3]
    assert [r["label"] for t in rr() for r in t.to_pylist()] == [r["label"] for r in want[2:9]]

    # an empty file is still read, so a record that says 0 rows of a file that holds some fails
    empty = [{**records[0], "rows": 0}]
    said = f"{records[0]['path']} holds {records[0]['rows']} rows, its record 0"
    with pytest.raises(Exception, match=said):
        read_known_files("Rows", loc, empty, ["label"], 1 << 20, task_rows=5).materialize()

    cfg = TrainConfig(data=str(version), out=str(tmp_path), image_size=32, limit_train=9, limit_val=3)
    feed = build_datasets(cfg, loc, manifest)
    assert feed["train"].count() == 9 and feed["val"].count() == 3
    list(feed["train"].iter_batches(batch_size=None))
    assert "ReadDatasetShards->MapBatches(decode_pixels)" in feed["train"].stats()  # one fused operator
    assert not feed["train"].context.op_resource_reservation_enabled
