"""`brainmri ingest` of a hospital-style DICOM export beside real JPEGs: patient-named folders,
series of single-frame files in several syntaxes, multi-frame files, bad files, a DICOM
outside the class folders. Every row, column and written file is searched for the patient
data planted in the files; slices of one series stay in one split; the model sees the
pictures the files were made from."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from brainmri.cli import main
from brainmri.config import CLASSES, IngestConfig
from brainmri.data import dicom
from brainmri.data import images as im
from brainmri.data.datasets import SPLITS, split_files
from brainmri.data.ingest import ingest
from brainmri.data.ingest_rules import SCHEMA
from brainmri.data.transforms import preprocess
from brainmri.data.walk import pseudonym

from support.data import SHARED_DATA, real_subset
from support.dicom import bad_dicoms, make_dicom, phi_values

SALT = "ingest-test-salt-5e1f0c"
EXPORT = "QUIXOTEFAKE^Dulcinea_PID-77310593/20191103"  # how hospital exports name folders
SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless, ImplicitVRLittleEndian,
            DeflatedExplicitVRLittleEndian)
WINDOWED = ("mono2_16bit_rescale_window", "signed_rescale_window", "mono1_12bit_window", "rgb")


def _grey(cls: str, i: int, side: int = 256) -> np.ndarray:
    """A real scan, as its JPEG decodes, resized so that frames of one file match."""
    f = sorted((SHARED_DATA / "Training" / cls).iterdir())[i]
    return np.asarray(Image.fromarray(im.decode_grey(f.read_bytes())).resize((side, side)))


def _png(g: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """Ingests the export once; yields what the tests compare against."""
    if not (SHARED_DATA / "Training").is_dir():
        pytest.skip("shared data not found")
    root = tmp_path_factory.mktemp("dicom-ingest")
    src = real_subset(root / "src", per_class=3)
    made: dict[str, list[np.ndarray]] = {}  # SOURCE-relative path -> the frames it holds
    series: dict[str, str] = {}  # path -> the series it belongs to
    for k, cls in enumerate(CLASSES):
        for j in range(3):  # one series of three single-frame files, each in another syntax
            rel = f"Training/{cls}/{EXPORT}/IM{j:04d}"
            g = _grey(cls, 40 + j)
            uids = {"SeriesInstanceUID": f"1.2.826.0.1.3680043.8.498.7{k}",
                    "SOPInstanceUID": f"1.2.3.{k}.{j}"}
            _write(src / rel, make_dicom([g], WINDOWED[(k + j) % 4], SYNTAXES[(k + j) % 6], uids=uids))
            made[rel], series[rel] = [g], f"{k}-a"
        rel = f"Training/{cls}/{EXPORT}/multiframe.dcm"  # a second series: one file, three frames
        frames = [_grey(cls, 50 + j) for j in range(3)]
        _write(src / rel, make_dicom(frames, WINDOWED[k], RLELossless,
                                     uids={"SeriesInstanceUID": f"1.2.826.0.1.3680043.8.498.8{k}"}))
        made[rel], series[rel] = frames, f"{k}-b"
    bad = {}  # path -> the reason it must be rejected with
    for name, (data, reason) in bad_dicoms(_grey("glioma", 60)).items():
        if reason:
            bad[f"Training/glioma/{EXPORT}/bad/{name}"] = reason
            _write(src / f"Training/glioma/{EXPORT}/bad/{name}", data)
    outside = f"{EXPORT}/IM0001"  # an export dropped outside the class folders
    _write(src / outside, make_dicom([_grey("notumor", 61)]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dicom.SALT_ENV, SALT)
        res = ingest(str(src), str(root / "lake"), IngestConfig(workers=1, val_fraction=0.25,
                                                                 test_fraction=0.25))
        again = ingest(str(src), str(root / "lake"), IngestConfig(workers=1, val_fraction=0.25,
                                                                   test_fraction=0.25))
    rows = []
    for split in SPLITS:
        for f in split_files(res.location, res.manifest, split):
            rows += [dict(r, split=split) for r in pq.read_table(f).to_pylist()]
    return {"res": res, "again": again, "src": src, "root": root, "rows": rows, "made": made,
            "series": series, "bad": bad, "outside": outside}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _name(rel: str, frame: int | None = None) -> str:
    return pseudonym(rel, list(CLASSES), SALT.encode(), frame)


def _values(v):
    """Every leaf of a row's value as text (and bytes for binary cells)."""
    if isinstance(v, dict):
        for x in v.values():
            yield from _values(x)
    elif isinstance(v, list):
        for x in v:
            yield from _values(x)
    elif isinstance(v, bytes):
        yield v.decode("latin-1")
    elif v is not None:
        yield str(v)


