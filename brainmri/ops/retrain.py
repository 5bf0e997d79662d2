"""`brainmri retrain`: the scheduled job. New scans in -> challenger trained -> promoted only if
it is not worse than the champion on the same frozen test set.

    lease retrain/<dataset>/lock.json (expires if its holder dies; a second run waits or leaves)
    what is new?  --incoming PREFIX: its listing changed since the last run -> ingest it, with
                  the frozen test set pinned to test;  otherwise: a newer dataset version
    nothing new   -> exit 0, nothing written
    challenger    <- run_training(champion's recipe, or --recipe YAML) on the new version
    evaluate      champion and challenger on the frozen test split (one dataset version's test)
    decide        promote iff challenger macro-F1 >= champion's - tol and glioma recall >= - tol
    audit         retrain/<dataset>/audit/<time>-<id>.json (one object per decision, both metric sets)
    promote       retrain/<dataset>/champion.json replaced in one atomic write, after everything else

A crash anywhere before the last step leaves champion.json as it was; the lease then expires.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from ..config import ConfigError, IngestConfig, TrainConfig, from_dict, load_config, to_dict
from ..core.lock import Lease
from ..core.storage import Location, check_name, open_location

GLIOMA = "glioma"


@dataclass
class RetrainConfig:
    """How the scheduled retraining job decides and what it trains."""

    store: str = "./lake"  # storage URI holding datasets/, models/, runs/, retrain/
    dataset: str = "brain-tumor-mri"
    incoming: str = ""  # raw scans in class folders (local or s3://); "" = watch dataset versions
    recipe: str = ""  # TrainConfig YAML for challengers; "" = the champion's own recipe
    train: dict = field(default_factory=dict)  # TrainConfig overrides on top of the recipe
    tolerance_macro_f1: float = 0.01  # a challenger may be this much worse and still win
    tolerance_glioma_recall: float = 0.02
    lock_ttl_min: float = 360.0  # the lease outlives any healthy run; a dead holder's expires
    wait_lock_s: float = 0.0  # wait this long for a running retrain, then exit cleanly
    champion: str = ""  # bootstrap: a published model to start from when there is no champion yet
    batch_size: int = 64  # evaluation batch size

    def validate(self) -> None:
        check_name(self.dataset, "dataset name")
        if min(self.tolerance_macro_f1, self.tolerance_glioma_recall, self.wait_lock_s) < 0:
            raise ConfigError("tolerances and wait_lock_s must be >= 0")
        if self.lock_ttl_min <= 0:
            raise ConfigError("lock_ttl_min must be > 0")
        from_dict(TrainConfig, dict(self.train), prefix="train.")  # unknown keys fail now


@dataclass
class Decision:
    action: str  # "noop", "locked", "promoted", "rejected"
    reason: str
    record: dict | None = None


def state_root(store: Location, dataset: str) -> Location:
    return store / "retrain" / dataset


# -- what is new -------------------------------------------------------------------------------
def fingerprint(incoming: Location) -> tuple[str, int]:
    """A hash of the incoming prefix's listing (path, size, mtime): cheap change detection
    before any image is read. Returns (hash, number of files)."""
    sel = pafs.FileSelector(incoming.path, allow_not_found=True, recursive=True)
    items = sorted((i.path, i.size, i.mtime_ns or 0) for i in incoming.fs.get_file_info(sel)
                   if i.type == pafs.FileType.File)
    h = hashlib.sha256()
    for p, size, mtime in items:
        h.update(f"{os.path.relpath(p, incoming.path)}\0{size}\0{mtime}\n".encode())
    return h.hexdigest(), len(items)


def local_copy(incoming: Location, tmp: str) -> str:
    """Ingest reads a local folder: an s3:// prefix is mirrored to `tmp` first."""
    if not incoming.is_s3:
        return incoming.path
    pafs.copy_files(incoming.path, tmp, source_filesystem=incoming.fs,
                    destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
    return tmp


# -- the decision ------------------------------------------------------------------------------
def headline(metrics: dict) -> dict:
    m = metrics["metrics"]["all"]
    return {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "glioma_recall": m["per_class"][GLIOMA]["recall"],
            "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items()}}


def decide(champion: dict | None, challenger: dict, cfg: RetrainConfig) -> tuple[bool, str]:
    if champion is None:
        return True, "no champion yet"
    df1 = challenger["macro_f1"] - champion["macro_f1"]
    dgl = challenger["glioma_recall"] - champion["glioma_recall"]
    worse = []
    if df1 < -cfg.tolerance_macro_f1:
        worse.append(f"macro-F1 {df1:+.4f} (tolerance {cfg.tolerance_macro_f1})")
    if dgl < -cfg.tolerance_glioma_recall:
        worse.append(f"glioma recall {dgl:+.4f} (tolerance {cfg.tolerance_glioma_recall})")
    if worse:
        return False, "challenger worse on " + " and ".join(worse)
    return True, f"not worse: macro-F1 {df1:+.4f}, glioma recall {dgl:+.4f}"


def challenger_config(cfg: RetrainConfig, champion: dict | None, data_uri: str, store: Location,
                      run_name: str) -> TrainConfig:
    if cfg.recipe:
        base = to_dict(load_config(TrainConfig, cfg.recipe))
    elif champion:
        base = dict(champion["recipe"])
    else:
        base = to_dict(TrainConfig())
    base.update(cfg.train)
    base.update(data=data_uri, out=store.uri, name=run_name, publish=True)
    return from_dict(TrainConfig, base)


def bootstrap_champion(model_uri: str) -> dict:
    """A champion record for an existing published model: its recipe, and its training
    dataset version's test split as the frozen test set."""
    from ..models.checkpoints import load_model_state, model_file

    state = load_model_state(model_uri)
    folder = model_file(model_uri)
    uri = folder.uri.rsplit("/", 1)[0]  # the version folder, pinned (not "latest")
    return {"model": uri, "dataset": state["dataset"]["uri"], "frozen_test": state["dataset"]["uri"],
            "recipe": state["config"], "test": None, "promoted_at": None, "audit": None,
            "previous": None}


# -- the job -----------------------------------------------------------------------------------
def retrain(cfg: RetrainConfig, hooks=None) -> Decision:
    """One scheduled run (see the module docstring). `hooks(stage)` is called between stages
    (tests use it to crash the job at a chosen point)."""
    from ..data.datasets import latest_version, resolve_dataset
    from ..data.ingest import ingest
    from ..evaluation.evaluate import evaluate
    from ..training.train import run_training

    cfg.validate()
    hook = hooks or (lambda stage: None)
    store = open_location(cfg.store, check=True)
    root = state_root(store, cfg.dataset)
    incoming = open_location(cfg.incoming) if cfg.incoming else None
    if incoming is not None and not incoming.exists():
        raise FileNotFoundError(f"incoming prefix {incoming.uri} does not exist")
    if cfg.recipe:
        load_config(TrainConfig, cfg.recipe)  # a bad recipe fails now, not after ingesting

    lease = Lease(root / "lock.json", cfg.lock_ttl_min * 60, purpose="brainmri retrain")
    try:
        lease.acquire(wait_s=cfg.wait_lock_s)
    except Exception as e:  # LockHeld: a run is in progress; this one leaves without touching anything
        from ..core.lock import LockHeld

        if isinstance(e, LockHeld):
            return Decision("locked", str(e))
        raise
    try:
        champion = (root / "champion.json").read_json() if (root / "champion.json").exists() else None
        if champion is None and cfg.champion:
            champion = bootstrap_champion(cfg.champion)
        seen = (root / "seen.json").read_json() if (root / "seen.json").exists() else {}

        # 1. what is new
        if incoming is not None:
            fp, n_files = fingerprint(incoming)
            if fp == seen.get("incoming_fingerprint"):
                return Decision("noop", f"nothing new under {incoming.uri} ({n_files} files, unchanged)")
            with tempfile.TemporaryDirectory(prefix="brainmri-incoming-") as tmp:
                ing = IngestConfig(name=cfg.dataset,
                                   frozen_test=champion["frozen_test"] if champion else "")
                res = ingest(local_copy(incoming, tmp), store.uri, ing)
            version_uri = res.location.uri
        else:
            fp, n_files = None, 0
            version_uri = latest_version(store, cfg.dataset).uri
        # seen.json is written only once a decision is on record: after a crash the next run
        # finds the same version (ingest is idempotent) and trains the challenger again
        seen_now = {"incoming": incoming.uri if incoming else None, "incoming_fingerprint": fp,
                    "files": n_files, "dataset_version": version_uri}
        if version_uri in ((champion or {}).get("dataset"), seen.get("dataset_version")):
            if fp:
                (root / "seen.json").write_json({**seen_now, "at": time.time()})
            return Decision("noop", f"no data newer than {version_uri} (already decided)")
        lease.renew()
        hook("ingested")

        # 2. challenger with the champion's recipe (or the given one)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        # named by data + recipe: a rerun after a crash resumes this run from its checkpoint
        tcfg = challenger_config(cfg, champion, version_uri, store, "")
        recipe_id = hashlib.sha256(json.dumps(to_dict(tcfg), sort_keys=True,
                                              default=str).encode()).hexdigest()[:8]
        tcfg.name = f"retrain-{version_uri.rstrip('/').rsplit('/', 1)[-1]}-{recipe_id}"
        trained = run_training(tcfg)
        lease.renew()
        hook("trained")

        # 3. both models on the same frozen test set
        frozen = champion["frozen_test"] if champion else version_uri
        _, frozen_manifest = resolve_dataset(frozen)
        # on the recipe's hardware (a GPU recipe: GPU actors), the same for both models
        run = {"split": "test", "batch_size": cfg.batch_size, "gpu": tcfg.gpu}
        ch_eval = evaluate(trained.model_uri, frozen, store.uri, **run)
        challenger_m = headline(ch_eval.metrics)
        champion_m = None
        if champion:
            cp_eval = evaluate(champion["model"], frozen, store.uri, **run)
            champion_m = headline(cp_eval.metrics)
        promote, why = decide(champion_m, challenger_m, cfg)
        lease.renew()
        hook("evaluated")

        # 4. audit first, then the pointer: a crash in between leaves the old champion in place
        record = {
            "id": stamp, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "decision": "promoted" if promote else "rejected", "reason": why,
            "frozen_test": {"uri": frozen, "version": frozen_manifest["version"],
                            "rows": frozen_manifest["rows"]["test"]},
            "dataset": version_uri, "incoming": incoming.uri if incoming else None,
            "challenger": {"model": trained.model_uri, "run": trained.run_uri,
                           "report": ch_eval.report_uri, "test": challenger_m,
                           "validation": trained.best},
            "champion": ({"model": champion["model"], "report": cp_eval.report_uri,
                          "test": champion_m} if champion else None),
            "tolerances": {"macro_f1": cfg.tolerance_macro_f1,
                           "glioma_recall": cfg.tolerance_glioma_recall},
            "config": to_dict(cfg),
        }
        (root / "audit" / f"{stamp}.json").write_json(record)
        (root / "seen.json").write_json({**seen_now, "at": time.time(), "decision": stamp})
        hook("audited")
        if promote:
            lease.renew()  # never switch the pointer on a lease we may have lost
            (root / "champion.json").write_json({
                "model": trained.model_uri, "dataset": version_uri, "frozen_test": frozen,
                "recipe": to_dict(tcfg), "test": challenger_m, "promoted_at": record["at"],
                "audit": (root / "audit" / f"{stamp}.json").uri,
                "previous": champion["model"] if champion else None})
        return Decision(record["decision"], why, record)
    finally:
        lease.release()


def audit_log(store: str, dataset: str) -> list[dict]:
    root = state_root(open_location(store), dataset) / "audit"
    return [loc.read_json() for loc in root.files(".json")]
