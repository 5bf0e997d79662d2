"""`brainmri retrain`: the scheduled job. New scans in -> challenger trained -> promoted only if
it is not worse than the champion on the same frozen test set.

    lease retrain/<dataset>/lock.json, renewed by a heartbeat while the run works (a second run
                  waits or leaves; a holder that stops renewing loses it after lock_ttl_min, and
                  one that loses it stops at once); champion.json and seen.json are claimed
                  with the lease's generation so that only the holder can change them (fencing)
    what is new?  --incoming PREFIX: its listing changed since the last run -> ingest it (an s3://
                  prefix read in place by ingest's ray engine), with the frozen test set
                  pinned to test;  otherwise: a newer dataset version
    nothing new   -> exit 0, nothing written
    challenger    <- run_training(champion's recipe, or --recipe YAML) on the new version,
                  published as a candidate (models/<model> does not resolve to it)
    evaluate      champion and challenger on the frozen test split (one dataset version's test)
    decide        promote iff challenger macro-F1 >= champion's - tol and glioma recall >= - tol
    audit         retrain/<dataset>/audit/<time>-<id>.json (one object per decision, both metric sets)
    promote       retrain/<dataset>/champion.json replaced in one atomic write, after everything
                  else; then models/<model>/champion.json, what `models/<model>` resolves to

A crash anywhere before the promotion leaves champion.json as it was; the lease then expires.
A crash between the two promotion writes is mended by the next run (sync_model_pointer).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import NamedTuple

import pyarrow.fs as pafs

from ..config import (
    ConfigError,
    EvaluateConfig,
    IngestConfig,
    RetrainConfig,
    TrainConfig,
    from_dict,
    load_config,
    to_dict,
    with_overrides,
)
from ..core import metrics as M
from ..core.lock import Lease, LockHeld
from ..core.storage import Location, open_location
from ..core.tracking import Tracking

GLIOMA = "glioma"
RECALL_GLIOMA = M.key("recall", GLIOMA)  # the decision's second number (core.metrics' schema)


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
        h.update(f"{incoming.relative(p)}\0{size}\0{mtime}\n".encode())  # keys, never local paths
    return h.hexdigest(), len(items)


def ingest_source(incoming: Location) -> str:
    """What ingest reads: a local folder, or the s3:// prefix itself (ingest's ray engine
    reads it in place; nothing is mirrored to local disk)."""
    return incoming.uri if incoming.is_s3 else incoming.path


# -- the decision ------------------------------------------------------------------------------
def headline(metrics: dict) -> dict:
    """What a decision compares, from an evaluation's metrics.json, in core.metrics' schema:
    n, accuracy, macro_f1 and recall_<class> for every class of the model."""
    m = metrics["metrics"]["all"]
    recall = {M.key("recall", c): M.class_metric(m, "recall", c) for c in metrics["model"]["classes"]}
    return {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], **recall}


def decide(champion: dict | None, challenger: dict, cfg: RetrainConfig) -> tuple[bool, str]:
    if champion is None:
        return True, "no champion yet"
    df1 = challenger["macro_f1"] - champion["macro_f1"]
    dgl = challenger[RECALL_GLIOMA] - champion[RECALL_GLIOMA]
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
    from ..models.zoo import full_shape

    if cfg.recipe:
        base = to_dict(load_config(TrainConfig, cfg.recipe))
    elif champion:  # its network as recorded: {} meant the factory's defaults when it trained
        base = dict(champion["recipe"])
        base["model_args"] = full_shape(base["model"], base.get("model_args") or {})
    else:
        base = to_dict(TrainConfig())
    base = with_overrides(base, cfg.train)  # the width of the champion's network, say
    base.update(data=data_uri, out=store.uri, name=run_name, publish=True, candidate=True)
    tcfg = from_dict(TrainConfig, base)
    # the whole network, as the run will record it: champion.json's recipe must rebuild it
    return replace(tcfg, model_args=full_shape(tcfg.model, tcfg.shape()))


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
class NewData(NamedTuple):
    """A dataset version no decision has been taken on yet, and what seen.json records about
    it once one is on record."""

    version_uri: str
    seen_now: dict


@dataclass
class Evaluated:
    """Champion (when there is one) and challenger on the same frozen test set."""

    frozen: str  # the dataset version whose test split both are scored on
    frozen_manifest: dict
    challenger_report: str
    challenger: dict  # headline(...)
    champion_report: str | None
    champion: dict | None


def retrain(cfg: RetrainConfig, hooks=None, progress=None, tracking: Tracking | None = None) -> Decision:
    """One scheduled run (see the module docstring). `hooks(stage)` is called between stages
    (tests use it to crash the job at a chosen point); `progress(line)` gets the challenger's
    epoch lines (training.train.run_training). With `tracking`, the challenger is an MLflow run
    (experiment retrain-<dataset> unless one is given) and a promotion moves the registered
    model's `champion` alias (track_decision)."""
    cfg.validate()
    hook = hooks or (lambda stage: None)
    store, root, incoming = open_inputs(cfg)
    if tracking is not None:
        from ..core.tracking import check

        tracking = tracking.named(f"retrain-{cfg.dataset}")
        check(tracking)  # before the lease and any ingest
    lease = Lease(root / "lock.json", cfg.lock_ttl_min * 60, purpose="brainmri retrain")
    locked = acquire(lease, cfg)
    if locked:
        return locked
    lease.claim(root / "champion.json", root / "seen.json")  # fence out any earlier holder
    lease.start_heartbeat()
    try:
        return _run(cfg, hook, store, root, incoming, lease, progress, tracking)
    except KeyboardInterrupt:
        if lease.lost.is_set():  # the heartbeat stopped the work: say why, in one sentence
            raise LockHeld(f"lost the lease on {lease.loc.uri} while working; stopped, nothing "
                           "promoted (another run holds it now)") from None
        raise
    finally:
        lease.release()


