"""Duplicate groups: identical bytes, and near copies (re-encoded, resized, re-windowed).

A 64-bit pHash alone cannot tell a re-encoded copy from another patient's similar slice on
brain MRI (measured on the shared Training data: pairs of *different classes* already sit at
distance 4). So pHash only proposes candidates and a 32x32 thumbnail correlation confirms
them: at 0.97 no cross-class pair on that data is merged (the closest cross-class pair
correlates 0.967), while resized and re-encoded copies correlate > 0.99.

Finding the pHash pairs within a distance d is a Hamming self-join. `HammingIndex` does it
exactly by multi-index hashing (Norouzi, Punjani & Fleet, "Fast exact search in Hamming space
with multi-index hashing", 2014): the 64 bits are split into m substrings; a pair within d
differs by at most r = d // m bits in one of the first d % m + 1 substrings or by at most r - 1
in one of the others (otherwise the pair differs by >= d + 1 bits), so bucketing the hashes by
each substring and pairing buckets whose keys differ by at most that radius proposes every
pair within d. Each proposed pair then gets the exact distance; one that several tables
propose is kept only by the first (checked on the pair's own bits, no set of seen pairs).
`near_duplicate_pairs_allpairs` is the plain scan it replaces, kept as the reference.

Mirrored copies count as near duplicates. The public data holds left-right mirrored copies of
scans (a second export, or an augmentation baked into the download): measured on the shared
Training set, about half the images of a random validation or test split had a mirrored twin
in the training split (32x32 thumbnails of one correlating >= 0.97 with the other's mirror),
and training flips images, so such a twin is the same image to the network. With the pHash
of each image's mirror (`phash_mirror`), the self-join runs over both sets of hashes: a pair
(image, other's mirror) within the distance is a candidate, confirmed by correlating one
thumbnail with the other's mirror (a 32x32 resize commutes with the flip).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations
from math import comb

import numpy as np

BLOCK = 1 << 16  # candidate pairs checked at once: bounded memory, and cache-sized (fastest measured)
DENSE_KEY_BITS = 22  # buckets are found through a dense 2^bits table up to here (16 MB)


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:  # path compression
            p[i], i = root, p[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# -- the rule: pHash proposes, thumbnail correlation confirms ----------------------------------
def near_duplicate_pairs(phash: np.ndarray, thumbs: np.ndarray, max_distance: int,
                         min_similarity: float, tables: int | None = None,
                         phash_mirror: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Sorted pairs (i < j) of near-duplicate images, mirrored copies included when
    `phash_mirror` (each image's mirror's pHash) is given.

    phash: (n,) int64 perceptual hashes; thumbs: (n, k) uint8 flattened thumbnails. The pHash
    pairs within max_distance come from a HammingIndex (`tables` substrings; None: chosen
    from n and the distance), the same pairs as the all-pairs scan."""
    h = _with_mirrors(phash, phash_mirror)
    return _confirmed(hamming_pairs(h, max_distance, tables), thumbs, min_similarity, len(phash))


