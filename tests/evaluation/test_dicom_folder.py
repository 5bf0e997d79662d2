"""`brainmri evaluate` on an image folder holding DICOM, without Ray: the folder source and
the per-batch loader the Ray pipeline runs. One row per slice, DICOM rows renamed to
pseudonyms before anything is written, galleries read back by pseudonym."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import RLELossless

from brainmri.data import images as im
from brainmri.data.transforms import preprocess
from brainmri.evaluation.inference import load_folder_batch
from brainmri.evaluation.sources import default_limits, open_source

from support.data import CLASSES, SHARED_DATA
from support.dicom import bad_dicoms, make_dicom, phi_values

EXPORT = "QUIXOTEFAKE^Dulcinea_PID-77310593"
SIZE = 96


def _grey(cls: str, i: int) -> np.ndarray:
    path = sorted((SHARED_DATA / "Training" / cls).iterdir())[i]
    return np.asarray(Image.fromarray(im.decode_grey(path.read_bytes())).resize((200, 200)))


def _png(g: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    if not (SHARED_DATA / "Training").is_dir():
        pytest.skip("shared data not found")
    frames = [_grey(CLASSES[0], 300), _grey(CLASSES[0], 301)]
    files = {f"{CLASSES[0]}/{EXPORT}/IM0001": make_dicom(frames, "signed_rescale_window", RLELossless),
             f"{CLASSES[1]}/{EXPORT}/bad.dcm": bad_dicoms(frames[0])["no_pixels.dcm"][0],
             f"{EXPORT}/IM0002": make_dicom(frames[:1]),  # outside the class folders
             f"{CLASSES[2]}/scan.png": _png(frames[0])}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    return tmp_path, frames


def test_slices_become_rows_and_dicom_paths_pseudonyms(folder, monkeypatch):
    monkeypatch.delenv("BRAINMRI_DICOM_SALT", raising=False)  # evaluation does not need one
    root, frames = folder
    src = open_source(str(root), list(CLASSES))
    assert len(src.walk_rejects) == 1 and src.walk_rejects[0][1] == im.UNKNOWN_CLASS
    batch = {"path": np.asarray([p for p, _ in src.files], dtype=object),
             "label": np.asarray([label for _, label in src.files])}
    out = load_folder_batch(batch, src.location.uri, SIZE, default_limits())
    got = sorted(zip(out["path"], out["frame"], out["dicom"], out["reason"], strict=True))
    multi = f"{CLASSES[0]}/{EXPORT}/IM0001"
    assert got == [(multi, 0, True, ""), (multi, 1, True, ""),
                   (f"{CLASSES[1]}/{EXPORT}/bad.dcm", -1, True, im.DICOM_NO_PIXELS),
                   (f"{CLASSES[2]}/scan.png", -1, False, "")]
    for i in np.flatnonzero(out["frame"] >= 0):  # the model input of the picture itself
        assert np.array_equal(out["x"][i], preprocess(_png(frames[out["frame"][i]]), SIZE))
    shown = src.pseudonymise(out["path"], out["dicom"], out["frame"])
    assert len(set(shown)) == len(shown) and f"{CLASSES[2]}/scan.png" in shown
    written = " ".join(list(shown) + [p for p, _, _ in src.walk_rejects])  # what reports carry
    assert not any(v in written for v in phi_values()), written
    slices = [p for p, f in zip(shown, out["frame"], strict=True) if f >= 0]
    images = src.read_bytes(slices)  # the galleries' second read, by pseudonym
    for p in slices:
        k = int(p.rsplit("#", 1)[1])
        assert np.array_equal(im.decode_grey(images[p]), frames[k])
