"""Test helpers: synthetic scans and a corpus of bad files, made in memory by the tests.

Every synthetic scan comes from its own seed (random blobs, bars and noise on a smooth
background), so two scans are never near-duplicates by accident; `near_copy` makes the
kind of copy that must be caught (resized and re-encoded at another JPEG quality).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from brainmri.data import images as im


def synth_array(seed: int, size: int = 112) -> np.ndarray:
    """A distinct greyscale 'scan' (uint8, size x size) for each seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    base = 60 + 60 * (np.cos(angle) * xx + np.sin(angle) * yy)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), mode="L")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 9))):
        x0, y0 = rng.integers(0, size - 16, 2)
        w, h = rng.integers(12, size // 2, 2)
        fill = int(rng.integers(0, 256))
        box = [int(x0), int(y0), int(min(size - 1, x0 + w)), int(min(size - 1, y0 + h))]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    a = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (size, size))
    return a.clip(0, 255).astype(np.uint8)


def encode(arr_or_img, fmt: str = "JPEG", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def synth_jpeg(seed: int, size: int = 112, quality: int = 92) -> bytes:
    return encode(synth_array(seed, size), "JPEG", quality=quality)


def near_copy(seed: int, size: int = 112, new_size: int = 96, quality: int = 70) -> bytes:
    """The same scan, resized and re-encoded at another JPEG quality."""
    src = Image.open(io.BytesIO(synth_jpeg(seed, size)))
    return encode(src.resize((new_size, new_size), Image.BILINEAR), "JPEG", quality=quality)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def zero_png(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A valid all-black greyscale PNG of any size: zero rows compress ~1000:1, so even a
    20000x20000 'bomb' is a few tens of kB and is made in a fraction of a second."""
    row = b"\0" * (1 + (width * bit_depth + 7) // 8)  # filter byte + packed pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def bad_files(seed: int = 1000) -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, the rejection reason inspect_image must give), one per reason
    that can be decided from a file's bytes (several for some)."""
    good = synth_jpeg(seed)
    corrupt = bytearray(good)
    mid = len(corrupt) // 2
    corrupt[mid:mid + 64] = b"\xff" * 64  # a run of marker bytes inside the entropy-coded data
    return {
        "empty.jpg": (b"", im.EMPTY),
        "not_an_image.jpg": (b"patient notes, not a scan\n" * 20, im.NOT_IMAGE),
        "truncated.jpg": (good[: len(good) // 2], im.CORRUPT),
        "corrupt_middle.jpg": (bytes(corrupt), im.CORRUPT),
        "cmyk.jpg": (encode(Image.new("CMYK", (96, 96), (10, 20, 30, 40))), im.UNSUPPORTED_MODE),
        "bilevel.png": (encode(Image.new("1", (96, 96), 1), "PNG"), im.UNSUPPORTED_MODE),
        "float.tif": (encode(Image.fromarray(np.linspace(0, 1, 96 * 96, dtype=np.float32)
                                             .reshape(96, 96)), "TIFF"), im.UNSUPPORTED_MODE),
        "tiny.jpg": (encode(Image.fromarray(synth_array(seed + 1)).resize((20, 20))), im.TOO_SMALL),
        # 400 MP: PIL's own decompression-bomb guard fires while opening
        "bomb.png": (zero_png(20000, 20000, bit_depth=1), im.TOO_LARGE),
        # 49 MP: under PIL's guard, over our 40 MP limit
        "huge.png": (zero_png(7000, 7000), im.TOO_LARGE),
        "anim.gif": (encode(Image.fromarray(synth_array(seed + 2, 96)).convert("P"), "GIF"),
                     im.UNSUPPORTED_FORMAT),
    }
