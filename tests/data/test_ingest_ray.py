"""`brainmri ingest` on Ray (data/ingest_ray.py): the same version, inventory and shard bytes
as the local engine, an s3:// SOURCE read in place (moto server on loopback, no local
mirror), unreadable and DICOM files, and `brainmri retrain --incoming s3://...`."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from brainmri.config import ConfigError, IngestConfig
from brainmri.core.storage import open_location
from brainmri.data import images as im
from brainmri.data.ingest import UnusableSourceError, ingest, pick_engine
from brainmri.data.ingest_ray import DicomOnRay, inspect_batch
from brainmri.data.ingest_rules import plan_shards
from brainmri.data.walk import FileRecord, walk_location, walk_source

from support.data import real_subset
from support.synth import bad_files, synth_array, synth_jpeg

# the Ray engine's tests take seconds once the shared cluster is up: in the fast loop
pytestmark = pytest.mark.quick
CFG = dict(val_fraction=0.2, workers=1)
BAD = {k: v for k, v in bad_files().items() if k in ("truncated.jpg", "not_an_image.jpg", "empty.jpg")}


def small_tree(root: Path) -> Path:
    """20 real scans (5 a class), one synthetic Testing scan a class, three bad files, an
    exact duplicate, a hidden file and a file outside the class folders."""
    src = real_subset(root, per_class=5)
    for k, c in enumerate(sorted(p.name for p in (src / "Training").iterdir())):
        (src / "Testing" / c).mkdir(parents=True)
        (src / "Testing" / c / f"t{k}.jpg").write_bytes(synth_jpeg(500 + k))
    glioma = src / "Training" / "glioma"
    for name, (data, _) in BAD.items():
        (glioma / name).write_bytes(data)
    first = sorted(glioma.iterdir())[0]
    (glioma / "zz_copy.jpg").write_bytes(first.read_bytes())
    (src / "Training" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (src / "Training" / "other").mkdir()
    (src / "Training" / "other" / "x.jpg").write_bytes(synth_jpeg(600))
    return src


def upload(src: Path, bucket: str, prefix: str, endpoint: str) -> str:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for p in sorted(src.rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(src).as_posix()}",
                          Body=p.read_bytes())
    return f"s3://{bucket}/{prefix}"


def _rows(res) -> list[dict]:
    out = []
    for s in res.manifest["shards"]:
        out += pq.read_table((res.location / s["path"]).path, filesystem=res.location.fs).to_pylist()
    return out


def _same_version(a, b):
    """Two ingests of one content: one version id, inventory, rejects, shards and rows."""
    assert a.version == b.version
    for f in ("inventory.csv", "rejects.csv"):
        assert (a.location / f).read_bytes() == (b.location / f).read_bytes(), f
    assert a.manifest["shards"] == b.manifest["shards"]  # names, rows, bytes and sha256
    assert _rows(a) == _rows(b)
    run = ("created_at", "created_unix", "ingest", "source")
    assert {k: v for k, v in a.manifest.items() if k not in run} == {
        k: v for k, v in b.manifest.items() if k not in run}


def _inventory(res) -> dict[str, dict]:
    import csv
    import io

    return {r["path"]: r for r in csv.DictReader(io.StringIO(
        (res.location / "inventory.csv").read_bytes().decode()))}


def _check_accounting(res):
    inv = _inventory(res)
    assert len(inv) == res.manifest["files"]["seen"] == 20 + 4 + len(BAD) + 3
    for name, (_, reason) in BAD.items():
        r = inv[f"Training/glioma/{name}"]
        assert (r["status"], r["reason"]) == ("rejected", reason)
    copy = inv["Training/glioma/zz_copy.jpg"]
    assert copy["status"] == "duplicate" and copy["duplicate_of"].startswith("Training/glioma/")
    assert inv["Training/.DS_Store"]["reason"] == im.HIDDEN
    assert inv["Training/other/x.jpg"]["reason"] == im.UNKNOWN_CLASS
    assert res.manifest["files"]["accepted"] == 24


# -- no cluster ----------------------------------------------------------------------------------
def test_engine_choice_and_settings():
    cfg = IngestConfig()
    assert (cfg.engine, cfg.ray_min_files) == ("auto", 50_000)
    assert pick_engine(cfg, remote=True, n_files=10) == "ray"
    assert pick_engine(cfg, remote=False, n_files=50_000) == "local"
    assert pick_engine(cfg, remote=False, n_files=50_001) == "ray"
    assert pick_engine(IngestConfig(engine="ray"), remote=False, n_files=1) == "ray"
    with pytest.raises(ConfigError, match="engine must be one of"):
        IngestConfig(engine="spark").validate()
    with pytest.raises(ConfigError, match="local engine reads local folders"):
        ingest("s3://bucket/x", "/tmp/never", IngestConfig(engine="local"))


def test_plan_shards_cuts_by_image_bytes_in_shuffled_order():
    def rec(k, n):
        return FileRecord(path=f"p{k}", info=im.ImageInfo("", 0, 1, 1, "L", "JPEG", n, b"", 0))

    rows = [rec(k, 400 * 1024) for k in range(7)]
    chunks = plan_shards(rows, IngestConfig(shard_mb=1), seed=3)
    assert [len(c) for c in chunks] == [3, 3, 1]  # 1.2 MB >= 1 MB closes a shard
    assert sorted(r.path for c in chunks for r in c) == sorted(r.path for r in rows)
    assert [r.path for c in chunks for r in c] != [r.path for r in rows]  # shuffled, by seed
    assert plan_shards(rows, IngestConfig(shard_mb=1), seed=3) == chunks


def test_s3_listing_matches_the_local_walk(tmp_path, s3_bucket, s3_server):
    src = small_tree(tmp_path / "src")
    uri = upload(src, s3_bucket, "in", s3_server)
    local = walk_source(str(src), IngestConfig().classes)
    remote = walk_location(open_location(uri), IngestConfig().classes)
    assert remote == local  # paths, order, placement and walk-time rejections


def test_unreadable_file_becomes_a_rejected_row(s3_bucket, s3_server):
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="in/a.jpg",
                                                          Body=synth_jpeg(1))
    out = inspect_batch({"i": np.array([0, 1]), "path": np.array(["a.jpg", "gone.jpg"], dtype=object),
                         "magic_only": np.array([False, False])},
                        f"s3://{s3_bucket}/in", im.ImageLimits())
    assert list(out["i"]) == [0, 1]
    assert out["reason"][0] == "" and len(out["sha256"][0]) == 64 and len(out["thumb"][0]) == 32 * 32
    assert out["reason"][1] == im.UNREADABLE and out["detail"][1]


# -- on the shared local Ray cluster ---------------------------------------------------------------
def test_local_and_ray_engines_make_the_same_version(tmp_path, ray_local):
    src = small_tree(tmp_path / "src")
    a = ingest(str(src), str(tmp_path / "lake-local"), IngestConfig(engine="local", **CFG))
    b = ingest(str(src), str(tmp_path / "lake-ray"), IngestConfig(engine="ray", **CFG))
    assert a.created and b.created
    _same_version(a, b)
    _check_accounting(b)


def test_s3_source_is_read_in_place(tmp_path, s3_bucket, s3_server, ray_local, monkeypatch):
    """auto picks ray for s3://; nothing is mirrored (copy_files would be the mirror); the
    version is the local engine's for the same content, written to S3."""
    src = small_tree(tmp_path / "src")
    uri = upload(src, s3_bucket, "incoming", s3_server)

    def no_mirror(*a, **k):
        raise AssertionError("SOURCE was copied")

    monkeypatch.setattr(pafs, "copy_files", no_mirror)
    res = ingest(uri, f"s3://{s3_bucket}/lake", IngestConfig(**CFG))
    assert res.created and res.location.is_s3 and res.manifest["source"] == uri
    _check_accounting(res)
    local = ingest(str(src), str(tmp_path / "lake"), IngestConfig(engine="local", **CFG))
    _same_version(local, res)
    again = ingest(uri, f"s3://{s3_bucket}/lake", IngestConfig(**CFG))
    assert (again.version, again.created) == (res.version, False)