def test_no_patient_data_or_salt_in_any_row_column_or_file(lake):
    planted = phi_values() + [SALT, "QUIXOTEFAKE", "77310593", "20191103"]
    rows = lake["rows"]
    assert list(rows[0]) == SCHEMA.names + ["split"]  # every column was read
    for r in rows:
        for column, v in r.items():
            for text in _values(v):
                assert not any(p in text for p in planted), (column, text[:200])
    written = [f for f in lake["res"].location.files()]
    assert {f.name for f in written} >= {"inventory.csv", "rejects.csv", "manifest.json"}
    for f in written:  # inventory, rejects, manifest, and the shards' raw bytes
        text = f.read_bytes().decode("latin-1")
        assert not any(p in text for p in planted), f.uri
    manifest = json.dumps(lake["res"].manifest)
    assert lake["res"].manifest["dicom"]["salt_id"] == dicom.salt_id(SALT.encode())
    assert SALT not in manifest


def test_one_row_per_slice_with_its_frame_tags_and_the_picture_it_was_made_from(lake):
    rows = {r["path"]: r for r in lake["rows"]}
    for rel, frames in lake["made"].items():
        for k, g in enumerate(frames):
            r = rows[_name(rel, k)]
            assert r["frame"] == k and r["format"] == "DICOM" and r["mode"] == "L"
            assert r["dicom"]["frames"] == len(frames) and r["dicom"]["modality"] == "MR"
            assert r["class_name"] == rel.split("/")[1] and r["source_split"] == "Training"
            # the windows map the stored values back exactly: the model sees the same input
            assert np.array_equal(preprocess(r["image"], 160), preprocess(_png(g), 160)), rel
    jpegs = [r for r in lake["rows"] if r["format"] == "JPEG"]
    assert len(jpegs) == 3 * len(CLASSES) and all(r["dicom"] is None and r["frame"] == 0 for r in jpegs)
    counts = lake["res"].manifest["dicom"]
    assert counts["slices_accepted"] == 6 * len(CLASSES) and counts["series"] == 2 * len(CLASSES)
    assert lake["again"].version == lake["res"].version and not lake["again"].created  # stable


def test_slices_of_one_series_never_straddle_splits(lake):
    by_series: dict[str, set[str]] = {}
    for r in lake["rows"]:
        if r["dicom"]:
            by_series.setdefault(r["dicom"]["series"], set()).add(r["split"])
    assert len(by_series) == 2 * len(CLASSES)
    assert all(len(s) == 1 for s in by_series.values()), by_series
    assert len(set().union(*by_series.values())) > 1  # the series did go to several splits
    assert lake["res"].manifest["duplicates"]["groups_straddling_splits"] == 0


def test_bad_and_stray_dicom_files_are_rejected_under_pseudonyms(lake):
    inv = {r["path"]: r for r in csv.DictReader(io.StringIO(
        (lake["res"].location / "inventory.csv").read_bytes().decode()))}
    for rel, reason in lake["bad"].items():
        assert inv[_name(rel)]["status"] == "rejected" and inv[_name(rel)]["reason"] == reason
        assert _name(rel).startswith("Training/glioma/dicom-")
    assert inv[_name(lake["outside"])]["reason"] == im.UNKNOWN_CLASS
    assert set(lake["bad"].values()) >= {getattr(im, n) for n in dir(im) if n.startswith("DICOM_")}


def test_without_a_salt_ingest_refuses_and_writes_nothing(lake, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(dicom.SALT_ENV, raising=False)
    with pytest.raises(im.SaltMissing):
        ingest(str(lake["src"]), str(tmp_path / "lake"), IngestConfig(workers=1))
    assert main(["ingest", str(lake["src"]), str(tmp_path / "lake2"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and dicom.SALT_ENV in err[0]
    assert not list((tmp_path / "lake").rglob("*.csv")) and not list((tmp_path / "lake2").rglob("*.csv"))
