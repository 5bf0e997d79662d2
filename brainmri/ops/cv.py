"""K-fold cross-validation of a recipe, grouped by duplicate group: what a recipe achieves on
this data as a mean and a spread, not one split's luck.

    the version's train + val rows --assign_folds (whole groups, per class, seeded)--> K folds
    fold i: a dataset version of its own, OUT/cv/<name>/datasets/<dataset>/<version>-k<K>s<seed>f<i>/
            test = fold i (held out); val = some groups of the other folds (the recipe chooses
            its checkpoint and decision rule on them); train = the rest
    each fold: run_training (the recipe, publishing into the cv store, never OUT/models/) as
            Ray tasks, as many at once as the cluster holds; then the driver evaluates each
            fold's model on its test split
    --> OUT/cv/<name>/cv.json and cv.md: per fold, and mean, sd, min, max of accuracy,
        macro-F1, balanced accuracy and per-class recall; a copy beside the source version
        (datasets/<dataset>/<version>/cv/<name>.json)

The version's own test split takes no part: it stays the untouched final estimate. Fold
versions are written like ingest writes one (shards with their sha256, manifest last) and
verified when read; a re-run reuses them, resumes each fold's run, and skips finished folds.
"""

from __future__ import annotations

import hashlib
import io
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..config import CvConfig, TrainConfig, from_dict, load_config, to_dict, with_overrides
from ..core.storage import Location, check_name, open_location

COLUMNS = ("accuracy", "macro_f1", "balanced_accuracy")  # and recall_<class> per class


# -- folds -------------------------------------------------------------------------------------
def group_classes(groups: list[str], labels: list[int]) -> tuple[dict[str, int], dict[str, int]]:
    """({group: rows}, {group: its majority class, ties to the lower label})."""
    members: dict[str, Counter] = defaultdict(Counter)
    for g, y in zip(groups, labels):
        members[g][int(y)] += 1
    return ({g: sum(c.values()) for g, c in members.items()},
            {g: min(c, key=lambda y: (-c[y], y)) for g, c in members.items()})


def assign_folds(groups: list[str], labels: list[int], k: int, seed: int) -> dict[str, int]:
    """{group: fold}. Whole groups only; a group counts for its majority class; within each
    class the groups go, largest first (seeded order among equals), to the fold holding the
    fewest rows of that class, ties to the fold with the fewest rows overall."""
    import numpy as np

    sizes, classes_of = group_classes(groups, labels)
    by_class: dict[int, list[str]] = defaultdict(list)
    for g in sorted(sizes):
        by_class[classes_of[g]].append(g)
    rng = np.random.default_rng(seed)
    total, fold_of = [0] * k, {}
    for y in sorted(by_class):
        gs = [by_class[y][i] for i in rng.permutation(len(by_class[y]))]
        gs.sort(key=lambda g: -sizes[g])  # stable: the seeded order among equal sizes
        load = [0] * k
        for g in gs:
            f = min(range(k), key=lambda i: (load[i], total[i], i))
            fold_of[g] = f
            load[f] += sizes[g]
            total[f] += sizes[g]
    return fold_of


def fold_splits(fold_of: dict[str, int], sizes: dict[str, int], classes_of: dict[str, int],
                fold: int, val_share: float, seed: int) -> dict[str, str]:
    """{group: "train" | "val" | "test"} of one fold: its own groups are test; of the others,
    per class, seeded groups become val until they hold `val_share` of that class's rows."""
    import numpy as np

    out = {g: "test" for g, f in fold_of.items() if f == fold}
    rest: dict[int, list[str]] = defaultdict(list)
    for g in sorted(fold_of):
        if fold_of[g] != fold:
            rest[classes_of[g]].append(g)
    rng = np.random.default_rng([seed, fold])
    for y in sorted(rest):
        gs = [rest[y][i] for i in rng.permutation(len(rest[y]))]
        want, got = val_share * sum(sizes[g] for g in gs), 0
        for g in gs:
            out[g] = "val" if got < want else "train"
            got += sizes[g] if out[g] == "val" else 0
    return out


