"""What every image file is held to, for images.py (encoded images) and dicom.py (DICOM files,
which images.inspect_scans hands to it): the reasons a file is refused, the limits on its
size, and the one conversion of any accepted mode to 8-bit grey.

They live here because both modules apply them and the dependency between the two points one
way, images -> dicom (pyproject.toml's import contracts). images.py re-exports every name:
callers use them as `images.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..config import ConfigError

# Why a file was not accepted. The values are what reports and manifests carry.
EMPTY = "empty_file"
NOT_IMAGE = "not_an_image"
CORRUPT = "corrupt_or_truncated"
UNSUPPORTED_FORMAT = "unsupported_format"
UNSUPPORTED_MODE = "unsupported_mode_or_bit_depth"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large_or_decompression_bomb"
UNREADABLE = "unreadable"
# DICOM files (dicom.py); unusable bit depths and sizes use the reasons above
DICOM_UNREADABLE = "dicom_unreadable"  # the DICM magic, but no dataset can be parsed
DICOM_NO_PIXELS = "dicom_no_pixel_data"  # e.g. a DICOMDIR, a structured report
DICOM_UNSUPPORTED_SYNTAX = "dicom_unsupported_transfer_syntax"  # not a transfer syntax pydicom knows
DICOM_NO_DECODER = "dicom_compressed_without_decoder"  # known, but no installed decoder handles it
DICOM_VIDEO = "dicom_encapsulated_video"  # MPEG-2, MPEG-4, HEVC
DICOM_INCONSISTENT = "dicom_inconsistent_dimensions"  # header and pixel data disagree
# Reasons found while walking a folder, before a file is opened.
HIDDEN = "hidden_or_system_file"
UNKNOWN_CLASS = "outside_known_class_folder"
SYMLINK_OUTSIDE = "symlink_leaves_source"
NOT_REGULAR = "not_a_regular_file"
UNDECODABLE_NAME = "undecodable_file_name"  # not UTF-8: cannot be stored as a path
# Found when comparing files: the same bytes filed under two classes (ingest).
LABEL_CONFLICT = "label_conflict"


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 64
    max_pixels: int = 40_000_000  # 40 MP: far above any MRI slice, far below a bomb
    max_bytes: int = 64 * 1024 * 1024
    max_voxels: int = 160_000_000  # all frames of one DICOM file: compressed volumes can be bombs too


class SaltMissing(ConfigError):
    """DICOM needs a secret salt (dicom.salt) and the environment has none."""


class RejectedImage(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.dicom = False  # set when the file is DICOM by content


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
