"""`brainmri ingest SOURCE DEST`: a Kaggle-layout image folder -> an immutable dataset version.

    DEST/datasets/<name>/<version>/
        train/part-00000.parquet ...   one row per image (original encoded bytes) or DICOM slice (PNG)
        val/...  test/...
        inventory.csv                  every file under SOURCE: accepted / duplicate / rejected
        rejects.csv                    the rejected ones with their reason
        manifest.json                  written last: a version without it is incomplete

Three passes, none holding all images in memory: (1) walk and inspect every file in
parallel processes (hashes, size, mode, full decode; a DICOM file becomes one record per
frame, its slices spooled as PNG to a nameless local temp file); (2) group exact and near
duplicates and the slices of one DICOM series (identical bytes under two classes are
rejected) and split by group, stratified by class; (3) re-read accepted files (or the
spooled slices) and stream them into Parquet shards, each spooled to a nameless local temp
file, checksummed, then copied into place. Shards are cut by image bytes (plan_shards).

Two engines (IngestConfig.engine, pick_engine): this module's local one, and ingest_ray.py's,
which runs passes 1 and 3 on a Ray cluster and reads SOURCE in place (s3:// included); they
share every rule (ingest_rules.py's inspect_data, plan_shards, write_shard; this module's
publish), so the same content gives the same version, inventory and shard bytes on either.
The ray engine refuses DICOM.

DICOM paths are written as pseudonyms (walk.pseudonym) and DICOM rows keep only
de-identified tags (dicom.py); both need the secret salt from the environment
(dicom.SALT_ENV), which is never written.

Two ingests of the same content into one DEST may run at once: both write the same names
with the same bytes, each through temp files of its own, and the first to finish publishes
the manifest. A crashed attempt's folder is completed by the next run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from ..config import ConfigError, IngestConfig, to_dict
from ..core.storage import Location, check_name, open_location
from . import dicom
from . import images as im
from .datasets import MANIFEST, SPLITS, dataset_root
from .dedup import UnionFind, near_duplicate_pairs
from .ingest_rules import (
    TMP_PREFIX,
    Inspected,
    by_split,
    checked,
    inspect_data,
    keep_inspected,
    plan_shards,
    unreadable,
    write_shard,
)
from .walk import FileRecord, pseudonym, walk_location, walk_source

# A temp file this old belongs to a writer that is gone: a shard is copied in seconds.
STALE_TMP_S = 6 * 3600


@dataclass
class IngestResult:
    version: str
    location: Location
    manifest: dict
    created: bool  # False when an identical version already existed
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


# -- pass 1: walk and inspect ----------------------------------------------------------------
class SliceSpool:
    """Where DICOM slices' PNGs wait between pass 1 and pass 3: a nameless local temp file
    (like the shard spool, the OS reclaims it even on SIGKILL), made at the first slice."""

    def __init__(self):
        self.file = None

    def put(self, data: bytes) -> tuple[int, int]:
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="brainmri-slices-")
        self.file.seek(0, os.SEEK_END)
        return self.file.tell(), self.file.write(data)

    def get(self, offset: int, length: int) -> bytes:
        self.file.seek(offset)
        return self.file.read(length)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


def _inspect_file(args) -> tuple[int, Inspected]:
    i, full, limits, salt = args
    try:
        with open(full, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as e:
        return i, unreadable(e)
    return i, inspect_data(data, limits, salt)


def inspect_all(root: str, records: list[FileRecord], cfg: IngestConfig,
                salt: bytes | None = None, spool: SliceSpool | None = None) -> list[FileRecord]:
    """Inspect every pending record; returns the records with each DICOM file replaced by
    one record per slice (its PNG put in `spool`) and DICOM paths
    made pseudonyms. A DICOM file without `salt` stops the ingest (SaltMissing)."""
    limits = im.ImageLimits(min_side=cfg.min_side, max_pixels=cfg.max_pixels)
    todo = [(i, os.path.join(root, r.path), limits, salt)
            for i, r in enumerate(records) if r.status == "pending"]
    found: dict[int, Inspected] = {}

    def take(i, res):
        if res.dicom and salt is None:
            dicom.salt()  # raises SaltMissing, with the one line that says what to set
        found[i] = res
        keep_inspected(records[i], res, spool)

    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=len(todo), desc="inspect", unit="img", disable=None)
    # fork, not spawn: spawn re-runs the caller's unguarded __main__ in every child. The
    # children only run PIL/numpy code, which is safe to fork.
    if workers > 1 and len(todo) > 64:
        with get_context("fork").Pool(workers) as pool:
            results = pool.imap_unordered(_inspect_file, todo, chunksize=32)
            for i, res in results:
                take(i, res)
                bar.update()
            # Let the workers exit on their own: the context manager's terminate() sends
            # SIGTERM, which children forked from a Ray driver answer with a stack dump.
            pool.close()
            pool.join()
    else:
        for t in todo:
            take(*_inspect_file(t))
            bar.update()
    bar.close()
    outside = _outside_dicom(root, records)
    if outside and salt is None:
        dicom.salt()
    return _expand(records, found, cfg.classes, salt, outside)


def _outside_dicom(root: str, records: list[FileRecord]) -> set[int]:
    """Files outside the class folders are never decoded, but a hospital export dropped
    there carries patient names in its paths: those with the DICM magic, by index."""
    return {i for i, r in enumerate(records)
            if r.reason == im.UNKNOWN_CLASS and dicom.file_has_magic(os.path.join(root, r.path))}


def _expand(records: list[FileRecord], found: dict[int, Inspected], classes: list[str],
            salt: bytes | None, outside: set[int]) -> list[FileRecord]:
    """One record per DICOM slice; every DICOM path (accepted, rejected, or outside the
    class folders) replaced by its pseudonym."""
    out: list[FileRecord] = []
    for i, r in enumerate(records):
        res = found.get(i)
        if res is not None and res.dicom and res.scans:
            out += [FileRecord(path=pseudonym(r.path, classes, salt, s.frame), status=r.status,
                               label=r.label, source_split=r.source_split, info=s.info,
                               source=r.path, frame=s.frame, scan=s, spool=at)
                    for s, at in zip(res.scans, res.spooled, strict=True)]
            continue
        if i in outside or (res is not None and res.dicom):
            r.source, r.path = r.path, pseudonym(r.path, classes, salt)
        out.append(r)
    return out


# -- pass 2: duplicates, groups, split -------------------------------------------------------
def group_and_split(records: list[FileRecord], cfg: IngestConfig,
                    frozen: frozenset[str] = frozenset()) -> dict:
    """Mark exact duplicates, form duplicate groups, assign every group to one split.
    Groups touching `frozen` (sha256 of a frozen test split) go to test."""
    pending = [r for r in records if r.status == "pending"]
    kept, exact_groups, conflicts = _mark_exact_duplicates(pending, cfg.classes)
    group_list, near_pairs = _duplicate_groups(kept, cfg)
    _assign_splits(group_list, kept, cfg, frozen)
    conflicts += _near_label_conflicts(group_list, cfg.classes)
    return {"exact_groups": exact_groups, "near_pairs": len(near_pairs), "groups": group_list,
            "label_conflicts": sorted(conflicts, key=lambda c: c["group"])}


def _mark_exact_duplicates(cands: list[FileRecord], classes: list[str]
                           ) -> tuple[list[FileRecord], list[list[str]], list[dict]]:
    """Exact duplicates: keep one file per set of identical bytes; prefer a Testing copy so
    the official test set stays whole, then the first path. Identical bytes under different
    labels say the image is both classes: no label can be trusted, so every copy is rejected
    (a model must not train or be scored on a contradiction). Returns (kept sorted by path,
    the paths of every set of identical files, those label conflicts)."""
    by_sha = defaultdict(list)
    for r in cands:
        by_sha[r.info.sha256].append(r)
    kept: list[FileRecord] = []
    exact_groups, conflicts = [], []
    for sha, members in by_sha.items():
        members.sort(key=lambda r: (r.source_split != "Testing", r.path))
        if len(members) > 1:
            exact_groups.append(sorted(m.path for m in members))
        if len({r.label for r in members}) > 1:
            conflicts.append(_reject_label_conflict(sha[:16], members, classes))
            continue
        first = members[0]
        first.status = "accepted"
        kept.append(first)
        for r in members[1:]:
            r.status, r.duplicate_of, r.reason = "duplicate", first.path, "identical bytes"
    kept.sort(key=lambda r: r.path)
    return kept, exact_groups, conflicts


def _reject_label_conflict(gid: str, members: list[FileRecord], classes: list[str]) -> dict:
    names = sorted({classes[m.label] for m in members})
    detail = (f"identical bytes filed under classes {', '.join(names)}: "
              f"{', '.join(sorted(m.path for m in members))}")[:300]
    for m in members:
        # The group column ties the copies together in inventory.csv (no split: not written).
        m.status, m.reason, m.detail, m.group = "rejected", im.LABEL_CONFLICT, detail, gid
    return _conflict(gid, "identical", True, members, classes)


def _conflict(gid: str, kind: str, excluded: bool, members, classes: list[str]) -> dict:
    return {"group": gid, "kind": kind, "excluded": excluded, "members": [
        {"path": m.path, "class": classes[m.label]} for m in sorted(members, key=lambda m: m.path)]}


def _duplicate_groups(kept: list[FileRecord], cfg: IngestConfig):
    """Near duplicates among kept files -> ([(group id, members)] sorted by id, near-duplicate
    pairs). Sets each m.group."""
    uf = UnionFind(len(kept))
    phash = np.array([r.info.phash for r in kept], dtype=np.int64)
    mirror = np.array([r.info.phash_mirror for r in kept], dtype=np.int64)
    thumbs = np.frombuffer(b"".join(r.info.thumb for r in kept), dtype=np.uint8).reshape(
        len(kept), -1) if kept else np.zeros((0, im.THUMB * im.THUMB), np.uint8)
    near_pairs = near_duplicate_pairs(phash, thumbs, cfg.phash_distance, cfg.near_dup_similarity,
                                      phash_mirror=mirror)
    for a, b in near_pairs:
        uf.union(a, b)
    _union_series(kept, uf)
    groups: dict[int, list[FileRecord]] = defaultdict(list)
    for i, r in enumerate(kept):
        groups[uf.find(i)].append(r)
    # Group ids derive from content, not from paths or order.
    group_list = []
    for members in groups.values():
        gid = min(m.info.sha256 for m in members)[:16]
        for m in members:
            m.group = gid
        group_list.append((gid, members))
    group_list.sort(key=lambda g: g[0])
    return group_list, near_pairs


def _union_series(kept: list[FileRecord], uf: UnionFind) -> None:
    """The slices of one DICOM series (by its hashed UID) form one group: neighbouring slices
    of a patient in two splits would leak."""
    first: dict[str, int] = {}
    for i, r in enumerate(kept):
        series = r.scan.dicom.get("series") if r.scan is not None and r.scan.dicom else None
        if series:
            uf.union(first.setdefault(series, i), i)


def _near_label_conflicts(group_list, classes: list[str]) -> list[dict]:
    """Near-duplicate groups whose members carry different labels: reported, not resolved.
    Unlike identical bytes, a near match is a measurement (pHash + thumbnail correlation),
    and two classes' similar slices can come close to the threshold (see dedup.py), so
    dropping both on it would lose real scans on a guess. Each file keeps its own label, the
    group sits in one split (by majority label), so nothing leaks; a person settles it."""
    return [_conflict(gid, "near", False, members, classes) for gid, members in group_list
            if len({m.label for m in members}) > 1]


def _majority_label(members: list[FileRecord]) -> int:
    return Counter(m.label for m in members).most_common(1)[0][0]


def _assign_splits(group_list, kept: list[FileRecord], cfg: IngestConfig, frozen: frozenset[str]) -> None:
    """Official Testing groups -> test, frozen-test groups -> test; the rest per class:
    carve test (if no Testing folder) then val from shuffled groups until each reaches its
    share of that class. Sets each m.split."""
    has_testing = any(r.source_split == "Testing" for r in kept)
    by_class, frozen_count = _fixed_test_groups(group_list, frozen)
    rng = np.random.default_rng(cfg.seed)
    for label in sorted(by_class):
        glist = by_class[label]
        order = rng.permutation(len(glist))
        total = sum(len(g[1]) for g in glist) + frozen_count[label]
        want = {"test": 0 if has_testing else round(cfg.test_fraction * total),
                "val": round(cfg.val_fraction * total)}
        got = {"test": frozen_count[label], "val": 0}
        for k in order:
            _, members = glist[k]
            split = next((s for s in ("test", "val") if got[s] < want[s]), "train")
            if split != "train":
                got[split] += len(members)
            for m in members:
                m.split = split


def _fixed_test_groups(group_list, frozen: frozenset[str]) -> tuple[dict[int, list], Counter]:
    """Send groups with a Testing member or a frozen-test member to test; returns the other
    groups by majority label (split still "") and, per label, the files frozen into test
    (they count toward that class's test share)."""
    by_class: dict[int, list] = defaultdict(list)
    frozen_count: Counter = Counter()
    for gid, members in group_list:
        if any(m.source_split == "Testing" for m in members):
            split = "test"
        elif any(m.info.sha256 in frozen for m in members):
            split = "test"
            frozen_count[_majority_label(members)] += len(members)
        else:
            split = ""
            by_class[_majority_label(members)].append((gid, members))
        for m in members:
            m.split = split
    return by_class, frozen_count


# -- pass 3: write -----------------------------------------------------------------------------
# Settings that say how an ingest runs, not what it makes: never part of the version id.
RUN_SETTINGS = ("workers", "engine", "ray_min_files")


def _version_id(records: list[FileRecord], cfg: IngestConfig) -> str:
    h = hashlib.sha256()
    params = {k: v for k, v in to_dict(cfg).items()
              if k not in RUN_SETTINGS and not (k == "frozen_test" and not v)}  # ids of older versions stay
    h.update(json.dumps(params, sort_keys=True).encode())
    for r in sorted(records, key=lambda r: r.path):
        if r.status == "accepted":
            h.update(f"{r.path}\0{r.info.sha256}\0{r.label}\0{r.split}\n".encode())
    return h.hexdigest()[:16]


def _read_row(root: str, r: FileRecord, spool) -> bytes:
    """A row's image: the file again, or a DICOM slice's PNG from the spool; checked
    against pass 1's sha256."""
    if r.spool is not None:
        data = spool.get(*r.spool)
    else:
        with open(os.path.join(root, r.path), "rb") as f:
            data = f.read()
    return checked(data, r)


def _write_shards(root: str, rows: list[FileRecord], split: str, out: Location,
                  cfg: IngestConfig, seed: int, bar, spool=None) -> list[dict]:
    """One split's shards, one after the other (the local engine)."""
    return [write_shard(chunk, lambda r: _read_row(root, r, spool), split, k, out, cfg, bar)
            for k, chunk in enumerate(plan_shards(rows, cfg, seed))]


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def frozen_test_hashes(uri: str) -> frozenset[str]:
    """sha256 of every image in the test split of the dataset version at `uri`."""
    import pyarrow.parquet as pq

    from .datasets import resolve_dataset, split_files, verify_shards

    version, manifest = resolve_dataset(uri)
    verify_shards(version, manifest, ("test",))
    out: set[str] = set()
    for f in split_files(version, manifest, "test"):
        with version.fs.open_input_file(f) as fh:
            out.update(pq.read_table(fh, columns=["sha256"]).column("sha256").to_pylist())
    return frozenset(out)


def ingest(source: str, dest: str, cfg: IngestConfig | None = None) -> IngestResult:
    """SOURCE (a local folder, or an s3:// prefix read in place by the ray engine) -> a
    dataset version under DEST. cfg.engine: see pick_engine."""
    cfg = cfg or IngestConfig()
    cfg.validate()
    check_name(cfg.name, "dataset name")
    t0 = time.time()
    remote = source.startswith("s3://")
    if remote:
        if cfg.engine == "local":
            raise ConfigError(f"SOURCE {source!r} is in S3: the local engine reads local folders; "
                              "use --engine ray (or auto)")
        src = open_location(source, check=True)
        if src.fs.get_file_info(src.path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"SOURCE {source!r} holds no objects")
    elif not os.path.isdir(source):
        raise FileNotFoundError(f"SOURCE {source!r} is not a folder")
    store = open_location(dest, check=True)  # fail fast, before any work

    salt = dicom.salt() if os.environ.get(dicom.SALT_ENV) else None  # a bad one fails here
    frozen = frozen_test_hashes(cfg.frozen_test) if cfg.frozen_test else frozenset()
    if remote:
        records = walk_location(src, cfg.classes)
    else:
        src = open_location(os.path.realpath(source))
        records = walk_source(src.path, cfg.classes)
    if pick_engine(cfg, remote, len(records)) == "ray":
        return _ingest_on_ray(source, src, records, store, cfg, frozen, t0)
    with SliceSpool() as spool:
        return _ingest(source, src.path, records, store, cfg, frozen, salt, spool, t0)


def pick_engine(cfg: IngestConfig, remote: bool, n_files: int) -> str:
    """auto: ray for an object-store SOURCE (read in place, no local copy) or one of more than
    cfg.ray_min_files files; otherwise the local engine (no cluster start-up to pay)."""
    if cfg.engine != "auto":
        return cfg.engine
    return "ray" if remote or n_files > cfg.ray_min_files else "local"


def _ingest(source: str, root: str, records: list[FileRecord], store: Location, cfg: IngestConfig,
            frozen: frozenset[str], salt: bytes | None, spool, t0: float) -> IngestResult:
    records = inspect_all(root, records, cfg, salt, spool)

    def write_all(accepted: list[FileRecord], out: Location) -> list[dict]:
        shards = []
        bar = tqdm(total=len(accepted), desc="write", unit="img", disable=None)
        for split, rows, seed in by_split(accepted, cfg):
            shards += _write_shards(root, rows, split, out, cfg, seed, bar, spool)
        bar.close()
        return shards

    return publish(source, records, store, cfg, frozen, salt, t0, write_all)


def _ingest_on_ray(source: str, src: Location, records: list[FileRecord], store: Location,
                   cfg: IngestConfig, frozen: frozenset[str], t0: float) -> IngestResult:
    """The ray engine: ingest_ray.py's passes 1 and 3 on the cluster, pass 2 here (no DICOM,
    hence no salt: ingest_ray refuses it)."""
    from ..core.cluster import init_ray
    from .ingest_ray import inspect_on_ray, write_on_ray

    init_ray()
    inspect_on_ray(source, src, records, cfg)

    def write_all(accepted: list[FileRecord], out: Location) -> list[dict]:
        return write_on_ray(src, accepted, out, cfg)

    return publish(source, records, store, cfg, frozen, None, t0, write_all)


def publish(source: str, records: list[FileRecord], store: Location, cfg: IngestConfig,
            frozen: frozenset[str], salt: bytes | None, t0: float, write_all) -> IngestResult:
    """Passes 2 and 3 on inspected records, the same for both engines: group and split,
    inventory, `write_all(accepted, version folder)` -> shards, manifest last."""
    grouping = group_and_split(records, cfg, frozen)
    version = _version_id(records, cfg)
    out = dataset_root(store, cfg.name) / version
    if (out / MANIFEST).exists():
        return _present(version, out, t0)
    # A folder without a manifest is read by nobody. It may hold a crashed attempt's files or
    # the work in progress of a concurrent ingest of the same content (same version id), so
    # it is never deleted: every writer writes the same names with the same bytes, each
    # through its own temp file, and _tidy removes only what no writer would leave.
    accepted = [r for r in records if r.status == "accepted"]
    _write_inventory(out, records, cfg)  # before any refusal: it says why
    _refuse_unusable(source, records, accepted, out)
    shards = write_all(accepted, out)

    manifest = build_manifest(version, source, records, grouping, shards, cfg, salt)
    # A concurrent ingest may have published the same version first. (Two that pass this
    # check together both write a manifest: the same shards, only the timestamps differ.)
    if (out / MANIFEST).exists():
        return _present(version, out, t0)
    _tidy(out, shards)
    (out / MANIFEST).write_json(manifest)  # last: this makes the version complete
    return IngestResult(version, out, manifest, created=True, seconds=time.time() - t0)


def _present(version: str, out: Location, t0: float) -> IngestResult:
    manifest = (out / MANIFEST).read_json()
    shards = manifest.get("shards") or []
    if shards and "phash_mirror" not in pq.read_schema((out / shards[0]["path"]).path,
                                                       filesystem=out.fs).names:
        # the same files, labels and splits (the id): mirrored copies did not move a split,
        # but the version predates the mirror hashes, so its leakage check goes without them
        print(f"brainmri: dataset version {version} was written before mirror hashes "
              "(phash_mirror) existed; evaluation's leakage check on it compares without mirrors",
              file=sys.stderr)
    return IngestResult(version, out, manifest, created=False, seconds=time.time() - t0)


def _tidy(out: Location, shards: list[dict]) -> None:
    """Delete, from an unpublished version folder, the files no writer of this version leaves:
    any other name (a crashed attempt's debris), and temp files old enough that their writer
    is gone. A concurrent writer's files have the expected names or are fresh temps: kept."""
    keep = {"inventory.csv", "rejects.csv", MANIFEST} | {s["path"] for s in shards}
    now = time.time_ns()
    sel = pafs.FileSelector(out.path, allow_not_found=True, recursive=True)
    for info in out.fs.get_file_info(sel):
        rel = out.relative(info.path)
        if info.type != pafs.FileType.File or rel in keep:
            continue
        if info.base_name.startswith(TMP_PREFIX) and (
                info.mtime_ns is None or now - info.mtime_ns < STALE_TMP_S * 10**9):
            continue
        try:
            out.fs.delete_file(info.path)
        except FileNotFoundError:  # another writer tidied it first
            pass


def _pydicom_version(records: list[FileRecord]) -> dict:
    if not any(r.source for r in records):
        return {}
    import pydicom

    return {"pydicom": pydicom.__version__}


class UnusableSourceError(ConfigError):
    """A SOURCE that would give a dataset version with no training rows: nothing is published
    (no manifest.json); the inventory says why. One sentence for the user."""


def _write_inventory(out: Location, records: list[FileRecord], cfg: IngestConfig) -> None:
    inv_rows = [[r.path, r.status, r.reason, r.detail, r.duplicate_of,
                 cfg.classes[r.label] if r.label >= 0 else "", r.source_split, r.split, r.group]
                for r in records]
    (out / "inventory.csv").write_bytes(_csv_bytes(
        ["path", "status", "reason", "detail", "duplicate_of", "class", "source_split", "split",
         "group"], inv_rows))
    (out / "rejects.csv").write_bytes(_csv_bytes(
        ["path", "reason", "detail"],
        [[r.path, r.reason, r.detail] for r in records if r.status == "rejected"]))


def _refuse_unusable(source: str, records: list[FileRecord], accepted: list[FileRecord],
                     out: Location) -> None:
    """Zero accepted rows, or zero training rows, must not become the latest version."""
    train = sum(r.split == "train" for r in accepted)
    if accepted and train:
        return
    reasons = dict(sorted(Counter(r.reason for r in records if r.status == "rejected").items()))
    what = ("no image was accepted" if not accepted
            else f"{len(accepted)} images accepted but none in the train split")
    raise UnusableSourceError(
        f"SOURCE {source!r}: {what} ({len(records)} files seen, rejected by reason "
        f"{json.dumps(reasons)}); nothing was published; see {(out / 'inventory.csv').uri} "
        f"and {(out / 'rejects.csv').uri}")


def _dicom_summary(records: list[FileRecord], salt: bytes | None) -> dict | None:
    """Counts only: no tag values, no paths. salt_id tells whether two versions' series
    hashes are comparable (the same salt) without revealing the salt."""
    slices = [r for r in records if r.scan is not None and r.scan.dicom]
    rejected = [r for r in records if r.source and r.scan is None]
    if not slices and not rejected:
        return None
    accepted = [r for r in slices if r.status == "accepted"]
    return {"files": len({r.source for r in slices}) + len(rejected), "slices": len(slices),
            "slices_accepted": len(accepted),
            "series": len({r.scan.dicom["series"] for r in accepted if r.scan.dicom["series"]}),
            "transfer_syntaxes": dict(sorted(Counter(
                r.scan.dicom["transfer_syntax"] for r in slices).items())),
            "windows": dict(sorted(Counter(r.scan.dicom["window"] for r in slices).items())),
            "salt_id": dicom.salt_id(salt) if salt else None, "salt_env": dicom.SALT_ENV}


def build_manifest(version, source, records, grouping, shards, cfg, salt: bytes | None = None) -> dict:
    import imagehash
    import PIL

    status = Counter(r.status for r in records)
    counts = {s: {c: 0 for c in cfg.classes} for s in SPLITS}
    for r in records:
        if r.status == "accepted":
            counts[r.split][cfg.classes[r.label]] += 1
    group_splits = defaultdict(set)
    for r in records:
        if r.status == "accepted":
            group_splits[r.group].add(r.split)
    multi = [(gid, m) for gid, m in grouping["groups"] if len(m) > 1]
    return {
        "format": "brainmri.dataset/1",
        "name": cfg.name,
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_unix": time.time(),
        "source": source if source.startswith("s3://") else os.path.abspath(source),
        "classes": list(cfg.classes),
        "files": {"seen": len(records), "accepted": status["accepted"],
                  "duplicate": status["duplicate"], "rejected": status["rejected"]},
        "rejected_by_reason": dict(sorted(Counter(
            r.reason for r in records if r.status == "rejected").items())),
        "counts": counts,
        "rows": {s: sum(counts[s].values()) for s in SPLITS},
        "duplicates": {
            "exact_groups": len(grouping["exact_groups"]),
            "exact_files_dropped": status["duplicate"],
            "near_duplicate_pairs": grouping["near_pairs"],
            "groups_with_several_images": len(multi),
            "images_in_such_groups": sum(len(m) for _, m in multi),
            "largest_group": max((len(m) for _, m in multi), default=1),
            "groups_straddling_splits": sum(len(s) > 1 for s in group_splits.values()),
            "exact": grouping["exact_groups"],
            "near": [sorted(x.path for x in m) for _, m in multi],
        },
        "label_conflicts": grouping["label_conflicts"],
        "dicom": _dicom_summary(records, salt),
        "shards": shards,
        "ingest": to_dict(cfg),
        "versions": {"python": platform.python_version(), "pyarrow": pa.__version__,
                     "numpy": np.__version__, "pillow": PIL.__version__,
                     "imagehash": imagehash.__version__, **_pydicom_version(records)},
    }
