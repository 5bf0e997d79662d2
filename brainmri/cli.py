"""The `brainmri` command: thin argument parsing over the package's stage modules."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, IngestConfig, TrainConfig, TuneConfig, load_config
from .core.storage import StorageError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="config file (YAML); flags and --set win over it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set seed=1")


def _overrides(a, keys: tuple[str, ...]) -> list[str]:
    """--set items plus every given flag among `keys`, as key=value overrides."""
    return list(a.overrides) + [f"{k}={getattr(a, k)}" for k in keys if getattr(a, k) is not None]


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset version URI, dataset folder, or store URI (default ./lake)")
    p.add_argument("--dataset", help="dataset name when --data is a store (default brain-tumor-mri)")


def cmd_ingest(a) -> int:
    from .data.ingest import ingest

    overrides = _overrides(a, ("name", "seed", "val_fraction", "test_fraction", "workers"))
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
    from .training.train import run_training

    overrides = _overrides(a, ("data", "dataset", "out", "name", "model", "epochs", "batch_size",
                               "lr", "image_size", "num_workers", "seed", "limit_train", "limit_val"))
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


def cmd_tune(a) -> int:
    from .ops.tune import run_search

    overrides = _overrides(a, ("data", "dataset", "out", "space", "name", "num_samples",
                               "max_concurrent", "epochs", "workers_per_trial", "seed",
                               "grace_period", "limit_train", "limit_val"))
    if a.gpu:
        overrides.append("gpu=true")
    if a.no_evaluate:
        overrides.append("evaluate=false")
    res = run_search(load_config(TuneConfig, a.config, overrides))
    print(f"search {res.experiment_uri}: {len(res.leaderboard)} trials in {res.seconds / 60:.1f} min")
    for r in res.leaderboard[:5]:
        f1 = r["best_val_macro_f1"]
        print(f"  {r['rank']}. {r['trial']:<28} {r['status']:<26} val macro-F1 "
              f"{'n/a' if f1 is None else f'{f1:.4f}'} ({r['epochs_run']} epochs, {r['wall_s']:.0f} s)")
    if res.model_uri:
        print(f"published model {res.model_uri}")
    if res.report_uri:
        print(f"test report {res.report_uri}/report.html")
    print(f"leaderboard {res.experiment_uri}/leaderboard.html")
    return 0


def cmd_retrain(a) -> int:
    from .ops.retrain import RetrainConfig, retrain

    overrides = _overrides(a, ("store", "dataset", "incoming", "recipe", "champion",
                               "tolerance_macro_f1", "tolerance_glioma_recall", "lock_ttl_min",
                               "wait_lock_s")) + [f"train.{kv}" for kv in a.train]
    d = retrain(load_config(RetrainConfig, a.config, overrides))
    print(f"retrain: {d.action}: {d.reason}")
    if d.record:
        r = d.record
        ch = r["challenger"]["test"]
        print(f"challenger {r['challenger']['model']}: test macro-F1 {ch['macro_f1']:.4f}, "
              f"glioma recall {ch['glioma_recall']:.4f} on {ch['n']} frozen test images")
        if r["champion"]:
            cp = r["champion"]["test"]
            print(f"champion   {r['champion']['model']}: test macro-F1 {cp['macro_f1']:.4f}, "
                  f"glioma recall {cp['glioma_recall']:.4f}")
    return 0


def probability(text: str) -> float:
    """argparse type for --abstain-below: a float in [0, 1] (else a usage error, exit 2)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{v} is not a probability in [0, 1]")
    return v


def cmd_evaluate(a) -> int:
    from .evaluation.evaluate import evaluate

    res = evaluate(a.model, a.data, a.out, split=a.split, abstain_below=a.abstain_below,
                   batch_size=a.batch_size, gpu=a.gpu, concurrency=a.concurrency,
                   near_dup_distance=a.near_dup_distance)
    m, c = res.metrics, res.metrics["counts"]
    allm = m["metrics"]["all"]
    print(f"evaluated {c['evaluated']} images, rejected {c['rejected']} "
          f"{json.dumps(c['rejected_by_reason'])} in {res.seconds:.1f} s")
    if c["evaluated"]:
        print(f"accuracy {allm['accuracy']:.4f}, balanced accuracy {allm['balanced_accuracy']:.4f}, "
              f"macro-F1 {allm['macro_f1']:.4f}, ECE {allm['ece_uncalibrated']:.4f} -> "
              f"{allm['ece']:.4f} (T = {m['calibration']['temperature']:.3f})")
    leak = m["leakage"]
    if leak.get("available"):
        clean = m["metrics"]["without_training_duplicates"]
        print(f"training duplicates: {leak['exact_duplicates']} exact, {leak['near_duplicates']} "
              f"near; without them ({clean['n']} images) accuracy {clean.get('accuracy', float('nan')):.4f}")
    print(f"report {res.report_uri}/report.html")
    return 0


