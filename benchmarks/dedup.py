"""Benchmark the near-duplicate candidate search: the multi-index hash against the all-pairs scan.

    .venv/bin/python -m benchmarks.dedup [--sizes 10000,100000,1000000] [--scan-max 100000]
        [--kinds uniform,phash] [--distance 12] [--swaps 4] [--cache FILE] [--skip-real]

real     the shared Training set (5712 scans) hashed by ingest's own code (inspect_image;
         cached in --cache, default in the temp folder), each image's pHash and its mirror's
         joined as ingest joins them: near_duplicate_pairs (index) and
         near_duplicate_pairs_allpairs (scan) with ingest's thresholds must give the same
         pairs and the same groups; both timed.
uniform  n random 64-bit hashes, 5% of them planted copies of an earlier hash with 0..14
         random bits flipped (so some sit just beyond the distance).
phash    hashes drawn like real pHashes: a real pHash of the shared set picked at random and
         moved by --swaps random swaps of a 1 bit and a 0 bit (popcount stays 32, as pHash's
         always is), plus the same 5% planted copies. It keeps the real skew (a constant DC
         bit, biased and correlated bits), which makes candidates far more frequent than for
         uniform hashes; the script prints the fraction of pairs within the distance.

Sizes count hashes joined: ingest joins two per image (its pHash and its mirror's), so a
row at n hashes is the search ingest runs for n/2 images.

For each size: the planner's choice of substrings, pairs found within --distance, candidate
pairs compared, CPU and wall seconds, and the same for the scan up to --scan-max (whose pair
set must equal the index's). Beyond --scan-max the scan's time is extrapolated quadratically
from the largest size it ran at, and marked so. CPU seconds (time.process_time) are the
figures to compare on a shared machine; wall seconds are given too.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import scans
from brainmri.config import IngestConfig
from brainmri.data import dedup


def real_hashes(cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pHash, the mirror's pHash and thumbnails of every shared Training scan, by ingest's
    inspect_image (a cache from before mirror hashes, or of another number of scans, is rebuilt)."""
    files = [f for per_class in scans().values() for f in per_class]
    if cache.exists():
        z = np.load(cache)
        if "phash_mirror" in z and len(z["phash"]) == len(files):
            return z["phash"], z["phash_mirror"], z["thumbs"]
    from brainmri.data import images as im

    t = time.perf_counter()
    infos = [im.inspect_image(f.read_bytes()) for f in files]
    print(f"hashed {len(files)} real scans in {time.perf_counter() - t:.0f} s (cached in {cache})")
    phash = np.array([i.phash for i in infos], dtype=np.int64)
    mirror = np.array([i.phash_mirror for i in infos], dtype=np.int64)
    thumbs = np.frombuffer(b"".join(i.thumb for i in infos), np.uint8).reshape(len(infos), -1)
    np.savez(cache, phash=phash, phash_mirror=mirror, thumbs=thumbs)
    return phash, mirror, thumbs


# -- synthetic hashes ------------------------------------------------------------------------
def plant_copies(rng, h: np.ndarray, share: float = 0.05) -> np.ndarray:
    """Replace `share` of the hashes by copies of an earlier one with 0..14 random bits flipped."""
    n = len(h)
    dst = rng.choice(np.arange(1, n), int(share * n), replace=False) if n > 1 else np.zeros(0, int)
    src = (rng.random(len(dst)) * dst).astype(np.int64)
    out = h.copy()
    out[dst] = h[src] ^ random_flips(rng, rng.integers(0, 15, len(dst)))
    return out


