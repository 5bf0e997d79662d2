"""The real shared scans, and where the repository is."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data" / "brain-tumor-mri"
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def real_subset(dest: Path, per_class: int, offset: int = 0) -> Path:
    """Copy `per_class` real scans of each class into dest/Training/<class>/ (Kaggle layout)."""
    src = SHARED_DATA / "Training"
    if not src.is_dir():
        pytest.skip(f"shared data not found at {src}")
    for c in CLASSES:
        files = sorted((src / c).iterdir())[offset:offset + per_class]
        (dest / "Training" / c).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / "Training" / c / f.name)
    return dest


@functools.lru_cache(maxsize=4)
def real_hashes(per_class: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """pHash (int64), 32x32 thumbnails (uint8, one row each) and labels of `per_class` real
    scans of each class, by ingest's own hashing (images.inspect_image). Cached: several test
    modules share one hashing pass (0.01 s to 0.1 s a scan on a loaded 2-core machine)."""
    from brainmri.data import images as im

    src = SHARED_DATA / "Training"
    if not src.is_dir():
        pytest.skip(f"shared data not found at {src}")
    infos, labels = [], []
    for c in CLASSES:
        for f in sorted((src / c).iterdir())[offset:offset + per_class]:
            infos.append(im.inspect_image(f.read_bytes()))
            labels.append(c)
    phash = np.array([i.phash for i in infos], dtype=np.int64)
    thumbs = np.frombuffer(b"".join(i.thumb for i in infos), np.uint8).reshape(len(infos), -1)
    return phash, thumbs, tuple(labels)
