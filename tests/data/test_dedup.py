"""Near duplicates through the multi-index hash: exactly the pairs of the all-pairs scan, on
real scans hashed as ingest hashes them, on planted copies, and on the cases built to break
a pigeonhole index (pairs caught by one table only, at exactly d and d + 1; a bucket of 1000
identical hashes; no, one or two images)."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from brainmri.config import IngestConfig
from brainmri.data import dedup
from brainmri.data import images as im
from brainmri.data.dedup import (
    HammingIndex,
    hamming_pairs,
    near_duplicate_pairs,
    near_duplicate_pairs_allpairs,
    scan_pairs,
    split_bits,
    substring_radii,
)

from support.data import CLASSES, SHARED_DATA, real_hashes
from support.synth import encode

CFG = IngestConfig()
D, SIM = CFG.phash_distance, CFG.near_dup_similarity


def pair_set(blocks) -> list[tuple[int, int]]:
    out = [p for i, j in blocks for p in zip(i.tolist(), j.tolist(), strict=True)]
    assert len(out) == len(set(out)), "a pair came twice"
    return sorted(out)


def u64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64).view(np.uint64)


def random_hashes(rng, n: int) -> np.ndarray:
    return rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64, endpoint=True).view(np.uint64)


# -- real scans ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    return real_hashes(per_class=200)


def test_index_finds_the_allpairs_near_duplicates_on_real_scans(real):
    phash, thumbs, _ = real
    want = near_duplicate_pairs_allpairs(phash, thumbs, D, SIM)
    assert len(want) >= 20  # neighbouring slices: the comparison below is not vacuous
    assert near_duplicate_pairs(phash, thumbs, D, SIM) == want
    h = u64(phash)
    candidates = pair_set(scan_pairs(h, D))
    assert len(candidates) > 5 * len(want)  # pHash proposes far more than thumbnails confirm
    for m in (3, 4, 5, 7, 13):
        assert near_duplicate_pairs(phash, thumbs, D, SIM, tables=m) == want, m
        assert pair_set(hamming_pairs(h, D, tables=m)) == candidates, m


def _reexports(data: bytes) -> list[bytes]:
    """The copies ingest must catch: resized, re-encoded, re-windowed (a linear window that
    clips 3% at each end, as a viewer's level/width does)."""
    img = Image.open(io.BytesIO(data)).convert("L")
    a = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(a, [3, 97])
    windowed = ((a - lo) * 255 / max(hi - lo, 1)).clip(0, 255).astype(np.uint8)
    return [encode(img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.BILINEAR), quality=85),
            encode(img, quality=55), encode(windowed, quality=90)]


def _with_copies(offset: int, per_class: int, copies) -> tuple[list, list[tuple[int, int]]]:
    """ImageInfo of real scans and of `copies(bytes)` of each, and the planted (original,
    copy) index pairs."""
    files = [sorted((SHARED_DATA / "Training" / c).iterdir())[offset:offset + per_class] for c in CLASSES
             if (SHARED_DATA / "Training" / c).is_dir()]
    if not files:
        pytest.skip("shared data not found")
    infos, planted = [], []
    for f in [f for fs in files for f in fs]:
        orig = len(infos)
        infos.append(im.inspect_image(f.read_bytes()))
        for copy in copies(f.read_bytes()):
            planted.append((orig, len(infos)))
            infos.append(im.inspect_image(copy))
    return infos, planted


