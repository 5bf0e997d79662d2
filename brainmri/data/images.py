"""Checking and decoding image files: one set of rules for ingest, evaluate and predict.

`inspect_image` decides whether a file is a usable scan (and why not); `decode_grey`
turns the stored original bytes into a uint8 greyscale array. Both work on bytes, so
the same code serves local files, S3 objects and Parquet cells.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Why a file was not accepted. The values are what reports and manifests carry.
EMPTY = "empty_file"
NOT_IMAGE = "not_an_image"
CORRUPT = "corrupt_or_truncated"
UNSUPPORTED_FORMAT = "unsupported_format"
UNSUPPORTED_MODE = "unsupported_mode_or_bit_depth"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large_or_decompression_bomb"
UNREADABLE = "unreadable"
# Reasons found while walking a folder, before a file is opened.
HIDDEN = "hidden_or_system_file"
UNKNOWN_CLASS = "outside_known_class_folder"
SYMLINK_OUTSIDE = "symlink_leaves_source"
NOT_REGULAR = "not_a_regular_file"
UNDECODABLE_NAME = "undecodable_file_name"  # not UTF-8: cannot be stored as a path
# Found when comparing files: the same bytes filed under two classes (ingest).
LABEL_CONFLICT = "label_conflict"

THUMB = 32
FORMATS = {"JPEG", "PNG", "TIFF", "BMP", "WEBP"}
# Greyscale and colour exports, 8 and 16 bit. Bilevel ("1"), CMYK, float and other
# exotic modes are refused rather than guessed at.
MODES = {"L", "LA", "P", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 64
    max_pixels: int = 40_000_000  # 40 MP: far above any MRI slice, far below a bomb
    max_bytes: int = 64 * 1024 * 1024


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


class RejectedImage(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _phash(grey: Image.Image) -> int:
    # imported here: decoding for training and inference (transforms.preprocess) needs no
    # hashing library, so a bare GPU machine with only PyTorch and Pillow can run it
    import imagehash

    return _to_int64(imagehash.phash(grey))


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
    return ImageInfo(
        sha256=sha,
        phash=_phash(grey),
        thumb=grey.resize((THUMB, THUMB), Image.BILINEAR).tobytes(),
        height=h,
        width=w,
        mode=mode,
        format=fmt,
        n_bytes=len(data),
    )


def to_grey_u8(img: Image.Image) -> Image.Image:
    """Any accepted mode to 8-bit greyscale. 16/32-bit data is scaled by its own range,
    so a 12-bit scan stored in 16 bits is not rendered almost black."""
    if img.mode in ("L",):
        return img
    if img.mode.startswith("I"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), mode="L")
    if img.mode in ("LA", "P", "RGBA"):
        img = img.convert("RGB") if img.mode != "LA" else img.convert("L")
    return img.convert("L")


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
