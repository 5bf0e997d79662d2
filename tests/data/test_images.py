"""brainmri.data.images on files the tests make: every rejection reason, every accepted kind."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from brainmri.data import images as im
from brainmri.data.ingest import _inspect_file

from support.synth import bad_files, encode, near_copy, synth_array, synth_jpeg

BAD = bad_files()

BYTE_LEVEL_REASONS = {im.EMPTY, im.NOT_IMAGE, im.CORRUPT, im.UNSUPPORTED_FORMAT,
                      im.UNSUPPORTED_MODE, im.TOO_SMALL, im.TOO_LARGE}


def test_bad_corpus_covers_every_byte_level_reason():
    assert {reason for _, reason in BAD.values()} == BYTE_LEVEL_REASONS


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_rejected_with_its_reason(name):
    data, reason = BAD[name]
    with pytest.raises(im.RejectedImage) as e:
        im.inspect_image(data)
    assert e.value.reason == reason, (name, str(e.value))
    assert str(e.value).startswith(reason)


def test_rejection_details_say_what_was_wrong():
    def detail(name):
        with pytest.raises(im.RejectedImage) as e:
            im.inspect_image(BAD[name][0])
        return e.value.detail

    assert detail("cmyk.jpg") == "CMYK"
    assert detail("bilevel.png") == "1"
    assert detail("float.tif") == "F"
    assert detail("anim.gif") == "GIF"
    assert "20x20" in detail("tiny.jpg")
    assert "7000x7000" in detail("huge.png")
    assert "400000000" in detail("bomb.png")  # PIL's bomb message carries the pixel count
    assert "truncated" in detail("truncated.jpg")


def test_bomb_is_cheap_and_never_decoded():
    data, _ = BAD["bomb.png"]
    assert len(data) < 200_000  # claims 400 MP in a small file
    with pytest.raises(Image.DecompressionBombError):  # refused from the header alone
        Image.open(io.BytesIO(data))


def test_limits_are_honoured():
    data = synth_jpeg(1, size=112)
    assert im.inspect_image(data, im.ImageLimits(min_side=112)).width == 112
    with pytest.raises(im.RejectedImage) as e:
        im.inspect_image(data, im.ImageLimits(min_side=113))
    assert e.value.reason == im.TOO_SMALL
    with pytest.raises(im.RejectedImage) as e:
        im.inspect_image(data, im.ImageLimits(max_pixels=112 * 112 - 1))
    assert e.value.reason == im.TOO_LARGE
    with pytest.raises(im.RejectedImage) as e:
        im.inspect_image(data, im.ImageLimits(max_bytes=len(data) - 1))
    assert e.value.reason == im.TOO_LARGE and str(len(data)) in e.value.detail


def test_unreadable_file_and_oversized_read(tmp_path):
    limits = im.ImageLimits()
    i, res = _inspect_file((7, str(tmp_path / "gone.jpg"), limits, None))
    assert (i, res.scans, res.reason) == (7, None, im.UNREADABLE) and res.detail
    big = tmp_path / "big.jpg"
    big.write_bytes(synth_jpeg(3))
    small_limit = im.ImageLimits(max_bytes=100)
    _, res = _inspect_file((0, str(big), small_limit, None))
    assert res.scans is None and res.reason == im.TOO_LARGE


# -- accepted files --------------------------------------------------------------------------
def _grey_jpeg():
    return encode(synth_array(11, 120)[:, :100], "JPEG", quality=95)  # 100 wide, 120 high


def _rgb_png():
    a = synth_array(12, 96)
    rgb = np.stack([a, np.roll(a, 7, axis=0), 255 - a], axis=-1)
    return encode(rgb, "PNG")


def _u16_png(lo=0, hi=4095, seed=13):
    """A 12-bit scan stored in 16 bits: values lo..hi, both present."""
    rng = np.random.default_rng(seed)
    a = rng.integers(lo, hi + 1, (80, 90)).astype(np.uint16)
    a[0, 0], a[-1, -1] = lo, hi
    return encode(Image.fromarray(a), "PNG"), a


ACCEPTED = {
    "grey.jpg": (_grey_jpeg, "L", "JPEG", (120, 100)),
    "rgb.png": (_rgb_png, "RGB", "PNG", (96, 96)),
    "u16.png": (lambda: _u16_png()[0], "I;16", "PNG", (80, 90)),
    "rgba.png": (lambda: encode(Image.fromarray(synth_array(14, 96)).convert("RGBA"), "PNG"),
                 "RGBA", "PNG", (96, 96)),
    "palette.png": (lambda: encode(Image.fromarray(synth_array(15, 96)).convert("P"), "PNG"),
                    "P", "PNG", (96, 96)),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_image_info(name):
    make, mode, fmt, (h, w) = ACCEPTED[name]
    data = make()
    info = im.inspect_image(data)
    assert (info.mode, info.format, info.height, info.width) == (mode, fmt, h, w)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.n_bytes == len(data)
    assert len(info.thumb) == im.THUMB * im.THUMB
    assert -(1 << 63) <= info.phash < (1 << 63)
    grey = im.decode_grey(data)
    assert grey.dtype == np.uint8 and grey.shape == (h, w)


def test_decode_grey_matches_pil_for_8_bit():
    data = _grey_jpeg()
    assert np.array_equal(im.decode_grey(data), np.asarray(Image.open(io.BytesIO(data))))
    data = _rgb_png()
    want = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert np.array_equal(im.decode_grey(data), want)


@pytest.mark.parametrize("lo,hi", [(0, 4095), (300, 3000)])
def test_16_bit_12_bit_range_uses_full_8_bit_range(lo, hi):
    data, a = _u16_png(lo, hi)
    g = im.decode_grey(data)
    assert g.min() == 0 and g.max() == 255
    # a linear map of the stored range, order preserved
    want = ((a.astype(np.float64) - lo) / (hi - lo) * 255).astype(np.uint8)
    assert np.abs(g.astype(int) - want.astype(int)).max() <= 1
    assert len(np.unique(g)) > 200
    # values are uniform over lo..hi, so the grey levels must be uniform over 0..255
    assert abs(float(g.mean()) - 127.5) < 8
    # PIL's own I;16 -> L conversion clips at 255: most of this scan would be white
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert (naive == 255).mean() > 0.9 > (g == 255).mean()


def test_flat_16_bit_image_decodes_to_zeros():
    data = encode(Image.fromarray(np.full((70, 70), 1234, np.uint16)), "PNG")
    g = im.decode_grey(data)
    assert g.shape == (70, 70) and not g.any()


def test_decode_grey_draft_reduces_jpeg_scale_but_not_below_request():
    data = encode(synth_array(21, 512), "JPEG")
    full = im.decode_grey(data)
    small = im.decode_grey(data, draft_size=128)
    assert full.shape == (512, 512)
    assert small.shape == (128, 128)
    small = im.decode_grey(data, draft_size=200)
    assert 200 <= small.shape[0] < 512
    png = _rgb_png()  # draft only applies to JPEG
    assert im.decode_grey(png, draft_size=32).shape == (96, 96)


def test_near_copy_hashes_close_distinct_scans_far():
    a, b, c = (im.inspect_image(x) for x in (synth_jpeg(5), near_copy(5), synth_jpeg(6)))

    def dist(x, y):
        return bin((x.phash ^ y.phash) & ((1 << 64) - 1)).count("1")

    assert a.sha256 != b.sha256
    assert dist(a, b) <= 12 < dist(a, c)


def test_not_an_image_detail_has_no_memory_address():
    with pytest.raises(im.RejectedImage) as e:
        im.inspect_image(b"this is not an image at all", im.ImageLimits())
    assert e.value.reason == im.NOT_IMAGE
    assert "0x" not in e.value.detail and e.value.detail == "cannot identify image file"


def test_phash_is_imagehashs_and_the_mirror_hash_that_of_the_mirror():
    """inspect_image resizes once for both hashes: the image's pHash is exactly
    imagehash.phash of the image, the mirror's within 2 bits of imagehash.phash of the
    mirrored image (the resize of a mirror is the mirror of the resize, up to rounding)."""
    import imagehash

    from support.data import SHARED_DATA

    files = sorted((SHARED_DATA / "Training" / "meningioma").glob("*.jpg"))[:40:4]
    if not files:
        pytest.skip("shared data not found")
    as_int = im._to_int64
    for f in files:
        info = im.inspect_image(f.read_bytes())
        grey = im.to_grey_u8(Image.open(f))
        assert info.phash == as_int(imagehash.phash(grey))
        want = as_int(imagehash.phash(grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
        assert bin((info.phash_mirror ^ want) & (2**64 - 1)).count("1") <= 2
        assert info.phash_mirror != info.phash