def test_empty_class_and_empty_split_like_the_local_engine(tmp_path, ray_local):
    src = real_subset(tmp_path / "src", per_class=3)
    shutil.rmtree(src / "Training" / "meningioma")
    (src / "Training" / "meningioma").mkdir()  # an empty class folder
    rng = np.random.default_rng(0)
    for k in range(12):  # ~360 KB of noise each: several 1 MB shards, cut alike by both engines
        noise = Image.fromarray(rng.integers(0, 256, (600, 600), dtype=np.uint8))
        noise.save(src / "Training" / ("glioma", "notumor", "pituitary")[k % 3] / f"noise{k}.png")
    cfg = dict(val_fraction=0.0, test_fraction=0.3, workers=1, shard_mb=1)  # no val rows at all
    a = ingest(str(src), str(tmp_path / "a"), IngestConfig(engine="local", **cfg))
    b = ingest(str(src), str(tmp_path / "b"), IngestConfig(engine="ray", **cfg))
    _same_version(a, b)
    assert b.manifest["rows"]["val"] == 0 and b.manifest["counts"]["train"]["meningioma"] == 0
    assert not [s for s in b.manifest["shards"] if s["split"] == "val"]
    assert len([s for s in b.manifest["shards"] if s["split"] == "train"]) > 1
    # nothing accepted: refused alike, inventories alike
    bad = tmp_path / "bad"
    (bad / "Training" / "glioma").mkdir(parents=True)
    (bad / "Training" / "glioma" / "t.jpg").write_bytes(BAD["truncated.jpg"][0])
    errs = []
    for engine in ("local", "ray"):
        with pytest.raises(UnusableSourceError, match="no image was accepted") as e:
            ingest(str(bad), str(tmp_path / f"bad-{engine}"), IngestConfig(engine=engine, **cfg))
        errs.append(str(e.value).split("; nothing")[0])
    assert errs[0] == errs[1]


