"""The leakage lookup (nearest training pHash within a cap) through the dedup index: the
same answer as comparing every evaluated image with every training row."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from brainmri.config import IngestConfig
from brainmri.data import dedup
from brainmri.data.datasets import load_manifest, split_files
from brainmri.data.ingest import ingest
from brainmri.evaluation import leakage

from support.data import real_hashes, real_subset


def test_nearest_distance_through_the_index_equals_the_scan_on_real_hashes():
    phash, _, _ = real_hashes(per_class=200)  # shared with tests/data/test_dedup.py (cached)
    order = np.random.default_rng(0).permutation(len(phash))
    q, ref = phash[order[:200]], phash[order[200:]].view(np.uint64)  # as flag() gets them
    full = np.bitwise_count(q.view(np.uint64)[:, None] ^ ref[None, :]).min(axis=1)  # every pair
    assert (full <= 4).sum() >= 5 and (full > 12).sum() >= 1  # near ones, and some far ones
    assert dedup.scan_nearest(q.view(np.uint64), ref).tolist() == full.tolist()
    for cap in (0, 2, 4, 8, 12):
        assert leakage.nearest_distance(q, ref, cap).tolist() == np.where(full <= cap, full, 65).tolist()
        for m in (2, 3, 5) if cap <= 4 else (3, 5):  # m = 2 at cap 12: 10^6 key masks a query
            got = dedup.nearest_within(q.view(np.uint64), ref, cap, tables=m)
            assert got.tolist() == np.minimum(full, cap + 1).tolist(), (cap, m)
    # at the default cap an index compares a small part of the query x training pairs (at
    # this size the planner still picks the scan: 120k pairs cost less than building tables)
    assert dedup.choose_tables(ref, leakage.NEAR_DISTANCE, q.view(np.uint64)) == 0
    index = dedup.HammingIndex(ref, leakage.NEAR_DISTANCE, 3)
    index.nearest(q.view(np.uint64))
    assert 0 < index.compared < len(q) * len(ref) / 20


def test_flag_reads_the_training_hashes_and_marks_copies_and_near_copies(tmp_path):
    src = real_subset(tmp_path / "src", per_class=6)
    cfg = IngestConfig(workers=1, val_fraction=0.25, test_fraction=0.25)
    res = ingest(str(src), str(tmp_path / "lake"), cfg)
    shas, ref, n_train, mirrors = leakage.training_hashes(res.location.uri, ["train", "val"])
    assert mirrors and len(ref) == 2 * n_train  # each training image's pHash and its mirror's
    first = split_files(res.location, load_manifest(res.location), "train")[0]
    row = pq.read_table(res.location.fs.open_input_file(first), columns=["sha256", "phash"]).slice(0, 1)
    t0, h0 = row.column("sha256")[0].as_py(), np.int64(row.column("phash")[0].as_py()).view(np.uint64)
    # a training image itself, its hash 3 and 6 bits away (a near copy at 4, one beyond), a far one
    phash = np.array([h0, h0 ^ np.uint64(0b111), h0 ^ np.uint64(0b111111), ~h0], np.uint64).view(np.int64)
    sha = [t0, "a" * 64, "b" * 64, "c" * 64]
    out = leakage.flag(sha, phash, res.location.uri, ["train", "val"], near_distance=4)
    every = np.bitwise_count(phash.view(np.uint64)[:, None] ^ ref[None, :]).min(axis=1)
    assert out["distance"].tolist() == np.where(every <= 4, every, 65).tolist()
    assert out["exact"].tolist() == [True, False, False, False]
    assert out["near"].tolist() == ((every <= 4) & ~out["exact"]).tolist()
    assert out["near"][1] and not out["near"][0]  # an exact copy is counted once, as exact
    rows = res.manifest["rows"]
    assert out["summary"]["training_images"] == n_train == rows["train"] + rows["val"]
    assert out["summary"]["mirrors_compared"]
