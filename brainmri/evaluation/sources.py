"""What `brainmri evaluate` can read: a dataset version's split, or a plain image folder.

Either way the result is a Ray Dataset of rows {path, label, sha256, phash, reason, detail,
x} where x is the deterministic preprocessed uint8 image (transforms.preprocess) and a
non-empty `reason` marks a file rejected by the same rules as ingest (images.inspect_image
after walk.walk_source's placement rules). Rejected rows travel on, so the driver counts
them; the model skips them.

A local folder is read by the Ray workers themselves: on a multi-node cluster it must be a
shared filesystem path (or use s3://). Only the listing happens on the driver.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from ..config import IngestConfig
from ..core.storage import Location, StorageError, open_location
from ..data import dicom
from ..data import images as im
from ..data.datasets import (
    MANIFEST,
    SHARD_BLOCK_BYTES,
    SHARD_TASK_ROWS,
    SPLITS,
    manifest_hash,
    read_known_files,
    verify_shards,
)
from ..data.walk import place, pseudonym, walk_source
from .inference import load_folder_batch, prepare_dataset_batch

DATASET_COLUMNS = ["image", "label", "path", "sha256", "phash"]


def default_limits() -> im.ImageLimits:
    """Ingest's defaults: evaluation and prediction refuse exactly what ingest refuses."""
    c = IngestConfig()
    return im.ImageLimits(min_side=c.min_side, max_pixels=c.max_pixels)