def test_ray_engine_refuses_dicom_in_one_line(tmp_path, ray_local, capsys):
    from brainmri.cli import main

    from support.dicom import make_dicom

    src = real_subset(tmp_path / "src", per_class=2)
    (src / "Training" / "glioma" / "IM0001").write_bytes(make_dicom([synth_array(7)]))
    with pytest.raises(DicomOnRay, match="holds 1 DICOM files.*--engine local") as e:
        ingest(str(src), str(tmp_path / "lake"), IngestConfig(engine="ray", workers=1))
    assert "\n" not in str(e.value) and "IM0001" not in str(e.value)
    assert not (tmp_path / "lake" / "datasets").exists()
    # the CLI: --engine is a flag, the refusal one error line, exit 2 (Ray Data's INFO lines
    # reach stderr here only because the fixture's ray.init skips init_ray's console filters)
    assert main(["ingest", str(src), str(tmp_path / "lake"), "--engine", "ray"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("brainmri ingest")]
    assert len(err) == 1 and err[0].startswith("brainmri ingest: error: ") and "--engine local" in err[0]


def test_retrain_reads_s3_incoming_in_place(tmp_path, s3_bucket, s3_server, ray_local, monkeypatch):
    """`retrain --incoming s3://...` ingests the prefix itself (stopped after the ingest: the
    training that follows is the same as for a local folder, see test_retrain)."""
    from brainmri.ops.retrain import RetrainConfig, retrain

    src = real_subset(tmp_path / "src", per_class=4)
    uri = upload(src, s3_bucket, "incoming", s3_server)

    def no_mirror(*a, **k):
        raise AssertionError("incoming was copied")

    monkeypatch.setattr(pafs, "copy_files", no_mirror)

    class Stop(Exception):
        pass

    def hook(stage):
        if stage == "ingested":
            raise Stop

    store = tmp_path / "store"
    with pytest.raises(Stop):
        retrain(RetrainConfig(store=str(store), incoming=uri), hooks=hook)
    (version,) = (store / "datasets" / "brain-tumor-mri").iterdir()
    m = open_location(str(version / "manifest.json")).read_json()
    assert m["source"] == uri and m["files"]["accepted"] == 16
