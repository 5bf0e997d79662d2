"""`brainmri ingest` end to end: a synthetic tree with every kind of trouble, the real scans
(local folder and a loopback S3 server), Ray Data reading the result, and the CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from brainmri.config import CLASSES, IngestConfig
from brainmri.core.storage import StorageError, open_location
from brainmri.data import images as im
from brainmri.data.datasets import (
    MANIFEST,
    SPLITS,
    complete_versions,
    dataset_root,
    latest_version,
    load_manifest,
    resolve_dataset,
    split_files,
    verify_shards,
)
from brainmri.data.dedup import near_duplicate_pairs
from brainmri.data.ingest import ingest
from brainmri.data.ingest_rules import SCHEMA

from support.data import real_subset
from support.synth import bad_files, encode, near_copy, synth_array, synth_jpeg

REPO = Path(__file__).resolve().parents[2]


# -- a synthetic source tree -----------------------------------------------------------------
@dataclass
class Tree:
    source: Path
    entries: list[str] = field(default_factory=list)  # every path under source, as inventoried
    rejected: dict[str, str] = field(default_factory=dict)  # path -> reason
    duplicates: dict[str, str] = field(default_factory=dict)  # path -> duplicate_of
    accepted: dict[str, str] = field(default_factory=dict)  # path -> class
    same_group: list[set[str]] = field(default_factory=list)
    conflict: set[str] = field(default_factory=set)  # identical bytes under two classes
    near_conflict: set[str] = field(default_factory=set)  # near copies under two classes
    test_paths: set[str] = field(default_factory=set)  # accepted paths that must be in split test
    near_pairs: int = 0
    exact_groups: int = 0

    def add(self, rel: str, data: bytes | None = None, *, status: str = "accepted",
            reason: str = "", dup_of: str = "") -> Path:
        p = self.source / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            p.write_bytes(data)
        self.entries.append(rel)
        if status == "accepted":
            self.accepted[rel] = rel.split("/")[1]
        elif status == "rejected":
            self.rejected[rel] = reason
        else:
            self.duplicates[rel] = dup_of
        return p


def make_tree(root: Path) -> Tree:
    t = Tree(root / "SOURCE")
    seed = iter(range(100, 1000))
    # plain good scans
    for c in CLASSES:
        for k in range(6):
            t.add(f"Training/{c}/{c[0]}{k}.jpg", synth_jpeg(next(seed)))
        t.add(f"Testing/{c}/t{c[0]}0.jpg", synth_jpeg(next(seed)))
        t.test_paths.add(f"Testing/{c}/t{c[0]}0.jpg")
    # other accepted encodings
    a = synth_array(next(seed))
    t.add("Training/pituitary/rgb.png", encode(np.stack([a, a // 2, 255 - a], -1), "PNG"))
    t.add("Training/pituitary/scan16.png",
          encode(Image.fromarray(synth_array(next(seed)).astype(np.uint16) * 16), "PNG"))
    # exact duplicate, same class: the first path is kept
    t.add("Training/glioma/g0_copy.jpg", (t.source / "Training/glioma/g0.jpg").read_bytes(),
          status="duplicate", dup_of="Training/glioma/g0.jpg")
    # exact duplicate across Training/Testing, same class: the Testing copy is kept
    dup = t.add("Testing/glioma/tg_dup.jpg", (t.source / "Training/glioma/g5.jpg").read_bytes())
    t.test_paths.add("Testing/glioma/tg_dup.jpg")
    del t.accepted["Training/glioma/g5.jpg"]
    t.duplicates["Training/glioma/g5.jpg"] = "Testing/glioma/tg_dup.jpg"
    assert dup.read_bytes() == (t.source / "Training/glioma/g5.jpg").read_bytes()
    # a link inside SOURCE to a file inside SOURCE: read through, so a duplicate of its target
    os.symlink("g2.jpg", t.source / "Training/glioma/link_in.jpg")
    t.add("Training/glioma/link_in.jpg", status="duplicate", dup_of="Training/glioma/g2.jpg")
    t.exact_groups = 3
    # near duplicates: resized + re-encoded copy of g1 (same class, Training) ...
    g1_seed = next(seed)
    (t.source / "Training/glioma/g1.jpg").write_bytes(synth_jpeg(g1_seed))
    t.add("Training/glioma/g1_near.jpg", near_copy(g1_seed))
    t.same_group.append({"Training/glioma/g1.jpg", "Training/glioma/g1_near.jpg"})
    # ... and of n0 in Testing/: pulls the Training original into split test with it
    n0_seed = next(seed)
    (t.source / "Training/notumor/n0.jpg").write_bytes(synth_jpeg(n0_seed))
    t.add("Testing/notumor/tn0_near.jpg", near_copy(n0_seed, quality=60))
    t.same_group.append({"Training/notumor/n0.jpg", "Testing/notumor/tn0_near.jpg"})
    t.test_paths |= {"Training/notumor/n0.jpg", "Testing/notumor/tn0_near.jpg"}
    # cross-label exact duplicate: the image is said to be two classes, so every copy is
    # rejected (a Testing copy too) and the conflict is reported
    cross = synth_jpeg(next(seed))
    for rel in ("Training/meningioma/cross.jpg", "Training/notumor/cross.jpg",
                "Training/notumor/cross_again.jpg", "Testing/meningioma/cross.jpg"):
        t.add(rel, cross, status="rejected", reason=im.LABEL_CONFLICT)
        t.conflict.add(rel)
    t.exact_groups += 1
    # cross-label near duplicates: kept, each with its own label, together in one split,
    # and reported
    x_seed = next(seed)
    t.add("Training/pituitary/x.jpg", synth_jpeg(x_seed))
    t.add("Training/glioma/x_near.jpg", near_copy(x_seed))
    t.near_conflict = {"Training/pituitary/x.jpg", "Training/glioma/x_near.jpg"}
    t.same_group.append(set(t.near_conflict))
    t.near_pairs = 3
    # hidden and system files, valid images among them
    t.add("Training/.DS_Store", b"\x00\x00\x00\x01Bud1", status="rejected", reason=im.HIDDEN)
    t.add("Training/glioma/Thumbs.db", b"thumbs", status="rejected", reason=im.HIDDEN)
    t.add("Training/glioma/.hidden.jpg", synth_jpeg(next(seed)), status="rejected",
          reason=im.HIDDEN)
    t.add("Training/meningioma/.cache/c.jpg", synth_jpeg(next(seed)), status="rejected",
          reason=im.HIDDEN)
    # valid images in the wrong place
    t.add("Training/unknownclass/u0.jpg", synth_jpeg(next(seed)), status="rejected",
          reason=im.UNKNOWN_CLASS)
    t.add("Training/loose.jpg", synth_jpeg(next(seed)), status="rejected", reason=im.UNKNOWN_CLASS)
    t.add("root.jpg", synth_jpeg(next(seed)), status="rejected", reason=im.UNKNOWN_CLASS)
    # links that leave SOURCE or lead nowhere, and a non-regular file
    outside = root / "outside.jpg"
    outside.write_bytes(synth_jpeg(next(seed)))
    os.symlink(outside, t.source / "Training/glioma/link_out.jpg")
    t.add("Training/glioma/link_out.jpg", status="rejected", reason=im.SYMLINK_OUTSIDE)
    os.symlink(root, t.source / "Training/meningioma/link_up")  # a folder link leaving SOURCE
    t.add("Training/meningioma/link_up", status="rejected", reason=im.SYMLINK_OUTSIDE)
    os.symlink("missing.jpg", t.source / "Training/glioma/link_broken.jpg")
    t.add("Training/glioma/link_broken.jpg", status="rejected", reason=im.NOT_REGULAR)
    os.symlink("glioma", t.source / "Training/link_dir")  # a folder link inside SOURCE
    t.add("Training/link_dir", status="rejected", reason=im.NOT_REGULAR)
    os.mkfifo(t.source / "Training/pituitary/fifo.jpg")
    t.add("Training/pituitary/fifo.jpg", status="rejected", reason=im.NOT_REGULAR)
    # one of each bad file
    for name, (data, reason) in bad_files().items():
        t.add(f"Training/pituitary/{name}", data, status="rejected", reason=reason)
    return t


def _inventory(version) -> dict[str, dict]:
    rows = list(csv.DictReader(io.StringIO((version / "inventory.csv").read_bytes().decode())))
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "a path appears twice in inventory.csv"
    return by_path


def _read_rows(version, manifest) -> list[dict]:
    out = []
    for s in manifest["shards"]:
        tbl = pq.read_table((version / s["path"]).path, filesystem=version.fs)
        assert tbl.schema.equals(SCHEMA)
        assert tbl.num_rows == s["rows"]
        for r in tbl.to_pylist():
            r["split"] = s["split"]
            out.append(r)
    return out


def _check_groups_and_counts(rows, manifest):
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r["group"]].add(r["split"])
    straddling = {g: s for g, s in splits_of.items() if len(s) > 1}
    assert not straddling
    assert manifest["duplicates"]["groups_straddling_splits"] == 0
    counts = {s: Counter() for s in SPLITS}
    for r in rows:
        counts[r["split"]][r["class_name"]] += 1
        assert r["class_name"] == manifest["classes"][r["label"]]
    for s in SPLITS:
        assert {c: counts[s][c] for c in manifest["classes"]} == manifest["counts"][s]
        assert manifest["rows"][s] == sum(counts[s].values())


def _no_temp_files(root: Path):
    left = [p for p in root.rglob("*") if p.name.startswith(".tmp")]
    assert not left, left


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path)


CFG = dict(val_fraction=0.2, workers=1)


def test_synthetic_tree_ingest(tree, tmp_path):
    dest = tmp_path / "lake"
    res = ingest(str(tree.source), str(dest), IngestConfig(**CFG))
    assert res.created
    v = res.location
    m = load_manifest(v)
    assert m == res.manifest and m["version"] == res.version == v.name
    assert v.path == str(dest / "datasets" / "brain-tumor-mri" / res.version)

    # inventory: one row per entry under SOURCE, each with the expected outcome
    inv = _inventory(v)
    assert sorted(inv) == sorted(tree.entries)
    got_rejected = {p: r["reason"] for p, r in inv.items() if r["status"] == "rejected"}
    assert got_rejected == tree.rejected
    got_dups = {p: r["duplicate_of"] for p, r in inv.items() if r["status"] == "duplicate"}
    assert got_dups == tree.duplicates
    got_accepted = {p: r["class"] for p, r in inv.items() if r["status"] == "accepted"}
    assert got_accepted == tree.accepted
    # every reason a folder walk or a file's bytes can give is exercised here
    # (the DICOM_* reasons are exercised by tests/data/test_ingest_dicom.py, pseudonymised)
    all_reasons = {getattr(im, n) for n in dir(im) if n.isupper() and isinstance(getattr(im, n), str)
                   and n not in ("FORMATS", "MODES") and not n.startswith("DICOM_")}
    # the root reads anything; undecodable names have a test of their own
    assert set(tree.rejected.values()) == all_reasons - {im.UNREADABLE, im.UNDECODABLE_NAME}

    rejects = list(csv.DictReader(io.StringIO((v / "rejects.csv").read_bytes().decode())))
    assert {r["path"]: r["reason"] for r in rejects} == tree.rejected

    f = m["files"]
    assert f["seen"] == len(tree.entries)
    assert (f["accepted"], f["duplicate"], f["rejected"]) == (
        len(tree.accepted), len(tree.duplicates), len(tree.rejected))
    assert f["accepted"] + f["duplicate"] + f["rejected"] == f["seen"]
    assert m["rejected_by_reason"] == dict(Counter(tree.rejected.values()))
    d = m["duplicates"]
    assert d["exact_groups"] == tree.exact_groups
    assert d["exact_files_dropped"] == len(tree.duplicates)
    assert d["near_duplicate_pairs"] == tree.near_pairs  # and no accidental ones
    assert d["groups_with_several_images"] == len(tree.same_group)
    assert sorted(map(sorted, tree.same_group)) == sorted(d["near"])
    conflicts = {c["kind"]: c for c in m["label_conflicts"]}
    assert len(conflicts) == len(m["label_conflicts"]) == 2
    exact, near = conflicts["identical"], conflicts["near"]
    assert [x["path"] for x in exact["members"]] == sorted(tree.conflict) and exact["excluded"]
    assert {x["class"] for x in exact["members"]} == {"meningioma", "notumor"}
    assert {inv[p]["group"] for p in tree.conflict} == {exact["group"]}
    assert all(inv[p]["split"] == "" for p in tree.conflict)
    assert sorted(tree.conflict) in d["exact"]
    assert [x["path"] for x in near["members"]] == sorted(tree.near_conflict)
    assert not near["excluded"] and near["group"] == inv["Training/pituitary/x.jpg"]["group"]

    # the Parquet rows
    rows = _read_rows(v, m)
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows) and set(by_path) == set(tree.accepted)
    for p, r in by_path.items():
        data = (tree.source / p).read_bytes()
        assert r["image"] == data
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        assert r["class_name"] == tree.accepted[p] and r["label"] == CLASSES.index(r["class_name"])
        assert r["source_split"] == p.split("/")[0]
        assert r["split"] == inv[p]["split"] and r["group"] == inv[p]["group"]
        img = Image.open(io.BytesIO(data))
        assert (r["width"], r["height"], r["mode"], r["format"]) == (*img.size, img.mode, img.format)
    _check_groups_and_counts(rows, m)
    # a label conflict between identical files trains nothing and is scored nowhere
    cross_sha = hashlib.sha256((tree.source / "Training/notumor/cross.jpg").read_bytes()).hexdigest()
    assert not tree.conflict & set(by_path) and cross_sha not in {r["sha256"] for r in rows}
    assert {by_path[p]["class_name"] for p in tree.near_conflict} == {"pituitary", "glioma"}
    for members in tree.same_group:
        assert len({by_path[p]["group"] for p in members}) == 1
        assert len({by_path[p]["split"] for p in members}) == 1
    singletons = set(tree.accepted) - set().union(*tree.same_group)
    for p in singletons:  # group id = content hash prefix, not a path or a position
        assert by_path[p]["group"] == by_path[p]["sha256"][:16]
    assert {p for p, r in by_path.items() if r["split"] == "test"} == tree.test_paths
    assert all(by_path[p]["split"] == "test" for p in by_path if p.startswith("Testing/"))
    assert all(m["counts"][s][c] > 0 for s in ("train", "test") for c in CLASSES)
    assert m["rows"]["val"] > 0

    # shard bookkeeping
    for s in m["shards"]:
        blob = (v / s["path"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == s["sha256"] and len(blob) == s["bytes"]
        assert (v / s["path"]).path in split_files(v, m, s["split"])
    assert sorted(Path(dest).rglob("*.parquet")) == sorted(
        Path(v.path) / s["path"] for s in m["shards"])
    _no_temp_files(dest)


def test_rerun_seed_latest_and_crash_recovery(tree, tmp_path):
    dest = tmp_path / "lake"
    store = open_location(dest)
    root = dataset_root(store, "brain-tumor-mri")
    first = ingest(str(tree.source), str(dest), IngestConfig(**CFG))
    assert latest_version(store, "brain-tumor-mri").path == first.location.path

    again = ingest(str(tree.source), str(dest), IngestConfig(**CFG))
    assert (again.version, again.created) == (first.version, False)
    assert again.manifest == first.manifest
    assert root.listdir() == [first.version]

    # workers do not change the content, so not the version
    w2 = ingest(str(tree.source), str(dest), IngestConfig(**{**CFG, "workers": 2}))
    assert (w2.version, w2.created) == (first.version, False)

    other = ingest(str(tree.source), str(dest), IngestConfig(**{**CFG, "seed": 1}))
    assert other.created and other.version != first.version
    assert sorted(root.listdir()) == sorted([first.version, other.version])
    assert other.manifest["created_unix"] > first.manifest["created_unix"]
    assert latest_version(store, "brain-tumor-mri").name == other.version
    loc, man = resolve_dataset(str(dest), "brain-tumor-mri")
    assert (loc.name, man["version"]) == (other.version, other.version)
    loc, man = resolve_dataset(root.uri)
    assert loc.name == other.version
    loc, man = resolve_dataset(first.location.uri)
    assert (loc.name, man["version"], man["ingest"]["seed"]) == (first.version, first.version, 0)
    with pytest.raises(StorageError, match="not a complete dataset version"):
        resolve_dataset(str(tmp_path / "nothing-here"))
    with pytest.raises(StorageError, match="no complete version"):
        latest_version(store, "other-name")

    # a crash: the newest version lost its manifest and holds debris
    (other.location / MANIFEST).delete()
    (other.location / "train" / "debris.parquet").write_bytes(b"half a shard")
    assert [v for _, v, _ in complete_versions(root)] == [first.version]
    assert latest_version(store, "brain-tumor-mri").name == first.version
    assert resolve_dataset(str(dest), "brain-tumor-mri")[0].name == first.version
    with pytest.raises(StorageError, match="incomplete"):
        load_manifest(other.location)

    redo = ingest(str(tree.source), str(dest), IngestConfig(**{**CFG, "seed": 1}))
    assert (redo.version, redo.created) == (other.version, True)
    assert not (redo.location / "train" / "debris.parquet").exists()
    assert latest_version(store, "brain-tumor-mri").name == other.version
    rows = _read_rows(redo.location, redo.manifest)
    assert sorted(r["path"] for r in rows) == sorted(tree.accepted)
    _check_groups_and_counts(rows, redo.manifest)
    _no_temp_files(dest)


def test_source_without_testing_folder_gets_a_test_split(tmp_path):
    src = tmp_path / "flat"
    for i, c in enumerate(CLASSES):
        (src / c).mkdir(parents=True)
        for k in range(10):
            (src / c / f"{k}.jpg").write_bytes(synth_jpeg(5000 + 10 * i + k))
    res = ingest(str(src), str(tmp_path / "lake"),
                 IngestConfig(val_fraction=0.2, test_fraction=0.3, workers=1))
    m = res.manifest
    for c in CLASSES:  # per class: round(0.3 * 10) test, round(0.2 * 10) val
        assert (m["counts"]["test"][c], m["counts"]["val"][c], m["counts"]["train"][c]) == (3, 2, 5)
    rows = _read_rows(res.location, m)
    assert all(r["source_split"] == "" for r in rows)
    _check_groups_and_counts(rows, m)


def test_ingest_to_s3_does_not_read_the_working_directory(tmp_path, s3_bucket, monkeypatch):
    """Object keys are never resolved against the local filesystem: an ingest whose working
    directory is gone (on a cluster node, a job's working-dir copy deleted under it) publishes,
    where a relpath on S3 keys failed with a bare "[Errno 2] No such file or directory"."""
    src = tmp_path / "flat"
    for i, c in enumerate(CLASSES):
        (src / c).mkdir(parents=True)
        for k in range(6):
            (src / c / f"{k}.jpg").write_bytes(synth_jpeg(7000 + 10 * i + k))
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    res = ingest(str(src), f"s3://{s3_bucket}/lake", IngestConfig(val_fraction=0.2, workers=1))
    assert res.created and res.location.is_s3
    assert sum(res.manifest["rows"].values()) == 6 * len(CLASSES)


def test_a_mirrored_copy_lands_in_its_originals_group_and_split(tmp_path):
    """The public data holds left-right mirrored copies of scans; training flips images, so
    a copy on the other side of a split would be a test image the network has seen. Ingest
    groups each mirrored copy (re-encoded) with its original, and records every row's
    mirror pHash for the leakage check."""
    src = real_subset(tmp_path / "src", per_class=6, offset=500)
    mirrored = {}
    for c in CLASSES:
        for f in sorted((src / "Training" / c).iterdir())[:3]:
            img = Image.open(f).convert("L").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            (src / "Training" / c / f"mirror-{f.name}").write_bytes(buf.getvalue())
            mirrored[f"Training/{c}/mirror-{f.name}"] = f"Training/{c}/{f.name}"
    res = ingest(str(src), str(tmp_path / "lake"),
                 IngestConfig(val_fraction=0.3, test_fraction=0.3, workers=1))
    rows = {r["path"]: r for r in _read_rows(res.location, res.manifest)}
    assert len(rows) == 4 * 9
    for copy, orig in mirrored.items():
        assert (rows[copy]["group"], rows[copy]["split"]) == (rows[orig]["group"], rows[orig]["split"])
        assert rows[copy]["phash_mirror"] != rows[copy]["phash"]
    assert res.manifest["duplicates"]["near_duplicate_pairs"] >= len(mirrored)
    _check_groups_and_counts(list(rows.values()), res.manifest)


def test_a_version_from_before_mirror_hashes_is_returned_with_a_warning(tmp_path, capsys):
    """Re-ingesting content whose splits the mirror rule does not move gives the same version
    id; if that version was written before `phash_mirror` existed, it is returned as it is,
    and the user is told that its leakage check goes without mirrors."""
    src = tmp_path / "src"
    for i, c in enumerate(CLASSES):
        (src / "Training" / c).mkdir(parents=True)
        for k in range(3):
            (src / "Training" / c / f"{k}.jpg").write_bytes(synth_jpeg(8100 + 10 * i + k))
    cfg = IngestConfig(val_fraction=0.3, test_fraction=0.3, workers=1)
    first = ingest(str(src), str(tmp_path / "lake"), cfg)
    assert "written before mirror hashes" not in capsys.readouterr().err
    for s in first.manifest["shards"]:  # as an older ingest wrote it: no mirror hashes
        path = (first.location / s["path"]).path
        pq.write_table(pq.read_table(path).drop_columns(["phash_mirror"]), path)
    again = ingest(str(src), str(tmp_path / "lake"), cfg)
    assert again.version == first.version and not again.created
    assert "written before mirror hashes" in capsys.readouterr().err


def test_missing_source_and_bad_name(tmp_path):
    with pytest.raises(FileNotFoundError):
        ingest(str(tmp_path / "nope"), str(tmp_path / "lake"))
    (tmp_path / "src").mkdir()
    with pytest.raises(StorageError, match="invalid dataset name"):
        ingest(str(tmp_path / "src"), str(tmp_path / "lake"), IngestConfig(name="../up"))
    assert not (tmp_path / "lake").exists()


def _refused(src, lake, match):
    from brainmri.data.ingest import UnusableSourceError
    with pytest.raises(UnusableSourceError, match=match) as e:
        ingest(str(src), str(lake), IngestConfig(workers=1))
    root = dataset_root(open_location(str(lake)), "brain-tumor-mri")
    assert complete_versions(root) == []
    with pytest.raises(StorageError, match="no complete version"):
        latest_version(open_location(str(lake)), "brain-tumor-mri")
    msg = str(e.value)
    assert "\n" not in msg and "nothing was published" in msg
    (version,) = [root / n for n in root.listdir()]
    assert not (version / MANIFEST).exists()
    assert (version / "inventory.csv").uri in msg and (version / "rejects.csv").exists()
    return version


def test_empty_or_all_rejected_source_is_not_published(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", tmp_path / "lake1", "no image was accepted")
    # the Kaggle folder one level too deep: every file is outside a known class folder
    src = tmp_path / "deep"
    for i, c in enumerate(CLASSES):
        (src / "Kaggle" / "Training" / c).mkdir(parents=True)
        (src / "Kaggle" / "Training" / c / "0.jpg").write_bytes(synth_jpeg(7000 + i))
    version = _refused(src, tmp_path / "lake2", "no image was accepted")
    inv = _inventory(version)
    assert len(inv) == 4 and {r["reason"] for r in inv.values()} == {im.UNKNOWN_CLASS}
    # accepted images, but all of them in Testing/: no training rows
    src = tmp_path / "testonly"
    for i, c in enumerate(CLASSES):
        (src / "Testing" / c).mkdir(parents=True)
        (src / "Testing" / c / "0.jpg").write_bytes(synth_jpeg(7100 + i))
    _refused(src, tmp_path / "lake3", "none in the train split")


def test_cli_refuses_empty_source(tmp_path):
    (tmp_path / "empty").mkdir()
    p = _cli("ingest", str(tmp_path / "empty"), str(tmp_path / "lake"), cwd=tmp_path)
    assert p.returncode == 2
    err = p.stderr.strip()
    assert err.startswith("brainmri ingest: error:") and "\n" not in err and "rejects.csv" in err


def test_non_utf8_file_name_is_rejected_not_fatal(tmp_path):
    src = tmp_path / "src"
    for i, c in enumerate(CLASSES):
        (src / "Training" / c).mkdir(parents=True)
        for k in range(3):
            (src / "Training" / c / f"{k}.jpg").write_bytes(synth_jpeg(8000 + 10 * i + k))
    fd = os.open(os.fsencode(src / "Training" / "glioma") + b"/scan_\xff.jpg",
                 os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, synth_jpeg(8999))
    os.close(fd)
    res = ingest(str(src), str(tmp_path / "lake"), IngestConfig(workers=1))
    m = res.manifest
    assert m["files"] == {"seen": 13, "accepted": 12, "duplicate": 0, "rejected": 1}
    assert m["rejected_by_reason"] == {im.UNDECODABLE_NAME: 1}
    inv = _inventory(res.location)
    bad = inv["Training/glioma/scan_\\xff.jpg"]
    assert bad["status"] == "rejected" and bad["reason"] == im.UNDECODABLE_NAME


# -- (b) the dedup thresholds on synthetic scans -------------------------------------------
def test_dedup_thresholds_separate_distinct_scans_from_copies():
    n = 40
    cfg = IngestConfig()
    infos = [im.inspect_image(synth_jpeg(7000 + i)) for i in range(n)]
    copies = [im.inspect_image(near_copy(7000 + i, new_size=96 + (i % 3) * 16,
                                         quality=60 + (i % 4) * 10)) for i in range(n)]
    both = infos + copies
    phash = np.array([x.phash for x in both], dtype=np.int64)
    thumbs = np.frombuffer(b"".join(x.thumb for x in both), np.uint8).reshape(len(both), -1)
    pairs = near_duplicate_pairs(phash, thumbs, cfg.phash_distance, cfg.near_dup_similarity)
    assert sorted(pairs) == [(i, i + n) for i in range(n)]
    # distinct scans are far apart on both measures, not just barely
    u = phash[:n].view(np.uint64)
    dist = np.bitwise_count(u[:, None] ^ u[None, :])[np.triu_indices(n, 1)]
    assert dist.min() > cfg.phash_distance
    t = thumbs[:n].astype(np.float64)
    t -= t.mean(1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    corr = (t @ t.T)[np.triu_indices(n, 1)]
    assert corr.max() < cfg.near_dup_similarity
    # and every copy is well inside both thresholds
    cu = phash[n:].view(np.uint64)
    assert int(np.bitwise_count(u ^ cu).max()) <= cfg.phash_distance
    assert min(near_duplicate_pairs(phash[[i, i + n]], thumbs[[i, i + n]], 64, -1.0) == [(0, 1)]
               for i in range(n))


# -- (c) real scans, local and S3, read back by pyarrow and Ray Data ----------------------
@pytest.fixture(scope="module")
def real_lakes(tmp_path_factory, s3_server):
    src = real_subset(tmp_path_factory.mktemp("real"), per_class=50)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    local = ingest(str(src), str(tmp_path_factory.mktemp("lake")), IngestConfig())
    s3 = ingest(str(src), f"s3://{bucket}/lake", IngestConfig())
    return src, local, s3


def _check_real(src: Path, res, rows):
    m = res.manifest
    f = m["files"]
    assert f["seen"] == 4 * 50 == f["accepted"] + f["duplicate"] + f["rejected"]
    assert len(rows) == f["accepted"] == sum(m["rows"].values())
    _check_groups_and_counts(rows, m)
    for r in rows:
        parts = r["path"].split("/")
        assert parts[0] == "Training" and r["class_name"] == parts[1]
        assert r["label"] == CLASSES.index(parts[1])
        source_bytes = (src / r["path"]).read_bytes()
        assert hashlib.sha256(r["image"]).hexdigest() == r["sha256"] == hashlib.sha256(
            source_bytes).hexdigest()
        got = np.asarray(Image.open(io.BytesIO(r["image"])))
        want = np.asarray(Image.open(src / r["path"]))
        assert got.shape == want.shape and np.array_equal(got, want)
        assert (r["height"], r["width"]) == want.shape[:2]


def test_real_scans_local_and_s3_pyarrow(real_lakes, s3_server):
    src, local, s3 = real_lakes
    assert local.created and s3.created
    assert local.version == s3.version  # content-addressed: same data, same id, anywhere
    assert s3.location.uri.startswith("s3://") and s3.location.is_s3
    for res in (local, s3):
        m = load_manifest(res.location)
        assert m["rows"] == local.manifest["rows"] and m["counts"] == local.manifest["counts"]
        _check_real(src, res, _read_rows(res.location, m))
        inv = _inventory(res.location)
        assert len(inv) == 200
    # the S3 copy, as any S3 client sees it
    s3c = boto3.client("s3", endpoint_url=s3_server)
    bucket, prefix = s3.location.path.split("/", 1)
    keys = {o["Key"] for o in s3c.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert keys == {f"{prefix}/{x}" for x in
                    [MANIFEST, "inventory.csv", "rejects.csv"]
                    + [s["path"] for s in s3.manifest["shards"]]}
    # resolve by store + name, over S3
    loc, man = resolve_dataset(f"s3://{bucket}/lake", "brain-tumor-mri")
    assert loc.uri == s3.location.uri and man["version"] == s3.version
    # and a rerun over S3 finds it
    again = ingest(str(src), f"s3://{bucket}/lake", IngestConfig())
    assert (again.version, again.created) == (s3.version, False)


def test_real_scans_ray_data(real_lakes, ray_local):
    """Ray Data reads the shards the manifest lists, through the Location's filesystem
    (one read per store: Ray Data start-up dominates on a 2-core machine)."""
    src, local, s3 = real_lakes
    for res in (local, s3):
        v, m = res.location, res.manifest
        paths = [p for split in SPLITS for p in split_files(v, m, split)]
        assert len(paths) == len(m["shards"])
        ds = ray_local.data.read_parquet(paths, filesystem=v.fs)
        rows = ds.take_all()
        assert len(rows) == sum(m["rows"].values()) == m["files"]["accepted"]
        inv = _inventory(v)
        for r in rows:
            r["split"] = inv[r["path"]]["split"]
            assert inv[r["path"]]["status"] == "accepted" and r["group"] == inv[r["path"]]["group"]
        assert len({r["path"] for r in rows}) == len(rows)
        _check_real(src, res, rows)


# -- (d) the CLI -------------------------------------------------------------------------------
def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "brainmri.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_ingest_prints_counts(tmp_path):
    src = tmp_path / "src"
    for i, c in enumerate(CLASSES):
        (src / "Training" / c).mkdir(parents=True)
        for k in range(3):
            (src / "Training" / c / f"{k}.jpg").write_bytes(synth_jpeg(9000 + 10 * i + k))
    (src / "Training/glioma/0_copy.jpg").write_bytes((src / "Training/glioma/0.jpg").read_bytes())
    (src / "Training/notumor/empty.jpg").write_bytes(b"")
    p = _cli("ingest", str(src), str(tmp_path / "lake"), "--seed", "3", "--val-fraction", "0.3",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "files seen 14: accepted 12, duplicate 1, rejected 1 {\"empty_file\": 1}" in out
    m = resolve_dataset(str(tmp_path / "lake"), "brain-tumor-mri")[1]
    assert f"wrote dataset brain-tumor-mri version {m['version']}" in out
    printed = re.search(r"rows per split (\{[^}]*\});", out)
    assert printed and json.loads(printed.group(1)) == m["rows"]
    assert m["ingest"]["seed"] == 3 and m["ingest"]["val_fraction"] == 0.3
    assert sum(m["rows"].values()) == 12 and m["rows"]["test"] == 0  # no Testing/, 10% of 3 = 0

    p = _cli("ingest", str(src), str(tmp_path / "lake"), "--seed", "3", "--val-fraction", "0.3",
             cwd=tmp_path)
    assert p.returncode == 0 and "already present: dataset brain-tumor-mri" in p.stdout

    p = _cli("ingest", str(src), str(tmp_path / "lake2"), "--set", "bogus=1", cwd=tmp_path)
    assert p.returncode == 2 and "bogus" in p.stderr and not (tmp_path / "lake2").exists()


def test_cli_nonexistent_bucket_exits_2_and_writes_nothing(tmp_path, s3_server):
    src = tmp_path / "src"
    (src / "Training" / "glioma").mkdir(parents=True)
    (src / "Training/glioma/a.jpg").write_bytes(synth_jpeg(9500))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    s3c = boto3.client("s3", endpoint_url=s3_server)
    buckets = {b["Name"] for b in s3c.list_buckets()["Buckets"]}
    p = _cli("ingest", str(src), "s3://no-such-bucket-cli/lake", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stdout == ""
    err = p.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("brainmri ingest: error:") and "does not exist" in err
    assert "no-such-bucket-cli" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert {b["Name"] for b in s3c.list_buckets()["Buckets"]} == buckets


# -- (e) concurrent and interrupted ingests ------------------------------------------------
SMALL_SHARDS = {"shard_mb": 1, "workers": 1}  # several train shards from 25 scans a class


def _check_published(version, manifest, accepted: int):
    """A complete version: shards verify, rows all there, nothing but the listed files."""
    assert verify_shards(version, manifest) > 0
    rows = _read_rows(version, manifest)
    assert len(rows) == len({r["path"] for r in rows}) == accepted
    _check_groups_and_counts(rows, manifest)
    listed = {"inventory.csv", "rejects.csv", MANIFEST} | {s["path"] for s in manifest["shards"]}
    assert {posixpath.relpath(f.path, version.path) for f in version.files()} == listed


def _ingest_cmd(src, lake) -> list[str]:
    return [sys.executable, "-m", "brainmri.cli", "ingest", str(src), str(lake),
            *(f"--set={k}={v}" for k, v in SMALL_SHARDS.items())]


def test_two_concurrent_ingests_of_the_same_content(tmp_path):
    src = real_subset(tmp_path / "src", per_class=25)
    lake = tmp_path / "lake"
    procs = [subprocess.Popen(_ingest_cmd(src, lake), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    version, m = resolve_dataset(str(lake), "brain-tumor-mri")
    assert all(f"version {m['version']} at {version.uri}" in out for out, _ in outs)
    assert dataset_root(open_location(lake), "brain-tumor-mri").listdir() == [m["version"]]
    assert len(m["shards"]) > 3
    _check_published(version, m, m["files"]["accepted"])
    # the bytes a lone ingest writes: either writer's shard is the same file
    alone = ingest(str(src), str(tmp_path / "alone"), IngestConfig(**SMALL_SHARDS))
    assert [(s["path"], s["sha256"]) for s in alone.manifest["shards"]] == [
        (s["path"], s["sha256"]) for s in m["shards"]]


def test_ingest_overtaken_by_another_keeps_the_published_version(tree, tmp_path, monkeypatch):
    """Writer A is half way (train shards written) when writer B runs from start to end:
    B publishes, A rewrites the same shards with the same bytes and does not publish again."""
    import brainmri.data.ingest as ing

    dest = str(tmp_path / "lake")
    write_shards, overtaken = ing._write_shards, []

    def a_then_b(root, rows, split, *args):
        shards = write_shards(root, rows, split, *args)
        if split == "train" and not overtaken:
            monkeypatch.setattr(ing, "_write_shards", write_shards)  # B runs unhindered
            overtaken.append(ingest(str(tree.source), dest, IngestConfig(**CFG)))
        return shards

    monkeypatch.setattr(ing, "_write_shards", a_then_b)
    a = ingest(str(tree.source), dest, IngestConfig(**CFG))
    (b,) = overtaken
    assert b.created and not a.created and a.version == b.version
    assert a.manifest == b.manifest == load_manifest(b.location)
    _check_published(b.location, b.manifest, len(tree.accepted))


def test_partial_version_folder_is_completed_by_a_rerun(tree, tmp_path):
    dest = tmp_path / "lake"
    first = ingest(str(tree.source), str(dest), IngestConfig(**CFG))
    v, m = first.location, first.manifest
    # what an interrupted attempt can leave: no manifest, a damaged and a missing shard, no
    # inventory, a shard name this content does not produce, an old temp file; and a fresh
    # temp file, as a concurrent writer's would be
    (v / MANIFEST).delete()
    (v / m["shards"][0]["path"]).write_bytes(b"half a shard")
    (v / m["shards"][-1]["path"]).delete()
    (v / "inventory.csv").delete()
    debris = v / "val" / "part-00009.parquet"
    debris.write_bytes(b"debris")
    stale, fresh = v / "train" / ".tmp-0a-part-00000.parquet", v / "test" / ".tmp-0b-part-00000.parquet"
    for f in (stale, fresh):
        f.write_bytes(b"partial")
    old = time.time() - 7 * 3600
    os.utime(stale.path, (old, old))
    root = dataset_root(open_location(dest), "brain-tumor-mri")
    assert complete_versions(root) == []

    redo = ingest(str(tree.source), str(dest), IngestConfig(**CFG))
    assert (redo.version, redo.created) == (first.version, True)
    assert redo.manifest["shards"] == m["shards"]  # the same names and bytes as the first time
    assert fresh.exists() and not stale.exists() and not debris.exists()
    fresh.delete()  # a live writer's own, not this run's to remove
    _check_published(redo.location, redo.manifest, len(tree.accepted))
    assert _inventory(redo.location).keys() == set(tree.entries)


def _open_files_under(pid: int, folder: str) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith(folder + "/"):
            out.append(target)
    return out


def _stop_while_spooling(proc, folder: str, timeout: float = 120.0) -> list[str]:
    """Freeze `proc` (SIGSTOP) at a moment it holds a file open under `folder`: its spool.
    Returns what it holds, or [] if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if _open_files_under(proc.pid, folder):
            os.kill(proc.pid, signal.SIGSTOP)
            held = _open_files_under(proc.pid, folder)  # still open, now that it is frozen?
            if held:
                return held
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)
    return []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_killed_ingest_leaves_no_spool_file_and_a_rerun_completes(tmp_path):
    src = real_subset(tmp_path / "src", per_class=25)
    lake, spool_dir = tmp_path / "lake", tmp_path / "tmp"
    spool_dir.mkdir()
    proc = subprocess.Popen(_ingest_cmd(src, lake), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "TMPDIR": str(spool_dir)})
    try:
        held = _stop_while_spooling(proc, os.path.realpath(spool_dir))
        assert held, "ingest ended before its spool file could be seen"
        proc.kill()  # SIGKILL, mid-write: no handler, no cleanup runs
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert list(spool_dir.iterdir()) == [], held
    root = dataset_root(open_location(lake), "brain-tumor-mri")
    assert complete_versions(root) == []  # the killed attempt published nothing

    redo = ingest(str(src), str(lake), IngestConfig(**SMALL_SHARDS))
    assert redo.created
    for f in redo.location.files():  # the killed writer's temp file, if any, is left alone
        if f.name.startswith(".tmp-"):
            f.delete()
    _check_published(redo.location, redo.manifest, redo.manifest["files"]["accepted"])
