"""The deterministic preprocessing stays free of torch: Ray Data's decode workers import it."""

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
