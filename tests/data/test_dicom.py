"""DICOM files made from real scans (tests/support/dicom.py) read back by `inspect_scans`:
every photometric interpretation, rescale/window setting and transfer syntax must give the
picture of the JPEG it was made from; bad files get their reason; no patient data leaves.

Tolerances, measured on real scans: a slice whose window maps the stored values back onto
the JPEG's grey levels equals the JPEG's decoded pixels exactly (YBR_FULL: +-1, the colour
conversion rounds), so the model's input equals the image path's for the same pixels.
Against `preprocess(jpeg)` itself the model input differs by up to 2.3 grey levels on
average (measured on 24 scans), all of it from the JPEG path decoding at a reduced DCT scale
(`draft`), which a PNG slice cannot do. Files without a window (percentile window) come
within 0.6 grey levels on average.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pydicom.pixels as px
import pytest
from PIL import Image
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from brainmri.data import dicom
from brainmri.data import images as im
from brainmri.data.transforms import preprocess

from support.data import SHARED_DATA
from support.dicom import (
    PHI,
    VARIANTS,
    bad_dicoms,
    enhanced_multiframe,
    jpeg_in_dicom,
    jpeg_lossless_dicom,
    make_dataset,
    make_dicom,
    phi_values,
    to_bytes,
)

SALT = b"test-salt-0123456789"
SIZE = 160
# every syntax a round trip covers: made by an encoder here (pydicom's own, pylibjpeg-openjpeg,
# pyjpegls, or support.dicom.jpeg_lossless_sv1), decoded by the reader
ROUND_TRIP = (ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless,
              JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1)
# decoded by an installed plugin, but no encoder here: checked by the decoder's presence only
DECODER_ONLY = (JPEGLossless, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2KLossless)


def _real(cls: str, i: int) -> bytes:
    path = SHARED_DATA / "Training" / cls / f"Tr-{cls[:2]}Tr_{i:04d}.jpg"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return path.read_bytes()


@pytest.fixture(scope="module")
def scan():
    """(jpeg bytes, its decoded grey pixels): a real 512x512 glioma slice."""
    jpeg = _real("glioma", 1)
    return jpeg, im.decode_grey(jpeg)


def _png(g: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, "PNG")
    return buf.getvalue()


def _one(data: bytes, salt: bytes | None = SALT) -> im.Scan:
    scans = im.inspect_scans(data, salt=salt)
    assert len(scans) == 1
    return scans[0]


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(int) - b.astype(int))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_photometric_and_window_shows_the_jpeg_picture(scan, variant):
    jpeg, g = scan
    s = _one(make_dicom([g], variant))
    shown = im.decode_grey(s.image)  # what every reader of the row decodes
    x = preprocess(s.image, SIZE)  # what the model sees
    if variant == "mono2_8bit_no_window":
        assert s.dicom["window"] == "percentile"
        assert _diff(x, preprocess(_png(g), SIZE)).mean() < 1.0
    else:
        assert _diff(shown, g).max() <= (1 if variant == "ybr_full" else 0)
        assert _diff(x, preprocess(_png(g), SIZE)).max() <= (2 if variant == "ybr_full" else 0)
    assert _diff(x, preprocess(jpeg, SIZE)).mean() < 2.5  # the JPEG path decodes at reduced scale
    assert s.info.format == "DICOM" and (s.info.height, s.info.width) == g.shape and s.frame == 0
    assert s.dicom["photometric"] == {"mono1_12bit_window": "MONOCHROME1", "rgb": "RGB",
                                      "ybr_full": "YBR_FULL"}.get(variant, "MONOCHROME2")


@pytest.mark.parametrize("syntax", ROUND_TRIP, ids=lambda u: u.name)
def test_round_trip_through_each_encoder_is_lossless(scan, syntax):
    _, g = scan
    if syntax == JPEGLosslessSV1:
        data = jpeg_lossless_dicom(make_dataset([g], "mono2_16bit_rescale_window"))
    else:
        data = make_dicom([g], "mono2_16bit_rescale_window", syntax)
    s = _one(data)
    assert np.array_equal(im.decode_grey(s.image), g)
    assert s.dicom["transfer_syntax"] == str(syntax)


def test_decoders_for_the_other_common_syntaxes_are_installed():
    for syntax in DECODER_ONLY:
        assert px.get_decoder(syntax).is_available, syntax.name


def test_jpeg_baseline_encapsulated_as_is_and_a_headerless_dataset(scan):
    jpeg, g = scan
    s = _one(jpeg_in_dicom(jpeg, g.shape))
    assert s.dicom["transfer_syntax"] == JPEGBaseline8Bit and s.dicom["window"] == "percentile"
    assert _diff(preprocess(s.image, SIZE), preprocess(_png(g), SIZE)).mean() < 1.0
    raw = make_dicom([g], preamble=False)  # no preamble, no file meta: recognised by its content
    assert raw[128:132] != b"DICM" and np.array_equal(im.decode_grey(_one(raw).image), g)


def test_a_multiframe_file_gives_one_scan_per_frame_in_order(scan):
    gs = [scan[1], im.decode_grey(_real("glioma", 2)), im.decode_grey(_real("glioma", 3))]
    assert {g.shape for g in gs} == {(512, 512)}
    scans = im.inspect_scans(make_dicom(gs), salt=SALT)
    assert [s.frame for s in scans] == [0, 1, 2]
    for s, g in zip(scans, gs, strict=True):
        assert np.array_equal(im.decode_grey(s.image), g) and s.dicom["frames"] == 3
    assert len({s.info.sha256 for s in scans}) == 3 and len({s.dicom["series"] for s in scans}) == 1
    # enhanced MR: rescale and window per frame, in functional groups only
    enhanced = im.inspect_scans(enhanced_multiframe(gs[:2]), salt=SALT)
    for s, g in zip(enhanced, gs[:2], strict=True):
        assert np.array_equal(im.decode_grey(s.image), g) and s.dicom["window"] == "voi_window"


def test_bad_dicom_files_get_their_reason(scan):
    bad = bad_dicoms(scan[1])
    reasons = {getattr(im, n) for n in dir(im) if n.startswith("DICOM_")}
    assert reasons <= {r for _, r in bad.values()}  # every DICOM reason is exercised
    for name, (data, reason) in bad.items():
        if not reason:
            assert im.inspect_scans(data)  # the control: a good headerless file
            continue
        with pytest.raises(im.RejectedImage) as e:
            im.inspect_scans(data, salt=SALT)
        assert e.value.reason == reason, name
        assert e.value.dicom, name  # so its path becomes a pseudonym
        assert not any(v in e.value.detail for v in phi_values()), name


def test_not_dicom_and_plain_images_are_unchanged(scan):
    jpeg, _ = scan
    assert _one(jpeg).image == jpeg and _one(jpeg).dicom is None
    with pytest.raises(im.RejectedImage) as e:  # starts like a raw dataset, is none
        im.inspect_scans(b"\x08\x00" + b"patient notes, not a scan\n" * 20)
    assert e.value.reason == im.NOT_IMAGE and not e.value.dicom


def test_tags_are_deidentified_and_uids_hashed_under_the_salt(scan):
    s = _one(make_dicom([scan[1]]))
    assert set(s.dicom) == set(dicom.ARROW_TYPE.names)
    assert {k: s.dicom[k] for k in ("modality", "manufacturer", "manufacturer_model", "sequence_name",
                                    "protocol_name", "pixel_spacing", "slice_thickness", "rows",
                                    "columns", "bits_stored")} == {
        "modality": "MR", "manufacturer": "ACME Medical", "manufacturer_model": "Magnus 3T",
        "sequence_name": "*tse2d1_15", "protocol_name": "t2_tse_tra", "pixel_spacing": [0.45, 0.45],
        "slice_thickness": 5.0, "rows": 512, "columns": 512, "bits_stored": 16}
    text = repr(s.dicom)
    assert not any(v in text for v in phi_values())
    assert s.dicom["series"] == dicom.keyed(SALT, "uid", PHI["SeriesInstanceUID"])
    other = _one(make_dicom([scan[1]]), salt=b"another-salt-000000")
    assert other.dicom["series"] != s.dicom["series"] and other.image == s.image
    assert _one(make_dicom([scan[1]]), salt=None).dicom["series"] is None


def test_salt_comes_from_the_environment_only(monkeypatch):
    monkeypatch.delenv(dicom.SALT_ENV, raising=False)
    with pytest.raises(im.SaltMissing, match=dicom.SALT_ENV):
        dicom.salt()
    monkeypatch.setenv(dicom.SALT_ENV, "short")
    with pytest.raises(im.SaltMissing):
        dicom.salt()
    monkeypatch.setenv(dicom.SALT_ENV, "a-long-enough-secret")
    assert dicom.salt() == b"a-long-enough-secret"


def test_reading_logs_and_warns_no_tag_values(scan, caplog):
    ds = make_dataset([scan[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # an invalid UID: pydicom's reader warns and logs, quoting the value
        ds.ReferencedSOPInstanceUID = "1.2." + PHI["PatientID"]
        data = to_bytes(ds)
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _one(data).dicom["window"] == "voi_window"
    said = " ".join(str(w.message) for w in caught) + caplog.text
    assert not any(v in said for v in phi_values()), said[:500]