def _mirrored(data: bytes) -> list[bytes]:
    """The scan mirrored left-right, re-encoded; and mirrored, resized and re-encoded."""
    img = Image.open(io.BytesIO(data)).convert("L").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    small = img.resize((img.width * 2 // 3, img.height * 2 // 3))
    return [encode(img, quality=80), encode(small, quality=90)]


def test_planted_copies_and_random_hashes_same_pairs_as_allpairs():
    rng = np.random.default_rng(3)
    infos, planted = _with_copies(900, 4, _reexports)
    phash = np.array([i.phash for i in infos], dtype=np.int64)
    thumbs = np.frombuffer(b"".join(i.thumb for i in infos), np.uint8).reshape(len(infos), -1)
    # random hashes, some a few bits from a real scan's (pHash candidates that the random
    # thumbnails must turn down), the rest anywhere
    near_real = u64(phash[rng.integers(0, len(phash), 300)]) ^ _flips(rng, 300, rng.integers(0, 15, 300))
    extra = np.concatenate([near_real, random_hashes(rng, 700)]).view(np.int64)
    phash = np.concatenate([phash, extra])
    thumbs = np.concatenate([thumbs, rng.integers(0, 256, (len(extra), thumbs.shape[1]), dtype=np.uint8)])
    want = near_duplicate_pairs_allpairs(phash, thumbs, D, SIM)
    assert set(planted) <= set(want)  # every planted copy is caught...
    for m in (None, 3, 4, 6):  # ...and the index gives the same pairs, no more
        assert near_duplicate_pairs(phash, thumbs, D, SIM, tables=m) == want
    # the candidate stage alone, with thumbnails out of the way
    h = u64(phash)
    candidates = pair_set(scan_pairs(h, D))
    assert len(candidates) > 300
    for m in (3, 5, 13):
        assert pair_set(hamming_pairs(h, D, tables=m)) == candidates


def test_mirrored_copies_are_near_duplicates_through_the_mirrors_pHash():
    """A scan mirrored left-right (and re-encoded, or resized too) is the same image to a
    network trained with flips: paired through `phash_mirror`, by the index and the scan
    alike; without the mirrors' hashes it is not found (the old rule). An image is never
    paired with its own mirror, and the plain pairs stay what they were."""
    infos, planted = _with_copies(700, 3, _mirrored)
    phash = np.array([i.phash for i in infos], dtype=np.int64)
    mirror = np.array([i.phash_mirror for i in infos], dtype=np.int64)
    thumbs = np.frombuffer(b"".join(i.thumb for i in infos), np.uint8).reshape(len(infos), -1)
    plain = near_duplicate_pairs_allpairs(phash, thumbs, D, SIM)
    assert not set(planted) & set(plain)  # the plain rule misses every mirrored copy
    want = near_duplicate_pairs_allpairs(phash, thumbs, D, SIM, phash_mirror=mirror)
    assert set(planted) <= set(want) and set(plain) <= set(want)
    assert all(i < j for i, j in want)  # no image with itself
    # the two copies of one scan pair plainly (both mirrored); nothing else joins
    copies = {(a + 1, a + 2) for a, _ in planted[::2]}
    assert set(want) == set(planted) | copies
    for m in (None, 3, 5):
        assert near_duplicate_pairs(phash, thumbs, D, SIM, tables=m, phash_mirror=mirror) == want


def test_mirror_of_a_thumbnail_is_the_thumbnail_of_the_mirror():
    """The confirmation mirrors the stored 32x32 thumbnail instead of re-reading the image:
    the bilinear resize commutes with the flip."""
    f = next((SHARED_DATA / "Training" / "glioma").iterdir(), None) if SHARED_DATA.is_dir() else None
    if f is None:
        pytest.skip("shared data not found")
    img = Image.open(f).convert("L")
    a = np.asarray(img.resize((im.THUMB, im.THUMB), Image.BILINEAR))[:, ::-1]
    flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    b = np.asarray(flipped.resize((im.THUMB, im.THUMB), Image.BILINEAR))
    assert np.abs(a.astype(int) - b).max() <= 1


def _flips(rng, n: int, k) -> np.ndarray:
    """n masks with k[i] random bits set."""
    k = np.broadcast_to(k, n)
    out = np.zeros(n, np.uint64)
    for i in range(n):
        for b in rng.choice(64, int(k[i]), replace=False):
            out[i] |= np.uint64(1) << np.uint64(b)
    return out


# -- built to break a pigeonhole index -------------------------------------------------------
def _edge_pairs(rng, d: int, m: int, order: np.ndarray):
    """For each table k of an m-substring index over `order`: a pair at distance exactly d
    that only table k proposes (its substring within k's radius, every other one radius + 1),
    and a pair at d + 1 that none proposes. Returns the hashes and the pairs within d."""
    parts, radii = split_bits(order, m), substring_radii(d, m)
    hashes, within = [], []
    for k in range(m):
        if radii[k] < 0:
            continue
        for extra in (0, 1):
            base = random_hashes(rng, 1)[0]
            mask = 0
            for j, (bits, r) in enumerate(zip(parts, radii, strict=True)):
                n_flip = r + (extra if j == k else 1)  # 0 in a table the radius drops (r = -1)
                mask |= sum(1 << int(b) for b in rng.choice(bits, n_flip, replace=False))
            assert bin(mask).count("1") == d + extra
            if extra == 0:
                within.append((len(hashes), len(hashes) + 1))
            hashes += [base, base ^ np.uint64(mask)]
    return np.array(hashes, dtype=np.uint64), within


@pytest.mark.parametrize("d", [0, 1, 4, 12, 13])
def test_pairs_at_exactly_d_found_and_at_d_plus_1_not(d):
    rng = np.random.default_rng(d)
    order = np.arange(64)
    for m in range(2, d + 2):  # m = 2: 32-bit keys, found by binary search (no dense table)
        plan = zip(split_bits(order, m), substring_radii(d, m), strict=True)
        if sum(dedup.ball(len(b), r) for b, r in plan) > 20000:
            continue  # m = 2 at d >= 12: radius 6 on 32 bits, a million key masks
        h, within = _edge_pairs(rng, d, m, order)
        assert pair_set(scan_pairs(h, d)) == within  # the hashes are what they claim
        assert pair_set(HammingIndex(h, d, m, order=order).pairs()) == within, m
        assert pair_set(hamming_pairs(h, d, tables=m)) == within, m  # the adaptive split too
        # lookups: the base's partner at d is found at d, the one at d + 1 is not
        q, ref = h[1::2], h[0::2]
        want = np.where(np.bitwise_count(q ^ ref) <= d, np.bitwise_count(q ^ ref), d + 1)
        got = HammingIndex(ref, d, m, order=order).nearest(q)
        assert got.tolist() == want.tolist()


def test_a_bucket_of_1000_identical_hashes_stays_in_bounded_blocks():
    rng = np.random.default_rng(5)
    h = np.concatenate([np.full(1000, random_hashes(rng, 1)[0]), random_hashes(rng, 500)])
    thumbs = rng.integers(0, 256, (1500, 16), dtype=np.uint8)  # any width: the rule is the same
    want = near_duplicate_pairs_allpairs(h.view(np.int64), thumbs, D, -1.0)
    assert len(want) >= 1000 * 999 // 2
    assert near_duplicate_pairs(h.view(np.int64), thumbs, D, -1.0, tables=4) == want
    block = 4096
    tracemalloc.start()
    try:
        n, largest = 0, 0
        for i, _ in HammingIndex(h, D, 4).pairs(block):
            n, largest = n + len(i), max(largest, len(i))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == len(want) and largest <= 2 * block
    # 499500 pairs would take 8 MB as two int64 arrays: the search held a small part of that
    assert peak < 2_000_000, peak


def test_no_one_or_two_images():
    empty = np.zeros(0, np.int64)
    assert near_duplicate_pairs(empty, np.zeros((0, 1024), np.uint8), D, SIM) == []
    one = np.array([5], np.int64)
    assert near_duplicate_pairs(one, np.zeros((1, 1024), np.uint8), D, SIM) == []
    t2 = np.array([[0, 1] * 512, [0, 1] * 512], np.uint8)
    for m in (None, 2, 5):
        assert near_duplicate_pairs(np.array([5, 5 ^ 0b111], np.int64), t2, 3, SIM, tables=m) == [(0, 1)]
        assert near_duplicate_pairs(np.array([5, 5 ^ 0b1111], np.int64), t2, 3, SIM, tables=m) == []
    assert dedup.nearest_within(u64([]), u64([1, 2]), 4).tolist() == []
    assert dedup.nearest_within(u64([1, 2]), u64([]), 4).tolist() == [5, 5]
    assert HammingIndex(u64([]), 4, 3).nearest(u64([7])).tolist() == [5]


def test_the_planner_indexes_large_sets_and_scans_tiny_ones():
    rng = np.random.default_rng(11)
    h = random_hashes(rng, 30000)
    m = dedup.choose_tables(h, D)
    assert m >= 3
    index = HammingIndex(h, D, m)
    assert pair_set(index.pairs()) == pair_set(hamming_pairs(h, D, tables=m))
    assert index.compared < 0.1 * len(h) ** 2 / 2  # it compares under a tenth of all pairs
    assert dedup.choose_tables(h[:40], D) == 0  # 780 pairs: nothing to gain
    assert dedup.choose_tables(h, 64) == 0  # every pair is within 64: only the scan is sane


def test_thumbnail_check_is_the_whole_matrix_formula_batch_by_batch():
    """_confirmed normalises only each batch's rows; the pairs it keeps are exactly those of
    normalising every thumbnail at once (the rule as first written), thresholds on the edge
    included."""
    from brainmri.data.dedup import _confirmed

    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (60, 1024)).astype(np.int16)
    thumbs = np.clip(np.concatenate([base, base[:30] + rng.integers(-40, 40, (30, 1024))]), 0, 255)
    thumbs = thumbs.astype(np.uint8)
    ii, jj = np.triu_indices(len(thumbs), 1)
    t = thumbs.astype(np.float32)
    t -= t.mean(axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True) + 1e-6
    sims = np.einsum("ij,ij->i", t[ii], t[jj])
    for thr in (0.5, float(np.sort(sims)[-30])):  # the 30th best similarity: on the edge
        want = sorted(zip(ii[sims >= thr].tolist(), jj[sims >= thr].tolist(), strict=True))
        assert _confirmed(iter([(ii, jj)]), thumbs, thr, len(thumbs), batch=97) == want
        assert len(want) >= 30
