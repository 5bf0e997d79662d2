"""The deterministic preprocessing stays free of torch (Ray Data's decode workers import it), and
its id changes whenever its output does (pixel shards are keyed by it)."""

import subprocess
import sys

import numpy as np


def test_preprocessing_imports_without_torch_and_is_what_the_feed_maps():
    code = ("import sys, brainmri.data.preprocess as p; "
            "assert 'torch' not in sys.modules, 'brainmri.data.preprocess imported torch'; "
            "print(p.preprocess_batch.__module__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "brainmri.data.preprocess"

    # the training feed maps this function (Ray pickles it by module: the worker imports only that)
    from brainmri.data import preprocess, transforms
    from brainmri.training import train

    assert train.preprocess_batch.__module__ == "brainmri.data.preprocess"
    assert transforms.preprocess is preprocess.preprocess


def test_preprocess_batch_shapes_and_labels():
    import io

    from PIL import Image

    from brainmri.data.preprocess import preprocess_batch

    blobs = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((40 + i, 30), 50 * i, np.uint8)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    out = preprocess_batch({"image": np.array(blobs, dtype=object), "label": np.array([0, 2, 1])}, 32)
    assert out["x"].shape == (3, 32, 32) and out["x"].dtype == np.uint8
    assert out["label"].tolist() == [0, 2, 1] and out["label"].dtype == np.int64


# sha256 of the rule's output on the images of `_golden_inputs`, per (PREPROCESS_ID, Pillow):
# pixel shards (data.pixels) are keyed by the id, so a change to the rule that keeps the id
# would serve stale pixels. Pillow is pinned (pyproject.toml); its decoders are part of the rule.
GOLDEN = {
    ("grey-draft-fit-bilinear-p0.5-99.5/1", "13.0.0"):
        "4359c0eef0fa73aff14e1b26d887d4f47c3fad4c3f9053b3ca7cfd478424380b",
}


def _golden_inputs() -> list[bytes]:
    """A wide grey PNG, a large RGB JPEG (the draft-mode decode path), a tiny tall PNG."""
    import io

    from PIL import Image

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:200, 0:300]
    wide = ((xx + yy) % 256 + rng.integers(0, 20, (200, 300))).clip(0, 255).astype(np.uint8)
    big = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8).repeat(40, 0).repeat(40, 1)
    tall = rng.integers(0, 256, (91, 37), dtype=np.uint8)
    out = []
    for arr, fmt in ((wide, "PNG"), (big, "JPEG"), (tall, "PNG")):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def test_the_rule_id_names_the_rules_output():
    """Changing a pixel of the rule's output needs a new PREPROCESS_ID (and its digest here)."""
    import hashlib

    import PIL

    from brainmri.data.preprocess import PREPROCESS_ID, preprocess

    h = hashlib.sha256()
    for size in (64, 160):
        for data in _golden_inputs():
            h.update(preprocess(data, size).tobytes())
    key = (PREPROCESS_ID, PIL.__version__)
    assert key in GOLDEN, f"no digest recorded for {key}: record {h.hexdigest()} in GOLDEN"
    assert h.hexdigest() == GOLDEN[key], (
        f"the preprocessing's output changed under the same id {PREPROCESS_ID!r}: give the rule a "
        f"new PREPROCESS_ID and record its digest {h.hexdigest()} here")


def test_the_histogram_percentiles_and_table_stretch_are_numpys_bit_for_bit():
    """normalise_intensity reads percentiles from a histogram and stretches through a 256-entry
    table: both must give what np.percentile and the per-pixel float arithmetic give, on the
    edges too (one pixel, one value, two values, percentiles at 0 and 100, either _lerp branch)."""
    from brainmri.data.preprocess import normalise_intensity, percentiles_u8

    def reference(img, lo_pct, hi_pct):
        lo, hi = np.percentile(img, (lo_pct, hi_pct))
        if hi - lo < 1:
            return img
        return np.clip((img.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)

    rng = np.random.default_rng(3)
    images = [np.zeros((1, 1), np.uint8), np.full((5, 7), 200, np.uint8),
              np.array([[0, 255]], np.uint8), np.array([[10, 11, 11, 12]], np.uint8)]
    for _ in range(3000):
        h, w = rng.integers(1, 48, 2)
        lo, hi = sorted(rng.integers(0, 256, 2))
        images.append(rng.integers(lo, hi + 1, (h, w)).astype(np.uint8))
    qs = [(0.5, 99.5), (0.0, 100.0), (25.0, 75.0)]
    for i, img in enumerate(images):
        for q in qs + [tuple(sorted(rng.uniform(0, 100, 2)))]:
            got = percentiles_u8(img, q)
            assert [type(v) for v in got] == [np.float64, np.float64]
            assert np.array_equal(got, np.percentile(img, q)), (i, q)
            out = normalise_intensity(img, *q)
            assert out.dtype == np.uint8 and np.array_equal(out, reference(img, *q)), (i, q)

    # what numpy refuses, and what the table cannot hold, is refused in one line
    import pytest

    with pytest.raises(TypeError, match="uint8"):
        normalise_intensity(np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match="empty"):
        percentiles_u8(np.zeros((0, 3), np.uint8), (1.0, 99.0))
    with pytest.raises(ValueError, match=r"within \[0, 100\]"):
        percentiles_u8(np.zeros((2, 2), np.uint8), (-1.0, 50.0))