def random_flips(rng, k: np.ndarray) -> np.ndarray:
    """One mask per entry of k with k distinct random bits set (in chunks: bounded memory)."""
    out = np.zeros(len(k), np.uint64)
    for s in range(0, len(k), 65536):
        kk = k[s:s + 65536]
        rank = np.argsort(rng.random((len(kk), 64)), axis=1)  # a random order of the 64 bits
        chosen = rank < kk[:, None]
        out[s:s + 65536] = (chosen.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(
            axis=1, dtype=np.uint64)
    return out


def uniform(rng, n: int) -> np.ndarray:
    i64 = np.iinfo(np.int64)
    return plant_copies(rng, rng.integers(i64.min, i64.max, n, dtype=np.int64, endpoint=True).view(np.uint64))


def phash_like(rng, n: int, real: np.ndarray, swaps: int) -> np.ndarray:
    h = real[rng.integers(0, len(real), n)]
    for s in range(0, n, 65536):  # chunks: a (chunk, 64) bit matrix at a time
        part = h[s:s + 65536]
        for _ in range(swaps):
            bits = ((part[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).astype(bool)
            r = rng.random((len(part), 64))
            one, zero = np.argmax(r * bits, axis=1), np.argmax(r * ~bits, axis=1)
            part = part ^ (np.uint64(1) << one.astype(np.uint64)) ^ (np.uint64(1) << zero.astype(np.uint64))
        h[s:s + 65536] = part
    return plant_copies(rng, h)


# -- the runs --------------------------------------------------------------------------------
def timed(blocks, n: int, keep: bool):
    """Count the pairs of a search (and their codes i * n + j when `keep`), with CPU and wall s."""
    c0, w0 = time.process_time(), time.perf_counter()
    count, codes = 0, []
    for i, j in blocks:
        count += len(i)
        if keep:
            codes.append(i.astype(np.int64) * n + j)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return count, (np.sort(np.concatenate(codes)) if keep and codes else np.zeros(0, np.int64)), cpu, wall


def run_index(h: np.ndarray, d: int, keep: bool):
    c0, w0 = time.process_time(), time.perf_counter()
    m = dedup.choose_tables(h, d)
    if m == 0:  # the planner's own choice: the scan
        pairs, codes, cpu, wall = timed(dedup.scan_pairs(h, d), len(h), keep)
        return {"tables": 0, "pairs": pairs, "codes": codes, "cpu": cpu, "wall": wall}
    index = dedup.HammingIndex(h, d, m)
    plan_cpu, plan_wall = time.process_time() - c0, time.perf_counter() - w0
    pairs, codes, cpu, wall = timed(index.pairs(), len(h), keep)
    return {"tables": m, "pairs": pairs, "codes": codes, "cpu": cpu + plan_cpu, "wall": wall + plan_wall,
            "compared": index.compared}


def bench_kind(kind: str, sizes: list[int], args, real: np.ndarray | None) -> list[dict]:
    rows, scan_ref = [], None
    for n in sizes:
        rng = np.random.default_rng(n)
        h = uniform(rng, n) if kind == "uniform" else phash_like(rng, n, real, args.swaps)
        with_scan = n <= args.scan_max
        idx = run_index(h, args.distance, keep=with_scan)
        row = {"kind": kind, "n": n, "all_pairs": n * (n - 1) // 2,
               **{k: v for k, v in idx.items() if k != "codes"}}
        if with_scan:
            pairs, codes, cpu, wall = timed(dedup.scan_pairs(h, args.distance), n, keep=True)
            same = pairs == idx["pairs"] and np.array_equal(codes, idx["codes"])
            assert same, f"{kind} n={n}: the index and the scan found different pairs"
            row.update(scan_cpu=cpu, scan_wall=wall, scan="measured")
            scan_ref = (n, cpu, wall)
        elif scan_ref:
            f = (n / scan_ref[0]) ** 2
            row.update(scan_cpu=scan_ref[1] * f, scan_wall=scan_ref[2] * f, scan="extrapolated (n^2)")
        rows.append(row)
        print_row(row)
    per_item = [r["cpu"] / r["n"] for r in rows]
    print(f"{kind}: index CPU time per item, largest/smallest size: {per_item[-1] / per_item[0]:.1f} "
          f"({per_item[0] * 1e6:.1f} -> {per_item[-1] * 1e6:.1f} us)")
    return rows


def print_row(r: dict) -> None:
    everything = max(r["all_pairs"], 1)
    compared = r.get("compared", r["all_pairs"])
    line = (f"{r['kind']:8s} n={r['n']:>8,d} tables={r['tables']:>2d} pairs<=d={r['pairs']:>11,d} "
            f"({r['pairs'] / everything:.2e} of all) compared={compared:>14,d} "
            f"({compared / everything:.4f} of all)  "
            f"index {r['cpu']:8.2f} s CPU {r['wall']:8.2f} s wall")
    if "scan_cpu" in r:
        line += (f" | scan {r['scan_cpu']:9.2f} s CPU {r['scan_wall']:9.2f} s wall [{r['scan']}]"
                 f"  scan/index CPU {r['scan_cpu'] / r['cpu']:6.1f}x")
    print(line, flush=True)


def bench_real(phash: np.ndarray, mirror: np.ndarray, thumbs: np.ndarray) -> None:
    """As ingest runs it: every image's pHash and its mirror's joined (2n hashes)."""
    cfg = IngestConfig()
    d, sim = cfg.phash_distance, cfg.near_dup_similarity
    c0 = time.process_time()
    ref = dedup.near_duplicate_pairs_allpairs(phash, thumbs, d, sim, phash_mirror=mirror)
    c1 = time.process_time()
    got = dedup.near_duplicate_pairs(phash, thumbs, d, sim, phash_mirror=mirror)
    c2 = time.process_time()
    both = dedup._with_mirrors(phash, mirror)  # the hashes ingest's self-join runs over
    candidates = sum(len(i) for i, _ in dedup.scan_pairs(both, d))
    print(f"real     n={len(phash)} images, {len(both)} hashes with their mirrors: pHash pairs <= {d}: "
          f"{candidates} ({candidates / (len(both) * (len(both) - 1) / 2):.2e} of all), confirmed near "
          f"duplicates: index {len(got)}, all-pairs {len(ref)}; same pairs: {got == ref}; same groups: "
          f"{groups(got, len(phash)) == groups(ref, len(phash))}; planner: "
          f"{dedup.choose_tables(both, d)} tables; "
          f"CPU index {c2 - c1:.2f} s, all-pairs {c1 - c0:.2f} s (thumbnail check included)")
    assert got == ref


def groups(pairs, n: int) -> set[frozenset[int]]:
    uf = dedup.UnionFind(n)
    for a, b in pairs:
        uf.union(a, b)
    out: dict[int, set[int]] = {}
    for i in range(n):
        out.setdefault(uf.find(i), set()).add(i)
    return {frozenset(g) for g in out.values() if len(g) > 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--scan-max", type=int, default=100000, help="largest n the all-pairs scan runs at")
    ap.add_argument("--kinds", default="uniform,phash")
    ap.add_argument("--distance", type=int, default=IngestConfig.phash_distance)
    ap.add_argument("--swaps", type=int, default=4, help="bit swaps moving each real pHash (phash kind)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "brainmri-real-phash.npz")
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"(a shared machine: compare CPU seconds, and ratios within one run)", flush=True)
    real = None
    if not args.skip_real or "phash" in kinds:
        phash, mirror, thumbs = real_hashes(args.cache)
        real = phash.view(np.uint64)
        if not args.skip_real:
            bench_real(phash, mirror, thumbs)
    for kind in kinds:
        bench_kind(kind, sizes, args, real)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
