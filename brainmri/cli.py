"""The `brainmri` command: thin argument parsing over the package's stage modules."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, IngestConfig, TrainConfig, load_config
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


def cmd_train(a) -> int:
    from .train import run_training

    overrides = list(a.overrides)
    for key in ("data", "dataset", "out", "name", "model", "epochs", "batch_size", "lr",
                "image_size", "num_workers", "seed", "limit_train", "limit_val"):
        if getattr(a, key) is not None:
            overrides.append(f"{key}={getattr(a, key)}")
    if a.gpu:
        overrides.append("gpu=true")
    cfg = load_config(TrainConfig, a.config, overrides)
    res = run_training(cfg)
    b = res.best
    print(f"run {res.run_uri}: {len(res.history)} epochs in {res.seconds / 60:.1f} min; best epoch "
          f"{b['epoch']}: val accuracy {b['val_accuracy']:.4f}, macro-F1 {b['val_macro_f1']:.4f}, "
          f"glioma recall {b.get('val_recall_glioma', float('nan')):.4f}")
    if res.model_uri:
        print(f"published model {res.model_uri}")
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

    p = sub.add_parser("train", help="train a CNN with Ray Train (DDP) on a dataset version")
    p.add_argument("--data", help="dataset version URI, dataset folder, or store URI (default ./lake)")
    p.add_argument("--dataset", help="dataset name when --data is a store (default brain-tumor-mri)")
    p.add_argument("--out", help="storage URI for runs/ and models/ (default ./lake)")
    p.add_argument("--name", help="run name; re-running with the same name resumes it")
    p.add_argument("--model", help="model name from the registry (default brainnet)")
    p.add_argument("--epochs", type=int, help="maximum epochs (default 40; early stopping may end sooner)")
    p.add_argument("--batch-size", type=int, help="batch size per worker (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--image-size", type=int, help="square input side in pixels (default 160)")
    p.add_argument("--num-workers", type=int, help="data-parallel train workers (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast, channels-last")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--limit-train", type=int, help="use only N training images (quick runs)")
    p.add_argument("--limit-val", type=int, help="use only N validation images (quick runs)")
    _config_args(p)
    p.set_defaults(func=cmd_train)
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