def near_duplicate_pairs_allpairs(phash: np.ndarray, thumbs: np.ndarray, max_distance: int,
                                  min_similarity: float,
                                  phash_mirror: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The reference: every pair's distance, in tiles (quadratic). Same rule, same output."""
    h = _with_mirrors(phash, phash_mirror)
    return _confirmed(scan_pairs(h, max_distance), thumbs, min_similarity, len(phash))


def _with_mirrors(phash: np.ndarray, phash_mirror: np.ndarray | None) -> np.ndarray:
    """The hashes the self-join runs over: the images' (rows 0..n-1), then their mirrors'."""
    h = as_u64(phash)
    if phash_mirror is not None and len(phash_mirror) != len(h):
        raise ValueError(f"{len(phash_mirror)} mirror hashes for {len(h)} images")
    return h if phash_mirror is None else np.concatenate([h, as_u64(phash_mirror)])


def _confirmed(blocks: Iterator[tuple[np.ndarray, np.ndarray]], thumbs: np.ndarray,
               min_similarity: float, n: int, batch: int = 4096) -> list[tuple[int, int]]:
    """The candidate pairs whose thumbnails correlate >= min_similarity. Rows >= n of the
    candidates are mirrors (`_with_mirrors`): image i against image j's mirror compares i's
    thumbnail with j's mirrored; a mirror against a mirror is not used (the plain pair
    stands for it: the plain rule is unchanged), and an image against its own mirror is no
    pair. Only the rows of a batch of pairs are
    normalised (float32, row by row, so the same numbers): a normalised copy of every
    thumbnail would be 4 KB a scan on the driver, 4x the thumbnails."""
    pairs = set()
    side = int(np.sqrt(thumbs.shape[1])) if len(thumbs) else 0
    for ii, jj in blocks:
        flip = (ii >= n) != (jj >= n)
        keep = (ii < n) | (jj < n)  # not mirror x mirror
        ii, jj, flip = ii[keep] % n, jj[keep] % n, flip[keep]
        keep = ii != jj
        ii, jj, flip = np.minimum(ii, jj)[keep], np.maximum(ii, jj)[keep], flip[keep]
        for s in range(0, len(ii), batch):  # bounded batches of thumbnail rows
            pi, pj, pf = ii[s:s + batch], jj[s:s + batch], flip[s:s + batch]
            tj = thumbs[pj]
            if pf.any():  # the partner's thumbnail mirrored (rows of side x side pixels)
                tj = np.where(pf[:, None], tj.reshape(-1, side, side)[:, :, ::-1].reshape(len(tj), -1), tj)
            ok = np.einsum("ij,ij->i", _unit_rows(thumbs[pi]), _unit_rows(tj)) >= min_similarity
            pairs.update(zip(pi[ok].tolist(), pj[ok].tolist(), strict=True))
    return sorted(pairs)


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """uint8 thumbnails -> float32 rows with zero mean and unit norm (their correlation is a dot)."""
    t = rows.astype(np.float32)
    t -= t.mean(axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True) + 1e-6
    return t


def as_u64(h) -> np.ndarray:
    """64-bit hashes as uint64, whether stored signed (Parquet's int64) or not."""
    h = np.asarray(h)
    return np.ascontiguousarray(h if h.dtype == np.uint64 else h.astype(np.int64)).view(np.uint64)


# -- Hamming self-join ---------------------------------------------------------------------------
def scan_pairs(h: np.ndarray, max_distance: int,
               chunk: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All pairs (i < j) within max_distance by comparing every pair, in chunk x chunk tiles:
    memory O(chunk^2 + n), time quadratic."""
    n = len(h)
    for a in range(0, n, chunk):
        ha = h[a:a + chunk]
        for b in range(a, n, chunk):
            d = np.bitwise_count(ha[:, None] ^ h[None, b:b + chunk])
            ii, jj = np.nonzero(d <= max_distance)
            ii, jj = ii + a, jj + b
            keep = ii < jj
            if keep.any():
                yield ii[keep], jj[keep]


def hamming_pairs(h: np.ndarray, max_distance: int, tables: int | None = None,
                  block: int = BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All pairs (i < j) with popcount(h[i] ^ h[j]) <= max_distance, each once, in blocks
    (h: uint64). Exact: the same set as scan_pairs. `tables`: the substrings of the index
    (None: choose_tables decides, and may pick the scan where it is cheaper)."""
    if len(h) < 2:
        return
    m = tables if tables is not None else choose_tables(h, max_distance)
    if m == 0:
        yield from scan_pairs(h, max_distance)
    else:
        yield from HammingIndex(h, max_distance, m).pairs(block)


def scan_nearest(q: np.ndarray, reference: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each query hash, the distance to the closest reference hash by comparing every
    pair in tiles (65 when there is no reference)."""
    out = np.full(len(q), 65, dtype=np.int64)
    for s in range(0, len(q), chunk):
        for r in range(0, len(reference), 8 * chunk):
            d = np.bitwise_count(q[s:s + chunk, None] ^ reference[None, r:r + 8 * chunk]).min(axis=1)
            np.minimum(out[s:s + chunk], d, out=out[s:s + chunk])
    return out


def nearest_within(q: np.ndarray, reference: np.ndarray, radius: int,
                   tables: int | None = None) -> np.ndarray:
    """For each query hash, the distance to the closest reference hash when it is <= radius,
    else radius + 1 (both uint64). Exact: scan_nearest, capped."""
    if len(q) == 0 or len(reference) == 0:
        return np.full(len(q), radius + 1, dtype=np.int64)
    m = tables if tables is not None else choose_tables(reference, radius, queries=q)
    if m == 0:
        return np.minimum(scan_nearest(q, reference), radius + 1)
    return HammingIndex(reference, radius, m).nearest(q)


class HammingIndex:
    """Multi-index hashing over 64-bit hashes, exact for distances <= radius.

    One table per substring that the radius needs (see the module docstring); a table holds
    the hashes sorted by their substring key, so that a bucket (one key) is a contiguous run.
    `order`: the bit positions dealt round-robin to the substrings (default: bit_order(h))."""

    def __init__(self, h: np.ndarray, radius: int, tables: int, order: np.ndarray | None = None):
        if not 0 <= radius <= 64 or not 2 <= tables <= 64:  # 2: keys of at most 32 bits
            raise ValueError(f"radius {radius} must be in [0, 64] and tables {tables} in [2, 64]")
        self.h, self.radius = h, radius
        self.compared = 0  # candidate pairs whose distance was computed (benchmarks report it)
        parts = split_bits(bit_order(h) if order is None else order, tables)
        plan = zip(parts, substring_radii(radius, tables), strict=True)
        self.tables = [_Table(h, bits, r) for bits, r in plan if r >= 0]  # r < 0: not needed

    def pairs(self, block: int = BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Self-join: every pair (i < j) within the radius, exactly once."""
        for k, t in enumerate(self.tables):
            for a, col_start, col_n in t.join_rows(block):
                self.compared += int(col_n.sum())
                for r, b, x in _near(t.hs[a], col_start, col_n, t.hs, self.radius, block):
                    a_r = a[r]
                    for earlier in self.tables[:k]:  # a pair is kept by the first table proposing it
                        fresh = np.bitwise_count(x & earlier.mask) > earlier.radius
                        a_r, b, x = a_r[fresh], b[fresh], x[fresh]
                    if len(b):
                        i, j = t.order[a_r], t.order[b]
                        yield np.minimum(i, j), np.maximum(i, j)

    def nearest(self, q: np.ndarray, block: int = BLOCK) -> np.ndarray:
        """For each query hash (uint64), the distance to the closest indexed hash when that is
        <= radius, else radius + 1."""
        best = np.full(len(q), self.radius + 1, dtype=np.int64)
        for t in self.tables:
            for qi, col_start, col_n in t.probe_rows(q, block):
                self.compared += int(col_n.sum())
                for r, _, x in _near(q[qi], col_start, col_n, t.hs, self.radius, block):
                    np.minimum.at(best, qi[r], np.bitwise_count(x).astype(np.int64))
        return best


class _Table:
    def __init__(self, h: np.ndarray, bits: np.ndarray, radius: int):
        self.bits, self.radius = bits, radius
        self.mask = np.uint64(sum(1 << int(b) for b in bits))
        keys = substring_keys(h, bits)
        self.order = np.argsort(keys, kind="stable")
        self.hs = h[self.order]
        self.keys, self.starts, self.counts = np.unique(keys[self.order], return_index=True,
                                                        return_counts=True)
        self.flips = flip_masks(len(bits), radius)
        # the bucket of a key: a dense table when it fits, else a binary search
        self.dense = None
        if len(bits) <= DENSE_KEY_BITS:
            self.dense = np.full(1 << len(bits), -1, dtype=np.int32)
            self.dense[self.keys] = np.arange(len(self.keys), dtype=np.int32)

    def bucket_of(self, keys: np.ndarray) -> np.ndarray:
        """Bucket index of each key, -1 where no hash has it."""
        if len(self.keys) == 0:
            return np.full(keys.shape, -1)
        if self.dense is not None:
            return self.dense[keys]
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, pos, -1)

    @staticmethod
    def _flip_chunks(flips: np.ndarray, rows: int) -> Iterator[np.ndarray]:
        step = max(1, (1 << 20) // max(rows, 1))  # rows x step keys looked up at once
        for s in range(0, len(flips), step):
            yield flips[s:s + step]

    def join_rows(self, block: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The pairs this table proposes, as rows: position a (in key order) against the
        positions [col_start, col_start + col_n). Bucket u is paired with itself (a against
        the later members of its bucket) and with every bucket v > u whose key differs from
        u's by 1..radius bits, so each pair of positions comes once."""
        own = np.flatnonzero(self.counts > 1)
        for s, e in _batches(self.counts[own], block):  # about a block of rows at once
            yield self._own_rows(own[s:e])
        # v > u exactly when the highest flipped bit is clear in u: only those u are probed
        top = np.frexp(self.flips.astype(np.float64))[1] - 1  # highest set bit (flip 0: -1)
        for bit in range(len(self.bits)):
            u = np.flatnonzero((self.keys >> bit) & 1 == 0)
            for f in self._flip_chunks(self.flips[top == bit], len(u)):
                v = self.bucket_of(self.keys[u, None] ^ f[None, :])
                ui, fi = np.nonzero(v >= 0)
                uu, vv = u[ui], v[ui, fi]
                # rows from the smaller bucket of the two: the same cells in fewer rows
                swap = self.counts[uu] > self.counts[vv]
                uu, vv = np.where(swap, vv, uu), np.where(swap, uu, vv)
                for s, e in _batches(self.counts[uu], block):
                    yield self._cross_rows(uu[s:e], vv[s:e])

    def _own_rows(self, uu: np.ndarray):
        """Each member of bucket u against the later members of u."""
        a, run = _spread(self.starts[uu], self.counts[uu])
        n = (self.starts[uu] + self.counts[uu])[run] - a - 1
        keep = n > 0
        return a[keep], a[keep] + 1, n[keep]

    def _cross_rows(self, uu: np.ndarray, vv: np.ndarray):
        """Each member of bucket u against all of bucket v."""
        if (self.counts[uu] == 1).all():  # the common case with many small buckets
            return self.starts[uu], self.starts[vv], self.counts[vv]
        a, run = _spread(self.starts[uu], self.counts[uu])
        return a, self.starts[vv][run], self.counts[vv][run]

    def probe_rows(self, q: np.ndarray, block: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Rows (query index, bucket start, bucket size) of every bucket whose key is within
        the radius of the query's key."""
        qk = substring_keys(q, self.bits)
        for f in self._flip_chunks(self.flips, len(q)):
            v = self.bucket_of(qk[:, None] ^ f[None, :])
            qi, fi = np.nonzero(v >= 0)
            v = v[qi, fi]
            for s, e in _batches(np.ones(len(qi), np.int64), block):
                yield qi[s:e], self.starts[v[s:e]], self.counts[v[s:e]]


def _spread(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every position of the runs [start, start + count), and the run each belongs to."""
    run = np.repeat(np.arange(len(starts)), counts)
    return starts[run] + np.arange(len(run)) - np.repeat(np.cumsum(counts) - counts, counts), run


def _batches(sizes: np.ndarray, block: int) -> Iterator[tuple[int, int]]:
    """Consecutive slices [s, e) of `sizes` summing to about `block` each (one item more
    than a block stays alone)."""
    if len(sizes) == 0:
        return
    group = (np.cumsum(sizes) - sizes) // block
    cuts = np.flatnonzero(np.diff(group)) + 1
    yield from zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(sizes)].tolist(), strict=True)


def _near(row_h: np.ndarray, col_start: np.ndarray, col_n: np.ndarray, hs: np.ndarray, radius: int,
          block: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Compare each row's hash with hs[col_start:col_start + col_n]; yield (row, position in
    hs, xor) of the cells within `radius`, computing about `block` cells at a time. The
    cells are built as flat arrays (no Python loop per bucket); a row longer than a block (a
    bucket of many identical keys) is cut into pieces so memory stays bounded."""
    rows = np.arange(len(row_h))
    long = col_n > block
    if long.any():  # pieces of one block: the same row against consecutive column ranges
        pieces = np.where(long, -(-col_n // block), 1)
        rows = np.repeat(rows, pieces)
        k = np.arange(len(rows)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        col_start = np.repeat(col_start, pieces) + k * block
        col_n = np.minimum(np.repeat(col_n, pieces) - k * block, block)
    for s, e in _batches(col_n, block):
        n = col_n[s:e]
        first = np.cumsum(n) - n  # the row's first cell
        x = np.repeat(row_h[rows[s:e]], n)
        x ^= hs[np.repeat(col_start[s:e] - first, n) + np.arange(int(first[-1] + n[-1]))]
        hit = np.flatnonzero(np.bitwise_count(x) <= radius)
        if len(hit):
            r = np.searchsorted(first, hit, side="right") - 1
            yield rows[s:e][r], col_start[s:e][r] + hit - first[r], x[hit]


# -- building blocks -----------------------------------------------------------------------------
def substring_radii(radius: int, tables: int) -> list[int]:
    """Search radius of each substring (Norouzi et al., Proposition 2): a pair within
    `radius` is within r of its key in one of the first a + 1 substrings or within r - 1 in
    one of the rest, where radius = tables * r + a."""
    r, a = divmod(radius, tables)
    return [r if k <= a else r - 1 for k in range(tables)]


def bit_order(h: np.ndarray) -> np.ndarray:
    """Bit positions from the most to the least informative over these hashes (entropy of
    the bit, on a sample of at most 65536): pHash's DC bit, always 1, comes last."""
    sample = h[::max(1, len(h) // 65536)]
    p = np.array([((sample >> np.uint64(b)) & np.uint64(1)).mean() if len(sample) else 0.5
                  for b in range(64)])
    ent = -(p * np.log2(np.clip(p, 1e-12, 1)) + (1 - p) * np.log2(np.clip(1 - p, 1e-12, 1)))
    return np.argsort(-ent, kind="stable")


def split_bits(order: np.ndarray, tables: int) -> list[np.ndarray]:
    """Bit positions of each substring, dealt round-robin from `order` so that every table
    gets informative bits and none is keyed on bits that rarely change. Any partition keeps
    the search exact; this one only makes buckets smaller."""
    return [np.sort(order[k::tables]) for k in range(tables)]


def substring_keys(h: np.ndarray, bits: np.ndarray) -> np.ndarray:
    key = np.zeros(len(h), dtype=np.int64)
    for i, b in enumerate(bits):
        key |= ((h >> np.uint64(b)) & np.uint64(1)).astype(np.int64) << i
    return key


def flip_masks(width: int, radius: int) -> np.ndarray:
    """Every key mask over `width` bits with at most `radius` bits set, 0 first."""
    out = [0]
    for r in range(1, min(radius, width) + 1):
        out.extend(sum(1 << i for i in c) for c in combinations(range(width), r))
    return np.array(out, dtype=np.int64)


def ball(width: int, radius: int) -> int:
    return sum(comb(width, r) for r in range(min(radius, width) + 1)) if radius >= 0 else 0


# Rough CPU nanoseconds per unit of work, timed phase by phase with numpy 2.4 on the shared
# 2-core machine: a pair of the scan, a candidate cell, a row of cells, a bucket lookup, a
# hash put in one table, a table's fixed Python overhead. Only their ratios matter: they
# pick a plan, never change a result.
NS_SCAN_PAIR, NS_CELL, NS_ROW, NS_LOOKUP, NS_BUILD, NS_TABLE = 4.5, 4.5, 30.0, 10.0, 250.0, 3e6
MAX_FLIPS = 1 << 16  # key masks per table beyond which a plan is not considered


def choose_tables(h: np.ndarray, radius: int, queries: np.ndarray | None = None,
                  sample: int = 1 << 16) -> int:
    """The number of substrings with the least estimated work for a self-join of h (or
    for looking up `queries` in h), or 0 where the plain scan is estimated cheaper.

    A table's candidates are estimated as the fraction of random pairs whose substrings are
    within its radius (a sample, so skewed real hashes are costed as they are)."""
    n = len(h)
    nq = n if queries is None else len(queries)
    pairs = n * (n - 1) / 2 if queries is None else n * nq
    if pairs == 0:
        return 0
    x = _sample_xor(h, queries, sample)
    order = bit_order(h)
    best, best_cost = 0, NS_SCAN_PAIR * pairs
    for m in range(2, max(2, min(radius + 1, 32)) + 1):
        cost = (NS_BUILD * n + NS_TABLE) * m
        for bits, r in zip(split_bits(order, m), substring_radii(radius, m), strict=True):
            flips = ball(len(bits), r)
            if flips > MAX_FLIPS:
                cost = float("inf")
                break
            if r < 0:
                continue
            mask = np.uint64(sum(1 << int(b) for b in bits))
            cells = float(np.mean(np.bitwise_count(x & mask) <= r)) * pairs
            keys = min(n, 2 ** len(bits))
            lookups = flips * keys / 2 if queries is None else flips * nq
            cost += NS_LOOKUP * lookups + NS_ROW * cells * keys / n + NS_CELL * cells
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _sample_xor(h: np.ndarray, queries: np.ndarray | None, sample: int) -> np.ndarray:
    """h[i] ^ other[j] for all pairs, or for `sample` random ones (a fixed seed: the same
    hashes always get the same plan)."""
    rng = np.random.default_rng(0)
    if queries is None:
        n = len(h)
        if n * (n - 1) // 2 <= sample:
            i, j = np.triu_indices(n, 1)
        else:
            i = rng.integers(0, n, sample)
            j = (i + rng.integers(1, n, sample)) % n
        return h[i] ^ h[j]
    if len(h) * len(queries) <= sample:
        return (queries[:, None] ^ h[None, :]).ravel()
    return queries[rng.integers(0, len(queries), sample)] ^ h[rng.integers(0, len(h), sample)]
