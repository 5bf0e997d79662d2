"""Which files of a source tree are candidate images, and where each belongs: the listing and
placement rules shared by ingest (local walk), evaluation of image folders (local walk and
object keys) and prediction (folder expansion), so all of them skip and reject the same files.

- `is_hidden`: a path with a dot-file or OS system-file component is never an image.
- `place`: a SOURCE-relative path -> (source split, label, reject reason, detail), by the
  Kaggle layout alone ([Training|Testing/]<class>/<file>).
- `walk_source`: every entry under a local folder as a `FileRecord`, placed, with symlinks
  and special files rejected; image checks (images.inspect_scans) come later.
- `walk_location`: the same for an object store prefix (s3://), listed through its pyarrow
  filesystem, in walk_source's order; objects have no links and no special files.
- `pseudonym`: what a DICOM file's path becomes wherever it is written (see its docstring).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from . import images as im

SYSTEM_FILES = {"thumbs.db", "desktop.ini", "__macosx", "ehthumbs.db", "icon\r"}
SPLIT_DIRS = {"training": "Training", "testing": "Testing"}
# names a hospital export gives DICOM files; decides for files that are never opened
DICOM_SUFFIXES = {"", ".dcm", ".dicom", ".ima"}


@dataclass
class FileRecord:
    path: str  # relative to SOURCE, '/'-separated
    status: str = "pending"  # accepted | duplicate | rejected
    reason: str = ""
    detail: str = ""
    label: int = -1
    source_split: str = ""
    info: im.ImageInfo | None = None
    duplicate_of: str = ""
    group: str = ""
    split: str = ""
    # A DICOM slice: `path` is its pseudonym, `source` the real SOURCE-relative path (read
    # from, never written), `frame` its index in the file, `scan` its image and tags.
    source: str = ""
    frame: int = 0
    scan: im.Scan | None = None
    spool: tuple[int, int] | None = None  # ingest: (offset, length) of its PNG in the spool file

    @property
    def source_path(self) -> str:
        return self.source or self.path


def is_hidden(parts: list[str]) -> bool:
    """True when any component of a split path is hidden (.name) or an OS system file."""
    return any(p.startswith(".") or p.lower() in SYSTEM_FILES for p in parts)


def place(rel: str, classes: list[str]) -> tuple[str, int, str, str]:
    """Where a SOURCE-relative path belongs, by the Kaggle layout alone:
    (source_split, label, reject_reason, detail); label is -1 when rejected.
    Shared by ingest (local walk) and evaluation of S3 folders (object keys)."""
    parts = rel.split("/")
    if is_hidden(parts):
        return "", -1, im.HIDDEN, ""
    split = ""
    if parts[0].lower() in SPLIT_DIRS:
        split, parts = SPLIT_DIRS[parts[0].lower()], parts[1:]
    class_of = {c.lower(): i for i, c in enumerate(classes)}
    if len(parts) < 2 or parts[0].lower() not in class_of:
        return split, -1, im.UNKNOWN_CLASS, f"expected <class>/{parts[-1]} with class in {classes}"
    return split, class_of[parts[0].lower()], "", ""


def looks_like_dicom_name(rel: str) -> bool:
    """By name alone (for files not opened): .dcm, .dicom, .ima or no suffix at all."""
    return posixpath.splitext(rel.rsplit("/", 1)[-1])[1].lower() in DICOM_SUFFIXES


def pseudonym(rel: str, classes: list[str], salt: bytes, frame: int | None = None) -> str:
    """A DICOM file's path as written anywhere (rows, inventory, manifest, reports):
    hospital exports name folders and files after patients, studies and dates, so only the
    split and class folders stay (they are ours, and say where the file belongs), then
    `dicom-` + a keyed hash of the whole path (the salt's owner can map it back by hashing
    the source's paths), then `#<frame>` for a slice.
    E.g. Training/glioma/DOE^JANE/20190312/IM0001 -> Training/glioma/dicom-3f9c...#0"""
    from .dicom import keyed

    parts = rel.split("/")
    keep = parts[:1] if parts[0].lower() in SPLIT_DIRS else []
    rest = parts[len(keep):]
    if len(rest) > 1 and rest[0].lower() in {c.lower() for c in classes}:
        keep.append(rest[0])
    name = "/".join(keep + [f"dicom-{keyed(salt, 'path', rel)}"])
    return name if frame is None else f"{name}#{frame}"


def safe_name(name: str) -> str:
    """A name from the file system as UTF-8 text: unchanged when it is valid UTF-8, else its
    undecodable bytes as \\xNN escapes (os.fsdecode's surrogateescape, made printable)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def walk_source(root: str, classes: list[str]) -> list[FileRecord]:
    """Every entry under root, classified by place; image checks come later."""
    root = os.path.realpath(root)
    records = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        entries = sorted(filenames)
        # os.walk lists symlinked folders as dirs and does not enter them: account for them.
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                dirnames.remove(d)
                entries.append(d)
        for name in sorted(entries):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            safe = safe_name(rel)
            rec = FileRecord(path=safe)
            records.append(rec)
            if safe != rel:  # a name that is not UTF-8 cannot go into Parquet, CSV or JSON
                rec.status, rec.reason = "rejected", im.UNDECODABLE_NAME
                rec.detail = "file name is not valid UTF-8; rename it"
                continue
            split, label, reason, detail = place(rel, classes)
            if reason == im.HIDDEN:  # before touching the file: never follow a hidden link
                rec.status, rec.reason = "rejected", reason
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if os.path.commonpath([root, target]) != root:
                    rec.status, rec.reason = "rejected", im.SYMLINK_OUTSIDE
                    rec.detail = "link target is outside SOURCE"
                    continue
                if not os.path.isfile(target):
                    rec.status, rec.reason = "rejected", im.NOT_REGULAR
                    rec.detail = "link to a folder or to nothing"
                    continue
            elif not os.path.isfile(full):
                rec.status, rec.reason = "rejected", im.NOT_REGULAR
                continue
            _placed(rec, split, label, reason, detail)
    return records


def _placed(rec: FileRecord, split: str, label: int, reason: str, detail: str) -> None:
    """A record where place() put it: its source split and label, or rejected."""
    rec.source_split = split
    if reason:
        rec.status, rec.reason, rec.detail = "rejected", reason, detail
    rec.label = label


def _walk_order(rel: str) -> tuple:
    """os.walk's top-down order, as walk_source visits: a folder's files (sorted) before its
    subfolders (sorted)."""
    parts = rel.split("/")
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


def walk_location(loc, classes: list[str]) -> list[FileRecord]:
    """Every object under a storage Location (core.storage), classified by place as
    walk_source does (hidden and system files, files outside the class folders); object
    stores have no symlinks or special files, and their keys are UTF-8."""
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(loc.path, allow_not_found=True, recursive=True)
    rels = [loc.relative(i.path) for i in loc.fs.get_file_info(sel)  # keys, never local paths
            if i.type == pafs.FileType.File]
    records = []
    for rel in sorted(rels, key=_walk_order):
        rec = FileRecord(path=rel)
        records.append(rec)
        split, label, reason, detail = place(rel, classes)
        if reason == im.HIDDEN:
            rec.status, rec.reason = "rejected", reason
        else:
            _placed(rec, split, label, reason, detail)
    return records
