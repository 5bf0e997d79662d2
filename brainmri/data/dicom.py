"""DICOM in: a file recognised by content becomes one 8-bit greyscale slice per frame.

What the pipeline keeps of a DICOM file is decided here, once:

- pixels: modality rescale (slope/intercept, or the Modality LUT), then the VOI window
  (centre/width, or the VOI LUT; without either, minimum to 99.9th percentile), MONOCHROME1
  inverted; colour (RGB, YBR, PALETTE COLOR) goes to grey by the same rule as a JPEG. Each
  frame is stored as a lossless 8-bit PNG: exactly what the model's preprocessing decodes
  (it works on uint8), so every reader of a dataset stays unchanged, and no DICOM header --
  hence no patient data -- is stored with the pixels.
- tags: `TAGS`, a de-identified subset that matters for quality, plus a keyed hash
  (HMAC-SHA256 with a secret salt) of the study and series UIDs for grouping. Names, IDs,
  dates, free text and clear UIDs never leave this module.

pydicom and its decoders are imported on use: reading a dataset's PNG rows needs neither.
Decoders: uncompressed (implicit/explicit VR, little or big endian, deflated) and RLE by
pydicom itself; JPEG baseline/extended/lossless, JPEG-LS and JPEG 2000 by pylibjpeg
(pylibjpeg-libjpeg, pylibjpeg-openjpeg) or Pillow.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from . import image_rules as rules

SALT_ENV = "BRAINMRI_DICOM_SALT"
MIN_SALT = 16  # characters: a short salt can be brute-forced against known UIDs
MAGIC_AT = 128  # the preamble's length; "DICM" follows it in a Part 10 file
# The first tag of a file without the preamble (raw dataset): group 0002 or 0008, little endian
HEADERLESS_STARTS = (b"\x02\x00", b"\x08\x00")
PERCENTILE_WINDOW = (0.0, 99.9)  # the window of a file without one (percentile_window)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")
# de-identified tags kept per row (the keyword in the file -> the column), all technical
TAGS = {
    "Modality": "modality",
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model",
    "SequenceName": "sequence_name",
    "ProtocolName": "protocol_name",
    "PixelSpacing": "pixel_spacing",
    "SliceThickness": "slice_thickness",
    "Rows": "rows",
    "Columns": "columns",
    "BitsStored": "bits_stored",
    "PhotometricInterpretation": "photometric",
}


# The row's `dicom` column (null for other images): the keys of DicomSlice.tags
ARROW_TYPE = pa.struct([
    ("modality", pa.string()), ("manufacturer", pa.string()), ("manufacturer_model", pa.string()),
    ("sequence_name", pa.string()), ("protocol_name", pa.string()),
    ("pixel_spacing", pa.list_(pa.float64())), ("slice_thickness", pa.float64()),
    ("rows", pa.int32()), ("columns", pa.int32()), ("bits_stored", pa.int32()),
    ("photometric", pa.string()), ("transfer_syntax", pa.string()), ("frames", pa.int32()),
    ("window", pa.string()),  # voi_window | voi_lut | percentile | colour
    ("study", pa.string()), ("series", pa.string()),  # keyed hashes of the UIDs
])


@dataclass
class DicomSlice:
    pixels: np.ndarray  # uint8 HxW, windowed, as a radiologist's display shows it
    frame: int
    tags: dict  # TAGS' columns + transfer_syntax, window, frames, study, series (hashed)


# -- recognising --------------------------------------------------------------------------------
def has_magic(data: bytes) -> bool:
    return data[MAGIC_AT:MAGIC_AT + 4] == b"DICM"


def file_has_magic(full: str) -> bool:
    """For a local file that is otherwise never opened (outside the class folders); links
    are not followed."""
    try:
        if os.path.islink(full) or not os.path.isfile(full):
            return False
        with open(full, "rb") as f:
            return has_magic(f.read(MAGIC_AT + 4))
    except OSError:
        return False


def maybe_dicom(data: bytes) -> bool:
    """Cheap test: the Part 10 magic, or a first tag that a raw dataset starts with."""
    return has_magic(data) or data[:2] in HEADERLESS_STARTS


@contextlib.contextmanager
def quiet():
    """pydicom's warnings and log lines quote tag values (an invalid date, a name too long):
    patient data must not reach logs, so while a file is read they are dropped, and the
    value checks that emit them are off (a reject reason never quotes a value either)."""
    import pydicom.config

    settings = pydicom.config.settings
    mode, logger = settings.reading_validation_mode, logging.getLogger("pydicom")
    disabled = logger.disabled
    settings.reading_validation_mode, logger.disabled = pydicom.config.IGNORE, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode, logger.disabled = mode, disabled


def parse(data: bytes):
    """Bytes -> pydicom Dataset, or None when they are not DICOM at all. A file with the
    magic that does not parse is rejected (unreadable); one without is simply no DICOM.
    Call under quiet()."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_magic(data))
        for _ in ds.iterall():  # elements are parsed lazily: make a broken one fail here
            pass
    except Exception as e:
        if has_magic(data):
            raise rules.RejectedImage(rules.DICOM_UNREADABLE, type(e).__name__) from None
        return None
    if not has_magic(data) and not any(k in ds for k in (
            "SOPClassUID", "Modality", "PixelData", "StudyInstanceUID")):
        return None  # force=True parses almost anything: demand what a real dataset has
    return ds


