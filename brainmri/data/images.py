"""Checking and decoding image files: one set of rules for ingest, evaluate and predict.

`inspect_scans` decides what a file holds: one scan (JPEG, PNG, ...: the file itself) or,
for DICOM (recognised by content, see dicom.py), one scan per frame, each an 8-bit PNG of
the windowed slice; or why the file is refused. `inspect_image` checks one encoded image;
`decode_grey` turns a stored image into a uint8 greyscale array. All work on bytes, so the
same code serves local files, S3 objects and Parquet cells. The reasons a file is refused,
the limits and the grey conversion are image_rules.py's, which dicom.py applies too (images
calls dicom, never the reverse); this module re-exports them.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .image_rules import (  # noqa: F401  (re-exported: callers know the rules as images.<name>)
    CORRUPT,
    DICOM_INCONSISTENT,
    DICOM_NO_DECODER,
    DICOM_NO_PIXELS,
    DICOM_UNREADABLE,
    DICOM_UNSUPPORTED_SYNTAX,
    DICOM_VIDEO,
    EMPTY,
    HIDDEN,
    LABEL_CONFLICT,
    NOT_IMAGE,
    NOT_REGULAR,
    SYMLINK_OUTSIDE,
    TOO_LARGE,
    TOO_SMALL,
    UNDECODABLE_NAME,
    UNKNOWN_CLASS,
    UNREADABLE,
    UNSUPPORTED_FORMAT,
    UNSUPPORTED_MODE,
    ImageLimits,
    RejectedImage,
    SaltMissing,
    to_grey_u8,
)

THUMB = 32
FORMATS = {"JPEG", "PNG", "TIFF", "BMP", "WEBP"}
# Greyscale and colour exports, 8 and 16 bit. Bilevel ("1"), CMYK, float and other
# exotic modes are refused rather than guessed at.
MODES = {"L", "LA", "P", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass
class ImageInfo:
    sha256: str
    phash: int  # 64-bit perceptual hash, as a signed int64 so Parquet/Arrow store it natively
    height: int
    width: int
    mode: str
    format: str
    n_bytes: int
    thumb: bytes  # 32x32 greyscale, to confirm near-duplicate candidates (see dedup.py)
    # pHash of the left-right mirror image: the public data holds mirrored copies of scans
    # (about half of a random test split has one in training), which training's flips make
    # the same image (dedup.py)
    phash_mirror: int


@dataclass
class Scan:
    """One image a file holds: the file itself, or one frame of a DICOM file."""

    image: bytes  # what a dataset row stores: the original bytes, or the slice as PNG
    info: ImageInfo  # of `image` (sha256, pHash, size); n_bytes and format describe the file
    frame: int = 0
    dicom: dict | None = None  # a DICOM slice's de-identified tags (dicom.TAGS, hashed UIDs)


def _phashes(grey: Image.Image) -> tuple[int, int]:
    """pHash of the image and of its left-right mirror. imagehash.phash first resizes to
    32x32 (LANCZOS); that resize is done once here and the mirror taken of it (a resize to the
    size an image already has is a copy, so the image's hash is exactly imagehash's)."""
    # imported here: decoding for training and inference (transforms.preprocess) needs no
    # hashing library, so a bare GPU machine with only PyTorch and Pillow can run it
    import imagehash

    small = grey.resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS)
    return (_to_int64(imagehash.phash(small)),
            _to_int64(imagehash.phash(small.transpose(Image.Transpose.FLIP_LEFT_RIGHT))))


PHASH_SIDE = 32  # imagehash.phash's own resize: hash_size 8 x highfreq_factor 4


def _to_int64(h) -> int:
    u = int(str(h), 16)
    return u - (1 << 64) if u >= (1 << 63) else u


def inspect_image(data: bytes, limits: ImageLimits = ImageLimits()) -> ImageInfo:
    """Validate encoded image bytes fully (header, size, complete decode) or raise RejectedImage."""
    if len(data) == 0:
        raise RejectedImage(EMPTY)
    if len(data) > limits.max_bytes:
        raise RejectedImage(TOO_LARGE, f"{len(data)} bytes > {limits.max_bytes}")
    sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, mode, (w, h) = img.format, img.mode, img.size
            if fmt not in FORMATS:
                raise RejectedImage(UNSUPPORTED_FORMAT, str(fmt))
            if w * h > limits.max_pixels:
                raise RejectedImage(TOO_LARGE, f"{w}x{h} pixels")
            if mode not in MODES:
                raise RejectedImage(UNSUPPORTED_MODE, mode)
            if min(w, h) < limits.min_side:
                raise RejectedImage(TOO_SMALL, f"{w}x{h} < {limits.min_side} px")
            img.load()  # full decode: truncated or corrupt data fails here
            grey = to_grey_u8(img)
    except RejectedImage:
        raise
    except UnidentifiedImageError as e:
        # PIL names the in-memory file by its address: drop it so the detail is stable
        raise RejectedImage(NOT_IMAGE, re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RejectedImage(TOO_LARGE, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise RejectedImage(CORRUPT, str(e)) from None
    phash, phash_mirror = _phashes(grey)
    return ImageInfo(
        sha256=sha,
        phash=phash,
        phash_mirror=phash_mirror,
        thumb=grey.resize((THUMB, THUMB), Image.BILINEAR).tobytes(),
        height=h,
        width=w,
        mode=mode,
        format=fmt,
        n_bytes=len(data),
    )


def inspect_scans(data: bytes, limits: ImageLimits = ImageLimits(),
                  salt: bytes | None = None) -> list[Scan]:
    """What a file holds, fully checked: [one Scan] for an image, one per frame for DICOM
    (their UIDs hashed under `salt`, or left out without one); else RejectedImage."""
    # imported here: decoding (decode_grey) needs neither dicom.py nor the pyarrow it imports
    from . import dicom

    if data and dicom.maybe_dicom(data):
        with dicom.quiet():
            try:
                if len(data) > limits.max_bytes and dicom.has_magic(data):
                    raise RejectedImage(TOO_LARGE, f"{len(data)} bytes > {limits.max_bytes}")
                ds = dicom.parse(data)
                if ds is not None:
                    return [_dicom_scan(s, len(data), limits, dicom)
                            for s in dicom.read_slices(ds, limits, salt)]
            except RejectedImage as e:
                e.dicom = True  # its path is written as a pseudonym too (walk.pseudonym)
                raise
    return [Scan(data, inspect_image(data, limits))]


def _dicom_scan(s, n_bytes: int, limits: ImageLimits, dicom) -> Scan:
    png = dicom.encode_slice(s.pixels)
    info = inspect_image(png, limits)
    info.format, info.n_bytes = "DICOM", n_bytes
    return Scan(png, info, s.frame, s.tags)


def decode_grey(data: bytes, draft_size: int | None = None) -> np.ndarray:
    """Stored original bytes -> HxW uint8 greyscale array.

    draft_size lets the JPEG decoder skip work by decoding at a reduced scale that is still
    at least that many pixels on each side (exact DCT scaling, not a lossy shortcut for the
    sizes we train at)."""
    img = Image.open(io.BytesIO(data))
    if draft_size and img.format == "JPEG":
        img.draft("L", (draft_size, draft_size))
    img.load()
    return np.asarray(to_grey_u8(img))