def _run(cfg: RetrainConfig, hook, store: Location, root: Location, incoming: Location | None,
         lease: Lease, progress=None, tracking: Tracking | None = None) -> Decision:
    champion = load_champion(root, cfg, store, lease)
    new = find_new_data(cfg, store, root, incoming, champion, lease)  # 1. what is new
    if isinstance(new, Decision):
        return new
    hook("ingested")
    lease.check()

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    tcfg, trained = train_challenger(cfg, champion, new.version_uri, store, progress,  # 2.
                                     tracking)
    hook("trained")
    lease.check()

    ev = evaluate_both(cfg, champion, new.version_uri, store, trained.model_uri, tcfg.gpu)  # 3.
    promote, why = decide(ev.champion, ev.challenger, cfg)
    hook("evaluated")
    lease.check()

    # 4. audit first, then the pointer: a crash in between leaves the old champion in place.
    # Every write goes through the lease: renewed first, refused once another run took over.
    record = audit_record(cfg, stamp, promote, why, new.version_uri, incoming, champion,
                          trained, ev)
    write_audit(root, record, new.seen_now, lease)
    hook("audited")
    if promote:
        promote_challenger(root, record, tcfg, champion, lease)
        hook("promoted")
        sync_model_pointer(store, root, lease)
    track_decision(tracking, record, tcfg.model)  # after the store holds the decision
    return Decision(record["decision"], why, record)


def open_inputs(cfg: RetrainConfig) -> tuple[Location, Location, Location | None]:
    """(store, retrain/<dataset>/, the incoming prefix or None); a missing prefix or a bad
    recipe fails now, before the lease and before any ingest."""
    store = open_location(cfg.store, check=True)
    incoming = open_location(cfg.incoming) if cfg.incoming else None
    if incoming is not None and not incoming.exists():
        raise FileNotFoundError(f"incoming prefix {incoming.uri} does not exist")
    if cfg.recipe:
        load_config(TrainConfig, cfg.recipe)  # a bad recipe fails now, not after ingesting
    return store, state_root(store, cfg.dataset), incoming


def acquire(lease: Lease, cfg: RetrainConfig) -> Decision | None:
    """Take the lease; a "locked" Decision when another run holds it (this one then leaves
    without touching anything), None once it is ours."""
    from ..core.lock import LockHeld

    try:
        lease.acquire(wait_s=cfg.wait_lock_s)
    except LockHeld as e:
        return Decision("locked", str(e))
    return None


def load_champion(root: Location, cfg: RetrainConfig, store: Location, lease: Lease) -> dict | None:
    """champion.json, or a record bootstrapped from --champion, or None. (A champion.json
    holding only the lease's fence stamp means: no champion yet.)"""
    champion = (root / "champion.json").read_json() if (root / "champion.json").exists() else None
    if champion is not None and not champion.get("model"):
        champion = None
    if champion is None and cfg.champion:
        champion = bootstrap_champion(cfg.champion)
    if champion is not None and not cfg.recipe and champion["recipe"].get("model") == "ensemble":
        raise ConfigError(f"the champion {champion['model']} is an ensemble (brainmri ensemble): its "
                          "recipe trains no single network; give --recipe for the challenger")
    recipe = to_dict(load_config(TrainConfig, cfg.recipe)) if cfg.recipe else \
        dict(champion["recipe"]) if champion is not None else {}
    teacher = {**recipe, **cfg.train}.get("teacher")
    if teacher and cfg.incoming:  # training.distill would refuse it, but only after the ingest
        raise ConfigError(f"the challenger's recipe distils from teacher {teacher}, and the challenger "
                          "trains on the version this run ingests from --incoming, which no teacher has "
                          "been trained on: give --train teacher= (no teacher) or a --recipe without one")
    if champion is not None:
        sync_model_pointer(store, root, lease)
    return champion