# -- checking -------------------------------------------------------------------------------------
def transfer_syntax(ds):
    """The file's transfer syntax; for a raw dataset (no file meta) the encoding pydicom
    found while reading it, recorded so the pixel decoders know it too."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return UID(str(ds.file_meta.TransferSyntaxUID))


def check_decodable(ds) -> None:
    """Pixel data present, and a transfer syntax that this installation can decode."""
    import pydicom.pixels as px
    from pydicom.uid import MPEGTransferSyntaxes

    if "PixelData" not in ds:
        kind = next((k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds), "")
        if kind:
            raise rules.RejectedImage(rules.UNSUPPORTED_MODE, f"{kind} (float pixels)")
        raise rules.RejectedImage(rules.DICOM_NO_PIXELS, "no Pixel Data element")
    uid = transfer_syntax(ds)
    if uid in MPEGTransferSyntaxes:
        raise rules.RejectedImage(rules.DICOM_VIDEO, f"{uid.name} ({uid})")
    if not uid.is_transfer_syntax:
        raise rules.RejectedImage(rules.DICOM_UNSUPPORTED_SYNTAX, _uid_text(uid))
    try:
        available = px.get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise rules.RejectedImage(rules.DICOM_NO_DECODER, f"{uid.name} ({uid})")


def _uid_text(uid) -> str:
    # a private transfer syntax UID is a vendor's, not a patient's; keep it short anyway
    return f"transfer syntax {str(uid)[:64]}"


def check_geometry(ds, limits: rules.ImageLimits) -> tuple[int, int, int]:
    """(rows, columns, frames), refusing missing, tiny, huge or inconsistent dimensions."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        spp, bits = int(getattr(ds, "SamplesPerPixel", 1)), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as e:
        raise rules.RejectedImage(rules.DICOM_INCONSISTENT,
                                  f"image pixel module: {type(e).__name__}") from None
    if min(rows, cols, frames, spp) < 1:
        raise rules.RejectedImage(rules.DICOM_INCONSISTENT, f"{rows}x{cols}, {frames} frames, {spp} samples")
    if bits not in (8, 16, 32):
        raise rules.RejectedImage(rules.UNSUPPORTED_MODE, f"{bits} bits allocated")
    if rows * cols > limits.max_pixels or rows * cols * frames > limits.max_voxels:
        raise rules.RejectedImage(rules.TOO_LARGE, f"{cols}x{rows} pixels x {frames} frames")
    if min(rows, cols) < limits.min_side:
        raise rules.RejectedImage(rules.TOO_SMALL, f"{cols}x{rows} < {limits.min_side} px")
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip()
    one_sample = MONOCHROME + ("PALETTE COLOR",)
    if photometric not in MONOCHROME + COLOUR or (spp == 1) != (photometric in one_sample):
        raise rules.RejectedImage(rules.UNSUPPORTED_MODE, f"{photometric[:32] or 'no'} photometric "
                                                    f"interpretation with {spp} samples per pixel")
    if not transfer_syntax(ds).is_compressed:  # native data: its length is known up front
        want = rows * cols * frames * spp * (bits // 8)
        have = len(ds.PixelData)
        if have < want:
            raise rules.RejectedImage(rules.DICOM_INCONSISTENT, f"pixel data has {have} bytes, "
                                   f"{cols}x{rows}x{frames} frames x {spp} x {bits} bits need {want}")
    return rows, cols, frames


# -- pixels ---------------------------------------------------------------------------------------
def _frame_item(ds, frame: int, sequence: str):
    """The functional-group item of an enhanced multi-frame file that holds `sequence`
    for this frame (per-frame first, then shared), or None."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = getattr(ds, groups, None)
        if seq and len(seq) > i and sequence in seq[i] and len(seq[i][sequence].value):
            return seq[i][sequence].value[0]
    return None


def _lookup(ds, frame: int, sequence: str, keyword: str):
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    item = _frame_item(ds, frame, sequence)
    return item.get(keyword) if item is not None else None


def _first(v) -> float:
    """A multi-valued window (several presets) -> the first, the file's default."""
    from pydicom.multival import MultiValue

    return float(v[0]) if isinstance(v, (list, tuple, MultiValue)) else float(v)


def modality_values(arr: np.ndarray, ds, frame: int) -> np.ndarray:
    import pydicom.pixels as px

    if "ModalityLUTSequence" in ds:
        return px.apply_rescale(arr, ds).astype(np.float64)
    slope = _lookup(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _lookup(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    out = arr.astype(np.float64)
    if slope is not None:
        out *= float(slope)
    if intercept is not None:
        out += float(intercept)
    return out


def window(values: np.ndarray, ds, frame: int) -> tuple[np.ndarray, str]:
    """Modality values -> float in [0, 255] and how: 'voi_window', 'voi_lut' or 'percentile'."""
    centre = _lookup(ds, frame, "FrameVOILUTSequence", "WindowCenter")
    width = _lookup(ds, frame, "FrameVOILUTSequence", "WindowWidth")
    if centre is not None and width is not None and _first(width) > 0:
        fn = str(_lookup(ds, frame, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").upper()
        return voi_window(values, _first(centre), _first(width), fn), "voi_window"
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        return _voi_lut(values, ds), "voi_lut"
    return percentile_window(values), "percentile"


def voi_window(x: np.ndarray, c: float, w: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 onto [0, 255]."""
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0) * 255.0
    if w < 1:  # LINEAR needs width >= 1; a narrower one is a threshold at the centre
        return np.where(x > c - 0.5, 255.0, 0.0)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0) * 255.0


def _voi_lut(values: np.ndarray, ds) -> np.ndarray:
    import pydicom.pixels as px

    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    out = px.apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
    return np.clip(out / float((1 << bits) - 1), 0.0, 1.0) * 255.0


def percentile_window(values: np.ndarray) -> np.ndarray:
    """No window in the file: from the minimum to the 99.9th percentile. Only the top is
    clipped (hot pixels would squeeze everything else into a few grey levels); the rest is
    left for preprocessing's own percentile normalisation, which runs after resizing and
    padding: clipping at its percentiles here already would shift them (measured on real
    scans: mean |difference| in model input up to 4.4 grey levels at p0.5/p99.5, 0.55 here)."""
    lo, hi = np.percentile(values, PERCENTILE_WINDOW)
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0


def to_grey(arr: np.ndarray, ds, frame: int, photometric: str) -> tuple[np.ndarray, str]:
    """One decoded frame -> uint8 greyscale and the windowing used."""
    if photometric in MONOCHROME:
        shown, how = window(modality_values(arr, ds, frame), ds, frame)
        if photometric == "MONOCHROME1":  # minimum is white
            shown = 255.0 - shown
        return np.rint(shown).astype(np.uint8), how
    if photometric == "PALETTE COLOR":
        import pydicom.pixels as px

        arr = px.apply_color_lut(arr, ds)
    if arr.dtype != np.uint8:  # 16-bit colour (or a 16-bit palette): to 8 bits by bit depth
        arr = (arr.astype(np.float64) / (65535.0 if arr.max() > 255 else 255.0) * 255.0).round()
        arr = arr.astype(np.uint8)
    # the JPEG path's conversion (image_rules.to_grey_u8), so colour exports look alike
    return np.asarray(rules.to_grey_u8(Image.fromarray(arr, mode="RGB"))), "colour"


# -- the de-identified record -----------------------------------------------------------------------
_PRINTABLE = re.compile(r"[^ -~]")


def _clean(v) -> str | None:
    """A text tag as short printable ASCII; None when absent."""
    if v is None or str(v).strip() == "":
        return None
    return _PRINTABLE.sub("", str(v)).strip()[:64]


def quality_tags(ds, frame: int) -> dict:
    out = {col: _clean(ds.get(kw)) for kw, col in TAGS.items()}
    if out["sequence_name"] is None:  # enhanced MR names it PulseSequenceName
        out["sequence_name"] = _clean(ds.get("PulseSequenceName"))
    spacing = _lookup(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    thickness = _lookup(ds, frame, "PixelMeasuresSequence", "SliceThickness")
    out["pixel_spacing"] = [float(s) for s in spacing][:2] if spacing else None
    out["slice_thickness"] = float(thickness) if thickness not in (None, "") else None
    for k in ("rows", "columns", "bits_stored"):
        out[k] = int(out[k]) if out[k] is not None else None
    return out


def salt_or_random() -> bytes:
    """For outputs that only need private, unique names (evaluation reports): the salt if
    set, else a random one for this run (pseudonyms then differ between runs)."""
    import secrets

    return salt() if os.environ.get(SALT_ENV) else secrets.token_bytes(32)


def salt() -> bytes:
    """The secret for pseudonyms and UID hashes, from the environment only (never a config
    value: configs are written into manifests). Refuses a missing or short one."""
    value = os.environ.get(SALT_ENV, "")
    if len(value) < MIN_SALT:
        raise rules.SaltMissing(f"DICOM files need a secret salt: set {SALT_ENV} to at least "
                             f"{MIN_SALT} characters (keep it; the same salt groups series across ingests)")
    return value.encode()


def keyed(salt_: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of value under salt, per kind ('uid', 'path'), 20 hex characters."""
    return hmac.new(salt_, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()[:20]


def salt_id(salt_: bytes) -> str:
    """Tells whether two datasets used the same salt without revealing it."""
    return keyed(salt_, "salt-id", "brainmri")[:12]


def _uid_hash(ds, keyword: str, salt_: bytes | None) -> str | None:
    uid = ds.get(keyword)
    if not uid or salt_ is None:
        return None
    return keyed(salt_, "uid", str(uid))


# -- reading ------------------------------------------------------------------------------------------
def read_slices(ds, limits: rules.ImageLimits, salt_: bytes | None = None) -> list[DicomSlice]:
    """A parsed dataset -> its frames as windowed uint8 slices, or RejectedImage."""
    check_decodable(ds)
    rows, cols, frames = check_geometry(ds, limits)
    photometric = str(ds.PhotometricInterpretation).strip()
    uid = transfer_syntax(ds)
    common = {"transfer_syntax": str(uid), "frames": frames,
              "study": _uid_hash(ds, "StudyInstanceUID", salt_),
              "series": _uid_hash(ds, "SeriesInstanceUID", salt_)}
    out = []
    for frame, arr in enumerate(_frames(ds, frames)):
        if arr.shape[:2] != (rows, cols):
            raise rules.RejectedImage(rules.DICOM_INCONSISTENT, f"frame {frame} decoded as "
                                   f"{arr.shape[1]}x{arr.shape[0]}, header says {cols}x{rows}")
        grey, how = to_grey(arr, ds, frame, photometric)
        out.append(DicomSlice(grey, frame, {**quality_tags(ds, frame), **common, "window": how}))
    return out


def _frames(ds, frames: int):
    """Frame by frame (a volume never sits in memory decoded whole); decoder failures are
    the file's fault: corrupt or truncated."""
    import pydicom.pixels as px

    it = px.iter_pixels(ds, raw=False)
    for i in range(frames):
        try:
            arr = next(it)
        except StopIteration:
            raise rules.RejectedImage(rules.DICOM_INCONSISTENT,
                                      f"{frames} frames declared, {i} found") from None
        except rules.RejectedImage:
            raise
        except Exception as e:  # each decoder raises its own types
            raise rules.RejectedImage(rules.CORRUPT, f"frame {i}: {type(e).__name__}") from None
        yield arr


def encode_slice(pixels: np.ndarray) -> bytes:
    """uint8 slice -> PNG bytes (lossless; fixed settings, so the same pixels give the same
    bytes and sha256 under the pinned Pillow)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, "PNG", compress_level=6)
    return buf.getvalue()
