"""The `brainmri` command: thin argument parsing over the package's stage modules."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, IngestConfig, load_config
from .storage import StorageError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="config file (YAML); flags and --set win over it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set seed=1")


def cmd_ingest(a) -> int:
    from .ingest import ingest

    overrides = list(a.overrides)
    for key in ("name", "seed", "val_fraction", "test_fraction", "workers"):
        if getattr(a, key) is not None:
            overrides.append(f"{key}={getattr(a, key)}")
    cfg = load_config(IngestConfig, a.config, overrides)
    res = ingest(a.source, a.dest, cfg)
    m = res.manifest
    f, d = m["files"], m["duplicates"]
    print(f"{'wrote' if res.created else 'already present:'} dataset {m['name']} "
          f"version {res.version} at {res.location.uri}")
    print(f"files seen {f['seen']}: accepted {f['accepted']}, duplicate {f['duplicate']}, "
          f"rejected {f['rejected']} {json.dumps(m['rejected_by_reason'])}")
    print(f"rows per split {json.dumps(m['rows'])}; exact-duplicate groups {d['exact_groups']}, "
          f"near-duplicate pairs {d['near_duplicate_pairs']}, multi-image groups "
          f"{d['groups_with_several_images']}, groups straddling splits "
          f"{d['groups_straddling_splits']}, label conflicts {len(m['label_conflicts'])}")
    print(f"took {res.seconds:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="brainmri", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("ingest", help="ingest a class-folder image tree into a Parquet dataset version")
    p.add_argument("source", help="folder in the Kaggle layout: <class>/* or Training|Testing/<class>/*")
    p.add_argument("dest", help="storage URI: a local folder, file://... or s3://bucket/prefix")
    p.add_argument("--name", help="dataset name (default brain-tumor-mri)")
    p.add_argument("--seed", type=int, help="split seed (default 0)")
    p.add_argument("--val-fraction", type=float, help="validation share of training data (default 0.10)")
    p.add_argument("--test-fraction", type=float,
                   help="test share when SOURCE has no Testing/ folder (default 0.10)")
    p.add_argument("--workers", type=int, help="decode/hash processes (default: all cores)")
    _config_args(p)
    p.set_defaults(func=cmd_ingest)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, StorageError, FileNotFoundError) as e:
        print(f"brainmri {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