def find_new_data(cfg: RetrainConfig, store: Location, root: Location, incoming: Location | None,
                  champion: dict | None, lease: Lease) -> NewData | Decision:
    """The dataset version to train a challenger on (new scans ingested first, the frozen test
    set pinned to test), or a "noop" Decision when nothing is new."""
    from ..data.datasets import latest_version
    from ..data.ingest import ingest

    seen = (root / "seen.json").read_json() if (root / "seen.json").exists() else {}
    if incoming is not None:
        fp, n_files = fingerprint(incoming)
        if fp == seen.get("incoming_fingerprint"):
            return Decision("noop", f"nothing new under {incoming.uri} ({n_files} files, unchanged)")
        ing = IngestConfig(name=cfg.dataset, frozen_test=champion["frozen_test"] if champion else "")
        res = ingest(ingest_source(incoming), store.uri, ing)
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
            lease.write(root / "seen.json", {**seen_now, "at": time.time()})
        return Decision("noop", f"no data newer than {version_uri} (already decided)")
    return NewData(version_uri, seen_now)


def train_challenger(cfg: RetrainConfig, champion: dict | None, version_uri: str, store: Location,
                     progress=None, tracking: Tracking | None = None):
    """The challenger, trained with the champion's recipe (or the given one) on the new
    version -> (its TrainConfig, run_training's result)."""
    from ..training.train import run_training

    # named by data + recipe: a rerun after a crash resumes this run from its checkpoint
    tcfg = challenger_config(cfg, champion, version_uri, store, "")
    recipe_id = hashlib.sha256(json.dumps(to_dict(tcfg), sort_keys=True,
                                          default=str).encode()).hexdigest()[:8]
    tcfg.name = f"retrain-{version_uri.rstrip('/').rsplit('/', 1)[-1]}-{recipe_id}"
    return tcfg, run_training(tcfg, progress=progress, tracking=tracking)


def evaluate_both(cfg: RetrainConfig, champion: dict | None, version_uri: str, store: Location,
                  challenger_model: str, gpu: bool) -> Evaluated:
    """Both models on the same frozen test set (the champion's, else the new version's test
    split), on the recipe's hardware (a GPU recipe: GPU actors), the same for both."""
    from ..data.datasets import resolve_dataset
    from ..evaluation.evaluate import evaluate

    frozen = champion["frozen_test"] if champion else version_uri
    _, frozen_manifest = resolve_dataset(frozen)
    def on_frozen(model: str):
        return EvaluateConfig(model=model, data=frozen, out=store.uri, split="test",
                              batch_size=cfg.batch_size, gpu=gpu)

    ch_eval = evaluate(on_frozen(challenger_model))
    # the champion was scored on this frozen test set by the decision that made it champion
    # or by a later one: its report stands while weights, shards and settings are the same
    cp_eval = (earlier_report(on_frozen(champion["model"])) or evaluate(on_frozen(champion["model"]))
               ) if champion else None
    return Evaluated(frozen, frozen_manifest, ch_eval.report_uri, headline(ch_eval.metrics),
                     cp_eval.report_uri if cp_eval else None,
                     headline(cp_eval.metrics) if cp_eval else None)


def earlier_report(ecfg: EvaluateConfig):
    """The complete report `evaluate(ecfg)` would write over, as its EvalResult, when it scored
    the same weights (sha256 of model.pt now) on the same dataset split (the manifest's hash,
    which covers every shard's checksum; the shards verified now) with the same settings: the
    decision's numbers (headline: argmax counts) would come out the same. None otherwise."""
    from ..evaluation.evaluate import COMPLETE, EvalResult, report_folder
    from ..evaluation.inference import open_model
    from ..evaluation.sources import open_source

    ref = open_model(ecfg.model)
    src = open_source(ecfg.data, ref.classes, ecfg.split)
    dest = report_folder(ecfg.out, ref, src, ecfg.runtime)
    if not (dest / COMPLETE).exists() or not (dest / "metrics.json").exists():
        return None
    m = (dest / "metrics.json").read_json()
    settings = {"split": ecfg.split, "batch_size": ecfg.batch_size, "gpu": ecfg.gpu,
                "concurrency": ecfg.concurrency, "runtime": ecfg.runtime,
                "near_dup_distance": ecfg.near_dup_distance}
    same = (m.get("model", {}).get("sha256") == ref.sha256
            and m.get("model", {}).get("runtime", {}).get("sha256") == ref.runtime_file(ecfg.runtime)[1]
            and m.get("data") == src.describe and m.get("settings") == settings)
    return EvalResult(dest.uri, m, 0.0) if same else None


