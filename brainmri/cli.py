"""The `brainmri` command: thin argument parsing over the package's stage modules."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing

from .config import (
    MODEL_HELP,
    ConfigError,
    CvConfig,
    EnsembleConfig,
    EvaluateConfig,
    IngestConfig,
    PredictConfig,
    RetrainConfig,
    RunFailed,
    ServeConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    flag_fields,
    from_dict,
    load_config,
    merge,
    parse_overrides,
)
from .core import console
from .core.storage import StorageError

# argparse's own attributes and the shared --config/--set: no config field may take these names
RESERVED = frozenset({"cmd", "func", "config_cls", "config", "overrides", "verbose"})


def _arg_type(parse):
    """An argparse type from a config value parser: its ValueError becomes a usage error (exit 2)."""
    def typed(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    typed.__name__ = parse.__name__
    return typed


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None or value == {} or value == []:
        return "none"
    if value == "":
        return "''"
    return str(value)


def add_config_flags(p: argparse.ArgumentParser, cls, with_defaults: bool = False,
                     only: tuple[str, ...] | None = None) -> None:
    """One flag per field of dataclass `cls` made with `config.flag` (its metadata holds the
    help text): `--kebab-case`, type from the annotation, "(default X)" from the field's
    default. A bool is a switch (`--x`, or `--no-x` when it defaults to true), a dict a
    repeatable `--x KEY=VALUE`, a field without a default a required flag.

    The argparse default is None, so only the flags given become overrides (`given`), unless
    `with_defaults` (a command without a config file): then it is the field's default.
    `only` names the fields to add (a command sharing a few flags of another's config)."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        if only is not None and f.name not in only:
            continue
        if f.name in RESERVED:
            raise TypeError(f"{cls.__name__}.{f.name}: the name is taken by the command line")
        meta = dict(f.metadata)
        text = meta.pop("help")
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(t for t in typing.get_args(tp) if t is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        kw: dict = {"dest": f.name}
        if default is dataclasses.MISSING:  # required; with --config it may come from the file
            kw["required"] = with_defaults
        else:
            kw["default"] = default if with_defaults else None
        names = [option(f.name)]
        if tp is bool:
            if default is True:
                names = ["--no-" + f.name.replace("_", "-")]
                kw["action"] = "store_false"
                text = f"turn off {f.name}: {text}"
            else:
                kw["action"] = "store_true"
        elif typing.get_origin(tp) is dict or tp is dict:
            kw.update(action="append", metavar="KEY=VALUE")
            if with_defaults:
                kw["default"] = None
        elif typing.get_origin(tp) is list and typing.get_args(tp)[0] in (int, float, str):
            kw.update(nargs="+", type=typing.get_args(tp)[0])
        elif tp in (int, float, str):
            kw["type"] = _arg_type(meta.pop("type")) if "type" in meta else tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {tp!r}")
        if default is not dataclasses.MISSING:
            text += f" (default {_shown(default)})"
        kw.update(meta)  # metavar, choices
        p.add_argument(*names, help=text.replace("%", "%%"), **kw)


def given(a: argparse.Namespace, cls=None) -> dict:
    """The config flags given on the command line, as typed overrides ({} when none);
    a dict flag's KEY=VALUE items nest under its name (values parsed as YAML)."""
    cls = cls or a.config_cls
    hints = typing.get_type_hints(cls)
    out: dict = {}
    for f in flag_fields(cls):
        value = getattr(a, f.name, None)
        if value is None:
            continue
        if typing.get_origin(hints[f.name]) is dict or hints[f.name] is dict:  # repeatable KEY=VALUE
            out = merge(out, parse_overrides([f"{f.name}.{kv}" for kv in value]))
        else:
            out[f.name] = value
    return out


def config_from_args(a: argparse.Namespace):
    """The validated config of a parsed command: defaults <- --config YAML <- --set <- flags."""
    cls = a.config_cls
    if not hasattr(a, "overrides"):  # no config file: the flags are the whole config
        return from_dict(cls, given(a, cls))
    return load_config(cls, a.config, merge(parse_overrides(a.overrides), given(a, cls)))


def tracking_from_args(a: argparse.Namespace):
    """The command's MLflow tracking (--tracking-uri / --tracking-experiment, else
    $MLFLOW_TRACKING_URI), or None: off (brainmri.core.tracking)."""
    from .core.tracking import from_config

    return from_config(from_dict(TrackingConfig, given(a, TrackingConfig)))


def _config_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", metavar="YAML", help="config file (YAML); flags and --set win over it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set seed=1")
    return p


def _console_parent() -> argparse.ArgumentParser:
    """The commands that run on Ray: their console shows brainmri's lines, Ray's log only on demand."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--verbose", action="store_true",
                   help=f"also show Ray's own log (worker start-up, per-rank reports, Ray Data plans, "
                        f"warnings); {console.VERBOSE_ENV}=1 does the same")
    return p


def _say(line: str) -> None:
    print(line, flush=True)  # a job's log is a pipe: each epoch's line when it happens


def cmd_ingest(a) -> int:
    from .data.ingest import ingest

    res = ingest(a.source, a.dest, config_from_args(a))
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

    res = run_training(config_from_args(a), progress=_say, tracking=tracking_from_args(a))
    b = res.best
    print(f"run {res.run_uri}: {len(res.history)} epochs in {res.seconds / 60:.1f} min; best epoch "
          f"{b['epoch'] + 1}: val accuracy {b['val_accuracy']:.4f}, macro-F1 {b['val_macro_f1']:.4f}, "
          f"glioma recall {b.get('val_recall_glioma', float('nan')):.4f}")
    if res.model_uri:
        print(f"published model {res.model_uri}")
    return 0


def cmd_tune(a) -> int:
    from .ops.tune import run_search

    res = run_search(config_from_args(a), tracking_from_args(a))
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


def cmd_ensemble(a) -> int:
    from .training.ensemble import combine

    res = combine(a.models, config_from_args(a))
    m = res.metrics
    own = ", ".join(f"{r['best_val_macro_f1']:.4f}" for r in res.members)
    print(f"ensemble of {len(res.members)} models on {m['val_n']} validation images: accuracy "
          f"{m['val_accuracy']:.4f}, macro-F1 {m['val_macro_f1']:.4f}, glioma recall "
          f"{m.get('val_recall_glioma', float('nan')):.4f} (members' best macro-F1 "
          f"{own}; {res.seconds:.0f} s)")
    print(f"published model {res.model_uri}")
    return 0


def cmd_cv(a) -> int:
    from .ops.cv import run_cv

    res = run_cv(config_from_args(a), tracking_from_args(a))
    for f in res.folds:
        m = f["metrics"]
        print(f"  fold {f['fold']}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, "
              f"glioma recall {m.get('recall_glioma', float('nan')):.4f}  ({f['report']})")
    for k in ("accuracy", "macro_f1", "recall_glioma"):
        if k in res.summary:
            s = res.summary[k]
            print(f"{k}: {s['mean']:.4f} +- {s['sd']:.4f} (sd over {len(res.folds)} folds; "
                  f"min {s['min']:.4f}, max {s['max']:.4f})")
    print(f"cross-validation {res.uri}/cv.md in {res.seconds / 60:.1f} min")
    return 0


def cmd_retrain(a) -> int:
    from .ops.retrain import retrain

    d = retrain(config_from_args(a), progress=_say, tracking=tracking_from_args(a))
    print(f"retrain: {d.action}: {d.reason}")
    if d.record:
        r = d.record
        ch = r["challenger"]["test"]
        print(f"challenger {r['challenger']['model']}: test macro-F1 {ch['macro_f1']:.4f}, "
              f"glioma recall {ch['recall_glioma']:.4f} on {ch['n']} frozen test images")
        if r["champion"]:
            cp = r["champion"]["test"]
            print(f"champion   {r['champion']['model']}: test macro-F1 {cp['macro_f1']:.4f}, "
                  f"glioma recall {cp['recall_glioma']:.4f}")
    return 0


def cmd_evaluate(a) -> int:
    from .evaluation.evaluate import evaluate

    cfg = config_from_args(a)
    res = evaluate(cfg)
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

    return run(a.paths, config_from_args(a))


def cmd_serve(a) -> int:
    from .serving.app import run

    return run(config_from_args(a))


class _Parser(argparse.ArgumentParser):
    """argparse, and one hint: a list flag (`--classes a b`) takes every value after it, so
    `ingest --classes a b SRC DEST` leaves no positional arguments; the error says so."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        lists = [o for a in self._actions if a.nargs == "+" for o in a.option_strings
                 if o in getattr(self, "_given", ())]
        if lists and "arguments are required" in message:
            message += (f" ({lists[0]} took every value after it: give the positional arguments "
                        f"first, or end its list with --)")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="brainmri", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    cfg = [_config_parent()]
    on_ray = [_config_parent(), _console_parent()]

    p = sub.add_parser("ingest", parents=cfg,
                       help="ingest a class-folder image tree into a Parquet dataset version")
    p.add_argument("source", help="folder in the Kaggle layout: <class>/* or Training|Testing/<class>/*")
    p.add_argument("dest", help="storage URI: a local folder, file://... or s3://bucket/prefix")
    add_config_flags(p, IngestConfig)
    p.set_defaults(func=cmd_ingest, config_cls=IngestConfig)

    p = sub.add_parser("train", parents=on_ray,
                       help="train a CNN with Ray Train (DDP) on a dataset version")
    add_config_flags(p, TrainConfig)
    add_config_flags(p, TrackingConfig)
    p.set_defaults(func=cmd_train, config_cls=TrainConfig)

    p = sub.add_parser("tune", parents=on_ray, help="search architectures and hyperparameters with "
                       "Ray Tune (ASHA); publish and evaluate the winner")
    add_config_flags(p, TuneConfig)
    add_config_flags(p, TrackingConfig)
    p.set_defaults(func=cmd_tune, config_cls=TuneConfig)

    p = sub.add_parser("cv", parents=on_ray, help="K-fold cross-validation of a recipe, grouped by "
                       "duplicate group: mean and spread of accuracy, macro-F1, per-class recall")
    add_config_flags(p, CvConfig)
    add_config_flags(p, TrackingConfig)
    p.set_defaults(func=cmd_cv, config_cls=CvConfig)

    p = sub.add_parser("ensemble", parents=cfg, help="publish several trained models (same dataset "
                       "version, classes and input) as one that averages their probabilities")
    p.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP + " (two or more)")
    add_config_flags(p, EnsembleConfig)
    p.set_defaults(func=cmd_ensemble, config_cls=EnsembleConfig)

    p = sub.add_parser("retrain", parents=on_ray, help="scheduled retraining: new data -> challenger "
                       "-> promoted only if not worse than the champion on the frozen test set")
    add_config_flags(p, RetrainConfig)
    add_config_flags(p, TrackingConfig)
    p.set_defaults(func=cmd_retrain, config_cls=RetrainConfig)

    p = sub.add_parser("evaluate", parents=on_ray,
                       help="evaluate a model on a dataset split or an image folder; "
                       "writes a self-contained report")
    add_config_flags(p, EvaluateConfig)
    p.set_defaults(func=cmd_evaluate, config_cls=EvaluateConfig)

    p = sub.add_parser("calibrate", help="fit temperature scaling on the model's validation "
                       "split and write calibration.json next to the model")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default %(default)s)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("predict", parents=cfg,
                       help="classify image files, folders or URIs (exit 1 if any failed)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image file, folder (all files under it) or s3:// URI")
    add_config_flags(p, PredictConfig)
    p.set_defaults(func=cmd_predict, config_cls=PredictConfig)

    p = sub.add_parser("serve", parents=cfg, help="serve the champion (or --model) over HTTP with Ray "
                       "Serve: POST /predict, GET /model, GET /healthz")
    add_config_flags(p, ServeConfig)
    p.set_defaults(func=cmd_serve, config_cls=ServeConfig)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "verbose"):
        console.set_verbose(args.verbose or console.verbose())
    try:
        return args.func(args)
    except (ConfigError, StorageError, FileNotFoundError) as e:
        print(f"brainmri {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # started, then Ray gave up: not a usage error
        print(f"brainmri {args.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