@dataclass
class Source:
    kind: str  # "dataset" | "folder"
    location: Location
    data_id: str  # report folder name
    describe: dict  # what the report says about the data
    files: list[tuple[str, int]] = field(default_factory=list)  # folder: (relative path, label)
    walk_rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, detail)
    shards: list[dict] = field(default_factory=list)  # dataset: the split's manifest records, in order
    split: str = ""
    dataset_uri: str = ""
    classes: list[str] = field(default_factory=list)
    # folder: a DICOM pseudonym -> (real relative path, frame); kept in memory, never written
    real: dict[str, tuple[str, int]] = field(default_factory=dict)
    salt: bytes = b""

    def pseudonymise(self, paths: np.ndarray, is_dicom: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Folder rows of DICOM files get their pseudonym (walk.pseudonym) before anything is
        written; dataset rows have theirs from ingest. Salt: dicom.salt_or_random."""
        out = np.asarray(paths, dtype=object).copy()
        for i in np.flatnonzero(np.asarray(is_dicom, dtype=bool)):
            frame = int(frames[i]) if frames[i] >= 0 else None
            out[i] = pseudonym(str(paths[i]), self.classes, self._salt(), frame)
            self.real[out[i]] = (str(paths[i]), frame if frame is not None else 0)
        return out

    def _salt(self) -> bytes:
        if not self.salt:
            self.salt = dicom.salt_or_random()
        return self.salt

    @property
    def count(self) -> int:
        """Rows the inference pipeline yields (a folder's unreadable files get theirs too)."""
        return self.describe["rows"] if self.kind == "dataset" else len(self.files)

    def read_bytes(self, paths: list[str]) -> dict[str, bytes]:
        """The stored image of a few rows (for galleries), by their report path: the
        original bytes, or a DICOM slice's PNG."""
        if self.kind == "folder":
            return {p: self._folder_image(p) for p in paths}
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        want, out = pa.array(sorted(set(paths)), pa.string()), {}
        for shard in self.shards:  # one shard at a time: memory stays one shard's worth
            path = (self.location / shard["path"]).path
            t = pq.ParquetFile(self.location.fs.open_input_file(path)).read(columns=["path", "image"])
            t = t.filter(pc.is_in(t.column("path"), value_set=want))
            out.update(zip(t.column("path").to_pylist(), t.column("image").to_pylist(), strict=False))
        return out


    def _folder_image(self, p: str) -> bytes:
        if p not in self.real:
            return (self.location / p).read_bytes()
        rel, frame = self.real[p]
        return im.inspect_scans((self.location / rel).read_bytes(), default_limits())[frame].image


# -- opening ------------------------------------------------------------------------------------
def open_source(uri: str, classes: list[str], split: str = "test") -> Source:
    """A dataset version (or a dataset folder -> latest version), else a class-folder tree."""
    loc = open_location(uri, check=True)
    if (loc / MANIFEST).exists() or _holds_versions(loc):
        return _dataset_source(loc, classes, split)
    if not loc.exists():
        raise StorageError(f"no dataset version or image folder at {loc.uri}")
    return _folder_source(loc, classes)


def _holds_versions(loc: Location) -> bool:
    return loc.exists() and not loc.is_file() and any(
        (loc / v / MANIFEST).exists() for v in loc.listdir())


def _dataset_source(loc: Location, classes: list[str], split: str) -> Source:
    from ..data.datasets import resolve_dataset

    version, manifest = resolve_dataset(loc.uri)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if list(manifest["classes"]) != list(classes):
        raise StorageError(f"dataset classes {manifest['classes']} differ from the model's {classes}")
    records = [s for s in manifest["shards"] if s["split"] == split]
    if not records:
        raise StorageError(f"dataset {version.uri} has no {split} rows")
    verify_shards(version, manifest, (split,))
    describe = {"kind": "dataset version", "uri": version.uri, "name": manifest["name"],
                "version": manifest["version"], "split": split,
                "manifest_hash": manifest_hash(manifest), "rows": manifest["rows"][split],
                "counts": manifest["counts"][split], "created_at": manifest.get("created_at")}
    data_id = f"{manifest['name']}-{manifest['version']}-{split}"
    return Source("dataset", version, data_id, describe, split=split, dataset_uri=version.uri,
                  shards=records)


def _folder_source(loc: Location, classes: list[str]) -> Source:
    src = Source("folder", loc, "", {}, classes=list(classes))
    if loc.is_s3:
        files, rejects = _classify_keys([f.path[len(loc.path) + 1:] for f in loc.files()], classes)
        seen = [p for p, _ in files] + [p for p, _, _ in rejects]
    else:
        files, rejects, seen = [], [], []
        for r in walk_source(loc.path, classes):
            seen.append(r.path)
            if r.status == "rejected":
                # never decoded, but a DICOM export's path names patients: as ingest does
                path = (src.pseudonymise([r.path], [True], [-1])[0] if r.reason == im.UNKNOWN_CLASS
                        and dicom.file_has_magic(os.path.join(loc.path, r.path)) else r.path)
                rejects.append((path, r.reason, r.detail))
            else:
                files.append((r.path, r.label))
    if not files:  # e.g. a lake root given by mistake: say so rather than report on nothing
        raise StorageError(f"no files in class folders ({', '.join(classes)}) under {loc.uri}; "
                           "for a dataset give its version folder or STORE/datasets/<name>")
    listing = "\n".join(sorted(seen))  # the real paths: a report's folder does not change with the salt
    digest = hashlib.sha256(f"{loc.uri}\n{listing}".encode()).hexdigest()[:12]
    describe = {"kind": "image folder", "uri": loc.uri, "files": len(files) + len(rejects),
                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    src.data_id, src.describe, src.files, src.walk_rejects = f"folder-{digest}", describe, files, rejects
    return src


def _classify_keys(keys: list[str], classes: list[str]):
    """ingest's placement rules (`walk.place`) for object keys: S3 has no symlinks or
    special files, so place() is the whole check."""
    files, rejects = [], []
    for rel in sorted(keys):
        _, label, reason, detail = place(rel, classes)
        if reason:
            rejects.append((rel, reason, detail))
        else:
            files.append((rel, label))
    return files, rejects


def to_ray_dataset(src: Source, size: int, batch_size: int):
    """The source as a Ray Dataset of preprocessed rows (lazy: nothing runs yet)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # evaluate draws its own
    if src.kind == "dataset":
        # the listed shards, no listing; other columns are never loaded
        ds = read_known_files("DatasetShards", src.location, src.shards, DATASET_COLUMNS, SHARD_BLOCK_BYTES,
                              task_rows=SHARD_TASK_ROWS)
        # a block at a time, so Ray Data fuses it into the read (as the training feed's decode):
        # the encoded bytes never cross the object store; the inference actors batch themselves
        return ds.map_batches(prepare_dataset_batch, fn_kwargs={"size": size},
                              batch_size=None, batch_format="numpy")
    items = [{"path": p, "label": label} for p, label in src.files]
    blocks = max(1, min(len(items) // batch_size + 1, 2 * (os.cpu_count() or 1), 200))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    return ds.map_batches(load_folder_batch, batch_size=batch_size, batch_format="numpy",
                          fn_kwargs={"root_uri": src.location.uri, "size": size,
                                     "limits": default_limits()})