def audit_record(cfg: RetrainConfig, stamp: str, promote: bool, why: str, version_uri: str,
                 incoming: Location | None, champion: dict | None, trained, ev: Evaluated) -> dict:
    """The audit record of one decision: both metric sets, the frozen test set, the settings."""
    return {
        "id": stamp, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "decision": "promoted" if promote else "rejected", "reason": why,
        "frozen_test": {"uri": ev.frozen, "version": ev.frozen_manifest["version"],
                        "rows": ev.frozen_manifest["rows"]["test"]},
        "dataset": version_uri, "incoming": incoming.uri if incoming else None,
        "challenger": {"model": trained.model_uri, "run": trained.run_uri,
                       "report": ev.challenger_report, "test": ev.challenger,
                       "validation": trained.best},
        "champion": ({"model": champion["model"], "report": ev.champion_report,
                      "test": ev.champion} if champion else None),
        "tolerances": {"macro_f1": cfg.tolerance_macro_f1,
                       "glioma_recall": cfg.tolerance_glioma_recall},
        "config": to_dict(cfg),
    }


def write_audit(root: Location, record: dict, seen_now: dict, lease: Lease) -> None:
    """audit/<id>.json, then seen.json naming that decision."""
    lease.write(root / "audit" / f"{record['id']}.json", record)
    lease.write(root / "seen.json", {**seen_now, "at": time.time(), "decision": record["id"]})


def promote_challenger(root: Location, record: dict, tcfg: TrainConfig, champion: dict | None,
                       lease: Lease) -> None:
    """Replace champion.json (one atomic write) with the audited challenger."""
    lease.write(root / "champion.json", {
        "model": record["challenger"]["model"], "dataset": record["dataset"],
        "frozen_test": record["frozen_test"]["uri"], "recipe": to_dict(tcfg),
        "test": record["challenger"]["test"], "promoted_at": record["at"],
        "audit": (root / "audit" / f"{record['id']}.json").uri,
        "previous": champion["model"] if champion else None})


def sync_model_pointer(store: Location, root: Location, lease: Lease) -> None:
    """models/<model>/champion.json <- the champion's version, so that `models/<model>` serves
    the promoted model (never a rejected candidate). Idempotent: also mends a crash between
    the two promotion writes."""
    from ..models.checkpoints import CHAMPION_FILE

    champ = (root / "champion.json").read_json() if (root / "champion.json").exists() else {}
    model = open_location(champ["model"]) if champ.get("model") else None
    if model is None or not model.uri.startswith(store.uri.rstrip("/") + "/models/"):
        return  # no champion, or one published outside this store (--champion elsewhere)
    pointer = store / "models" / model.uri.rstrip("/").rsplit("/", 2)[-2] / CHAMPION_FILE
    current = pointer.read_json() if pointer.exists() else {}
    if current.get("version") != model.name or current.get("audit") != champ.get("audit"):
        lease.write(pointer, {"version": model.name, "model": model.uri, "dataset": champ["dataset"],
                              "audit": champ.get("audit"), "promoted_at": champ.get("promoted_at")})


def track_decision(tracking: Tracking | None, record: dict, model_name: str) -> None:
    """The decision in MLflow, once the store holds it: the challenger's run gets both test
    reports (its own under report/, the champion's under champion_report/), the decision and
    the audit record; a promotion registers the challenger's model version and moves the
    registered model's `champion` alias to it. An outage now only warns: champion.json, not
    the registry, is what decides what is served."""
    if tracking is None:
        return
    from ..core import tracking as T

    try:
        with T.talking(tracking.uri, "record the retrain decision"):
            run = T.find_run(tracking, record["challenger"]["run"])
            if run is None:
                raise T.TrackingError(f"no MLflow run carries {record['challenger']['run']}")
            T.log_report(run, record["challenger"]["report"])
            if record["champion"]:
                T.log_report(run, record["champion"]["report"], "champion_report", "champion_test_")
            run.client.log_dict(run.run_id, record, "retrain/audit.json")
            run.set_tags({"brainmri.decision": record["decision"], "brainmri.reason": record["reason"]})
            if record["decision"] == "promoted":
                T.set_champion(run, model_name, record["challenger"]["model"])
    except T.TrackingError as e:
        T.warn(str(e))


def audit_log(store: str, dataset: str) -> list[dict]:
    root = state_root(open_location(store), dataset) / "audit"
    return [loc.read_json() for loc in root.files(".json")]