def _shard(table, folder: Location, split: str, name: str) -> dict:
    """Write one Parquet shard (the ingest's encoding) and return its manifest entry."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, write_page_checksum=True, row_group_size=64,
                   compression={c: ("NONE" if c == "image" else "ZSTD") for c in table.column_names})
    data = buf.getvalue()
    (folder / split / name).write_bytes(data)
    return {"path": f"{split}/{name}", "split": split, "rows": table.num_rows, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def write_folds(version: Location, manifest: dict, store: Location, k: int,
                seed: int) -> list[Location]:
    """The K fold versions under store/datasets/<dataset>/ (those already complete reused).
    One source shard in memory at a time; each fold's manifest written last."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..data.datasets import MANIFEST, dataset_root, manifest_hash, split_files, verify_shards

    root = dataset_root(store, manifest["name"])
    folds = [root / f"{manifest['version']}-k{k}s{seed}f{i}" for i in range(k)]
    if all((f / MANIFEST).exists() for f in folds):
        return folds
    verify_shards(version, manifest, ("train", "val"))
    files = [p for s in ("train", "val") for p in split_files(version, manifest, s)]
    keys = [pq.read_table(version.fs.open_input_file(p), columns=["group", "label"]) for p in files]
    groups = [g for t in keys for g in t.column("group").to_pylist()]
    labels = [y for t in keys for y in t.column("label").to_pylist()]
    if not groups:
        raise ValueError(f"{version.uri} has no train or val rows to cross-validate")
    sizes, classes_of = group_classes(groups, labels)
    fold_of = assign_folds(groups, labels, k, seed)
    if len(set(fold_of.values())) < k:
        raise ValueError(f"{len(sizes)} duplicate groups cannot fill {k} folds: use fewer --folds")
    val_share = manifest["rows"]["val"] / max(1, manifest["rows"]["train"] + manifest["rows"]["val"])
    plans = [fold_splits(fold_of, sizes, classes_of, i, val_share, seed) for i in range(k)]
    shards: list[list[dict]] = [[] for _ in range(k)]
    for j, path in enumerate(files):
        table = pq.read_table(version.fs.open_input_file(path))
        gs = table.column("group").to_pylist()
        for i, plan in enumerate(plans):
            where = np.array([plan[g] for g in gs])
            for split in ("train", "val", "test"):
                mask = where == split
                if mask.any():
                    part = table.filter(pa.array(mask))
                    shards[i].append(_shard(part, folds[i], split, f"part-{j:05d}.parquet"))
    classes = manifest["classes"]
    for i, f in enumerate(folds):
        counts = {s: {c: 0 for c in classes} for s in ("train", "val", "test")}
        for y, g in zip(labels, groups):
            counts[plans[i][g]][classes[y]] += 1
        (f / MANIFEST).write_json({
            **manifest, "version": f.name, "created_unix": time.time(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shards": shards[i],
            "rows": {s: sum(counts[s].values()) for s in counts}, "counts": counts,
            "derived_from": {"uri": version.uri, "version": manifest["version"],
                             "manifest_hash": manifest_hash(manifest),
                             "cv": {"folds": k, "fold": i, "seed": seed, "groups": len(sizes)}}})
    return folds


# -- the estimate ------------------------------------------------------------------------------
@dataclass
class CvResult:
    uri: str  # OUT/cv/<name>/
    folds: list[dict]  # {"fold", "model", "report", "metrics"}
    summary: dict  # {metric: {"mean", "sd", "min", "max"}}
    seconds: float


def fold_config(cfg: CvConfig, fold: Location, store: Location, name: str) -> TrainConfig:
    """The recipe (--recipe or the default, then --train overrides) on one fold's version,
    publishing into the cv store."""
    base = with_overrides(to_dict(load_config(TrainConfig, cfg.recipe) if cfg.recipe else TrainConfig()),
                          cfg.train)
    base.update(data=fold.uri, out=store.uri, name=name, publish=True, gpu=cfg.gpu or base["gpu"])
    return from_dict(TrainConfig, base)


def train_fold(tcfg: dict) -> dict:
    """One fold's training, in its own Ray task (resuming a run that exists; a finished one is
    published without starting Ray Train again) -> its published model and run."""
    from ..training.train import run_training

    res = run_training(from_dict(TrainConfig, tcfg))
    return {"model": res.model_uri, "run": res.run_uri}


def evaluate_fold(tc: TrainConfig, trained: dict, done: Location) -> dict:
    """The fold's model on its test split (the held-out fold), from the driver once training
    is over: inside the training task its evaluation starved for CPUs on a 2-CPU machine
    (the default recipe's 2 workers), so every fold trains first, then each is evaluated."""
    from ..config import EvaluateConfig
    from ..evaluation.evaluate import evaluate

    ev = evaluate(EvaluateConfig(model=trained["model"], data=tc.data, out=tc.out, split="test",
                                 gpu=tc.gpu, n_mistakes=0, cam_per_class=0))
    scores = ev.metrics["metrics"]["all"]  # metrics.json's figures on every image of the fold
    rec = {**trained, "report": ev.report_uri,
           "metrics": {k: v for k, v in scores.items() if isinstance(v, (int, float))}}
    done.write_json(rec)
    return rec


def summarise(folds: list[dict], classes: list[str]) -> dict:
    """mean, sd (sample, n-1), min and max over folds of each reported metric."""
    out = {}
    for m in (*COLUMNS, *(f"recall_{c}" for c in classes)):
        v = [f["metrics"][m] for f in folds if m in f["metrics"]]
        if v:
            out[m] = {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                      "min": min(v), "max": max(v)}
    return out


def run_cv(cfg: CvConfig, tracking=None) -> CvResult:
    """The estimate (module docstring). With `tracking` (core.tracking), one MLflow run named
    after it holds its settings, the mean and sd of each metric, and cv.json / cv.md; its
    server must answer before any work."""
    import ray

    from ..core import tracking as T

    from ..config import TuneConfig
    from ..core.cluster import init_ray
    from ..data.datasets import resolve_dataset
    from .tune import concurrency

    t0 = time.time()
    cfg.validate()
    recipe = cfg.recipe.rsplit("/", 1)[-1].removesuffix(".yaml") if cfg.recipe else "default"
    name = check_name(cfg.name or f"cv-{cfg.folds}-s{cfg.seed}-{recipe}", "cv name")
    version, manifest = resolve_dataset(cfg.data, cfg.dataset)
    out = open_location(cfg.out, check=True)
    store = out / "cv" / name
    fold_config(cfg, version, store, name).validate()  # a bad recipe fails before any fold is written
    tracked = T.start_run(tracking and tracking.named(f"cv-{manifest['name']}"), store.uri, name,
                          {**to_dict(cfg), "dataset_version": manifest["version"]},
                          {"brainmri.dataset_version": manifest["version"], "brainmri.cv": store.uri})
    folds = write_folds(version, manifest, store, cfg.folds, cfg.seed)
    configs = [fold_config(cfg, f, store, f"{name}-fold{i}") for i, f in enumerate(folds)]

    init_ray()
    res = ray.cluster_resources()
    plan = concurrency(TuneConfig(workers_per_trial=configs[0].num_workers, gpu=cfg.gpu,
                                  max_concurrent=cfg.max_concurrent, num_samples=cfg.folds),
                       res.get("CPU", 1.0), res.get("GPU", 0.0))
    task = ray.remote(num_cpus=0.01, max_retries=0)(train_fold)  # it only waits on its trainer
    records: dict[int, dict] = {}
    trained: dict[int, dict] = {}
    done = [store / "folds" / f"fold{i}.json" for i in range(cfg.folds)]
    pending, running = [i for i in range(cfg.folds) if not done[i].exists()], {}
    for i in set(range(cfg.folds)) - set(pending):  # finished by an earlier run of this estimate
        records[i] = done[i].read_json()
    while pending or running:
        while pending and len(running) < plan.trials:
            i = pending.pop(0)
            if plan.trials > 1:
                configs[i].cpus_per_worker = plan.cpus_per_worker
            running[task.remote(to_dict(configs[i]))] = i
        ready, _ = ray.wait(list(running), num_returns=1)
        trained[running.pop(ready[0])] = ray.get(ready[0])
    for i in sorted(trained):
        records[i] = evaluate_fold(configs[i], trained[i], done[i])
    rows = [{"fold": i, **records[i]} for i in range(cfg.folds)]
    summary = summarise(rows, manifest["classes"])
    doc = {"name": name, "folds": cfg.folds, "seed": cfg.seed, "recipe": to_dict(configs[0]),
           "dataset": {"uri": version.uri, "version": manifest["version"]}, "per_fold": rows,
           "summary": summary, "seconds": time.time() - t0}
    (store / "cv.md").write_bytes(render(doc, manifest["classes"]).encode())
    (store / "cv.json").write_json(doc)  # last: its presence means the estimate is complete
    (version / "cv" / f"{name}.json").write_json({**doc, "uri": store.uri})
    if tracked is not None:  # the estimate is stored either way: an outage now only warns
        try:
            with tracked.talking("record the estimate"):
                tracked.log_metrics({f"cv_{m}_{k}": v[k] for m, v in summary.items() for k in ("mean", "sd")})
                tracked.log_files(store, ["cv.json", "cv.md"], "cv")
                tracked.end("FINISHED")
        except T.TrackingError as e:
            T.warn(str(e))
    return CvResult(store.uri, rows, summary, time.time() - t0)


def render(doc: dict, classes: list[str]) -> str:
    cols = [*COLUMNS, *(f"recall_{c}" for c in classes)]
    lines = [f"# {doc['name']}: {doc['folds']}-fold cross-validation, grouped by duplicate group",
             "", f"Dataset {doc['dataset']['uri']} (train + val rows; its test split left out), "
             f"fold seed {doc['seed']}, recipe {doc['recipe']['model']} "
             f"{doc['recipe']['epochs']} epochs at {doc['recipe']['image_size']} px.", "",
             "| fold | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for r in doc["per_fold"]:
        cells = (f"{r['metrics'].get(c, float('nan')):.4f}" for c in cols)
        lines.append(f"| {r['fold']} | " + " | ".join(cells) + " |")
    s = doc["summary"]
    lines.append("| mean +- sd | " + " | ".join(
        f"{s[c]['mean']:.4f} +- {s[c]['sd']:.4f}" if c in s else "" for c in cols) + " |")
    return "\n".join(lines) + "\n"
