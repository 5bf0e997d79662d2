"""The real shared scans, and where the repository is."""

from __future__ import annotations

import shutil
from pathlib import Path

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
