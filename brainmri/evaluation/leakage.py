"""Leakage-aware evaluation: which evaluated images the model (nearly) saw in training.

Compared with the sha256 and 64-bit pHash columns of the model's training dataset version
(its train and val splits: val chose the checkpoint and fits the temperature, so it is not
unseen either). Only hashes are read, never image bytes, so this stays cheap on S3.

- exact duplicate: identical bytes (same sha256).
- near duplicate: pHash Hamming distance <= NEAR_DISTANCE (default 4) to a training image or
  to its left-right mirror (a version ingested with `phash_mirror`: the public data holds
  mirrored copies, and training flips images, so a mirrored copy was seen; dedup.py). Ingest uses a looser
  pHash radius (12) but confirms candidates with 32x32 thumbnail correlation; the training
  shards do not store thumbnails, so here pHash alone must be stricter. Measured on the
  shared data's default ingest before mirrors were compared (version a5e68a2ad0981af4, 552
  test vs 4402 train images, the training hashes alone), nearest training image:
  distance <= 2: 13 test images (all same class); <= 4: 52 (51 same class, likely
  neighbouring slices of one scan); exactly 6: 102 (84% same class); 8: 75%; 12: 41%.
  Dedup.py found different-class pairs already at 4, so beyond 4 pHash alone cannot tell a
  copy from similar anatomy. `--near-dup-distance` moves the line for a stricter audit.

The lookup goes through dedup.py's multi-index hash (exact, same answer as comparing every
evaluated image with every training row; a planner keeps the plain scan where that is
cheaper, as for a few thousand rows). It answers "is a training hash within near_distance,
and at what distance": a nearest distance beyond that is reported as 65, not computed.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from ..config import EvaluateConfig
from ..core.storage import open_location
from ..data.datasets import load_manifest, split_files, verify_shards
from ..data.dedup import as_u64, nearest_within

NEAR_DISTANCE = EvaluateConfig.near_dup_distance  # the default lives with evaluate's options


def training_hashes(dataset_uri: str, splits: list[str]) -> tuple[set[str], np.ndarray, int, bool]:
    """(sha256 set, pHash array (uint64), images, mirrors) of the given splits of a dataset
    version. The array holds each image's pHash and, when the version stores them
    (`mirrors`), its mirror's too: the distance to the nearest of either is the distance to
    a training image seen either way round."""
    version = open_location(dataset_uri)
    manifest = load_manifest(version)
    verify_shards(version, manifest, tuple(splits))
    shas: set[str] = set()
    hashes, mirrors, n, mirrored = [], [], 0, True
    for split in splits:
        for path in split_files(version, manifest, split):
            f = pq.ParquetFile(version.fs.open_input_file(path))
            has = "phash_mirror" in f.schema_arrow.names  # older dataset versions lack the column
            t = f.read(columns=["sha256", "phash"] + (["phash_mirror"] if has else []))
            shas.update(t.column("sha256").to_pylist())
            hashes.append(np.asarray(t.column("phash"), dtype=np.int64))
            if has:
                mirrors.append(np.asarray(t.column("phash_mirror"), dtype=np.int64))
            mirrored, n = mirrored and has, n + t.num_rows
    ph = np.concatenate(hashes + (mirrors if mirrored else [])) if hashes else np.zeros(0, np.int64)
    return shas, ph.view(np.uint64), n, bool(mirrored and n)


def nearest_distance(phash: np.ndarray, reference: np.ndarray, cap: int) -> np.ndarray:
    """For each hash, the Hamming distance to the closest reference hash when it is <= cap,
    else 65 (none that close, or no reference at all). Exact, through the multi-index hash
    of dedup.py: only training hashes whose substrings lie within the cap's radius of the
    query's are compared, not every training row."""
    d = nearest_within(as_u64(phash), as_u64(reference), cap)
    return np.where(d <= cap, d, 65)


def flag(sha256: list[str], phash: np.ndarray, dataset_uri: str, splits: list[str],
         near_distance: int = NEAR_DISTANCE) -> dict:
    """Per-image flags (exact, near, distance: nearest training pHash distance, 65 beyond
    near_distance) and a JSON-ready summary."""
    shas, ref, n_train, mirrors = training_hashes(dataset_uri, splits)
    exact = np.array([s in shas for s in sha256], dtype=bool)
    dist = nearest_distance(phash, ref, near_distance)  # only "within near_distance" is used
    near = (dist <= near_distance) & ~exact
    return {"exact": exact, "near": near, "distance": dist,
            "summary": {"training_dataset": dataset_uri, "compared_with_splits": splits,
                        "near_duplicate_max_phash_distance": near_distance,
                        "training_images": n_train, "mirrors_compared": mirrors,
                        "exact_duplicates": int(exact.sum()),
                        "near_duplicates": int(near.sum()),
                        "removed": int((exact | near).sum())}}