def cmd_calibrate(a) -> int:
    from .evaluation.calibration import fit_temperature

    rec = fit_temperature(a.model, batch_size=a.batch_size)
    print(f"T = {rec['temperature']:.4f} on {rec['n']} validation images: NLL "
          f"{rec['nll_before']:.4f} -> {rec['nll_after']:.4f}, ECE {rec['ece_before']:.4f} -> "
          f"{rec['ece_after']:.4f}; wrote {rec['path']}")
    return 0


def cmd_predict(a) -> int:
    from .evaluation.predict import run

    return run(a.paths, a.model, fmt=a.format, output=a.output, abstain_below=a.abstain_below,
               batch_size=a.batch_size)


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
    _data_args(p)
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

    p = sub.add_parser("tune", help="search architectures and hyperparameters with Ray Tune (ASHA); "
                       "publish and evaluate the winner")
    _data_args(p)
    p.add_argument("--out", help="storage URI; results go to OUT/tune/<name>/ (default ./lake)")
    p.add_argument("--space", help="search-space YAML (default configs/tune-cpu.yaml)")
    p.add_argument("--name", help="experiment name; re-running with the same name resumes the search")
    p.add_argument("--num-samples", type=int, help="trials to sample from the space (default 8)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials at once (default 0 = as many as fit, leaving CPU for Ray Data)")
    p.add_argument("--epochs", type=int, help="max epochs per trial, ASHA's max_t (default: the space's)")
    p.add_argument("--grace-period", type=int, help="epochs before ASHA may stop a trial (default 2)")
    p.add_argument("--workers-per-trial", type=int, help="DDP workers in each trial (default 1)")
    p.add_argument("--gpu", action="store_true",
                   help="one GPU per train worker; the winner is evaluated on a GPU too")
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--no-evaluate", action="store_true",
                   help="publish the winner but skip its test-split evaluation report")
    p.add_argument("--limit-train", type=int, help="use only N training images per trial (quick looks)")
    p.add_argument("--limit-val", type=int, help="use only N validation images per trial")
    _config_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("retrain", help="scheduled retraining: new data -> challenger -> promoted "
                       "only if not worse than the champion on the frozen test set")
    p.add_argument("--store", help="storage URI with datasets/, models/ and retrain/ (default ./lake)")
    p.add_argument("--dataset", help="dataset name (default brain-tumor-mri)")
    p.add_argument("--incoming", help="raw scans in class folders (local or s3://); without it, "
                   "a newer dataset version in the store counts as new data")
    p.add_argument("--recipe", help="TrainConfig YAML for challengers (default: the champion's recipe)")
    p.add_argument("--champion", help="bootstrap from this published model when there is no champion yet")
    p.add_argument("--tolerance-macro-f1", type=float, help="allowed macro-F1 drop (default 0.01)")
    p.add_argument("--tolerance-glioma-recall", type=float, help="allowed glioma-recall drop (default 0.02)")
    p.add_argument("--lock-ttl-min", type=float, help="lease length; a dead holder's lease expires (default 360)")
    p.add_argument("--wait-lock-s", type=float,
                   help="wait this long for a running retrain, then exit 0 doing nothing (default 0)")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="override one training key of the recipe (repeatable), e.g. --train epochs=20")
    _config_args(p)
    p.set_defaults(func=cmd_retrain)

    model_help = ("model version URI, models/<name> folder (its latest version), checkpoint "
                  "folder or .pt file")
    p = sub.add_parser("evaluate", help="evaluate a model on a dataset split or an image folder; "
                       "writes a self-contained report")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--data", required=True,
                   help="dataset version (or dataset folder: its latest version), or an image "
                        "folder in the Kaggle class-folder layout (local path or s3://)")
    p.add_argument("--out", required=True,
                   help="storage URI; the report goes to OUT/reports/<model>-<version>/<data-id>/")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="split to evaluate when --data is a dataset (default test)")
    p.add_argument("--abstain-below", type=probability, metavar="P",
                   help="flag predictions whose calibrated confidence is below P as 'refer to a "
                        "radiologist' and report accuracy at the coverage this gives")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference batch (default 64)")
    p.add_argument("--gpu", action="store_true",
                   help="one GPU per inference actor (channels-last, bf16 autocast)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="inference actors, each holding one copy of the model (default 1)")
    p.add_argument("--near-dup-distance", type=int, default=4,
                   help="pHash Hamming distance at or below which an image counts as a near "
                        "duplicate of a training image (default 4)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit temperature scaling on the model's validation "
                       "split and write calibration.json next to the model")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("predict", help="classify image files, folders or URIs (exit 1 if any failed)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image file, folder (all files under it) or s3:// URI")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--format", default="jsonl", choices=["jsonl", "csv"],
                   help="output format (default jsonl: one JSON object per image)")
    p.add_argument("--output", metavar="FILE",
                   help="write to FILE (path or URI, atomically) instead of standard output")
    p.add_argument("--abstain-below", type=probability, metavar="P",
                   help="flag predictions with confidence below P as 'refer to a radiologist'")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.set_defaults(func=cmd_predict)
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
