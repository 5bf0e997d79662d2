"""Architecture and hyperparameter search with Ray Tune over the same training code.

    space YAML --sample (seeded)--> N trial configs --Tuner(grid over them, ASHA)-->
      each trial: run_training(TrainConfig) = its own TorchTrainer + TuneReportCallback
    --> tune/<experiment>/leaderboard.{csv,md,html}, search.png, summary.json
    --> the best trial's best checkpoint published to models/, evaluated on the test split

A space file has two sections; `base` fixes TrainConfig keys for every trial, `space` samples:

    base: {epochs: 6, image_size: 128}
    space:
      model:                       # conditional: each family brings its own parameters
        brainnet: {model_args.width: [24, 32, 48], model_args.kernel: [3, 5]}
        resnet18: {}
      lr: {loguniform: [0.001, 0.01]}
      batch_size: [32, 64]         # a list is a choice
      aug_strength: {uniform: [0.5, 1.5]}

With `--search random` (the default) trials are sampled up front from `seed` and handed to
Tune as a grid, so the leaderboard names exactly what ran and a resumed search
(`Tuner.restore`) runs the same trials. With `--search tpe`, Optuna's TPE proposes each trial
from the scores so far (ops/searchers.py); the sampled trials are then only checked, before
Ray starts, and what ran is recorded in trials.json once the search is done. Each
trial's Train run lives in tune/<experiment>/runs/<trial>/ and, like `brainmri train`,
resumes from its latest checkpoint when the search is restarted.

Restoring is an explicit choice: `Tuner.restore` unpickles the Tune state kept in the
experiment folder, so an existing experiment is refused, before Ray starts, unless `--resume`
(`TuneConfig.resume`) says to restore it; `--resume` with nothing to restore starts the search.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, fields
from typing import NamedTuple

import yaml

from ..config import ConfigError, TrainConfig, TuneConfig, from_dict, to_dict
from ..core import metrics as M
from ..core.metrics import SELECTION_METRIC as METRIC
from ..core.storage import Location, check_name, open_location
from ..core.tracking import Tracking
from .searchers import families

# keys a search may not touch: where data and results live, and how a trial is scheduled
FIXED = {"data", "dataset", "out", "name", "publish", "num_workers", "placement", "gpu", "cpus_per_worker",
         "limit_train", "limit_val"}
DOMAINS = ("choice", "uniform", "loguniform", "randint")
# a trial's own driver only waits on its TorchTrainer: it asks for memory, not a CPU (Tune
# refuses an empty request). Even 0.01 CPU would leave 0.99 of some host's CPU, where a read
# or decode task needing a whole one never runs, and would stop two trials whose workers take
# a whole CPU each from fitting beside one CPU for Ray Data (3 one-CPU hosts: the cluster tier)
TRIAL_RESOURCES = {"CPU": 0, "memory": 256 << 20}


# -- the search space ----------------------------------------------------------------------
def load_space(uri: str) -> tuple[dict, dict]:
    """Read and validate a space file -> (base, space)."""
    try:
        text = open_location(uri).read_bytes().decode()
    except (FileNotFoundError, OSError):
        raise ConfigError(f"search space file {uri} not found") from None
    doc = yaml.safe_load(text) or {}
    if not isinstance(doc, dict) or set(doc) - {"base", "space"}:
        raise ConfigError(f"{uri}: a space file holds only 'base' and 'space' mappings")
    base, space = doc.get("base") or {}, doc.get("space") or {}
    if not isinstance(base, dict) or not isinstance(space, dict) or not space:
        raise ConfigError(f"{uri}: 'space' must be a non-empty mapping ('base' a mapping)")
    known = {f.name for f in fields(TrainConfig)}
    for key in base:
        _check_key(key, known, "base")
    for key, dom in space.items():
        if key == "model":
            _check_models(dom)
        else:
            _check_key(key, known, "space")
            _check_domain(dom, f"space.{key}")
    from_dict(TrainConfig, nest_params({k: v for k, v in base.items() if k not in FIXED}))
    return base, space


def _check_key(key: str, known: set, where: str) -> None:
    top = key.split(".", 1)[0]
    if top not in known or (key != top and top != "model_args"):
        raise ConfigError(f"unknown key {where}.{key}; known: {', '.join(sorted(known))} "
                          "(and model_args.<argument>)")
    if where != "base" and top in FIXED:
        raise ConfigError(f"{where}.{key} cannot be searched (set it on the command line)")


def _check_models(dom) -> None:
    from ..models.zoo import check_model_name

    dom = families(dom)
    if not isinstance(dom, dict) or not dom:
        raise ConfigError("space.model: an empty choice (give a model name, a list of names, or "
                          "a mapping family -> its parameters)")
    known = {f.name for f in fields(TrainConfig)}
    for name, sub in dom.items():
        check_model_name(name)
        if not isinstance(sub, dict):
            raise ConfigError(f"space.model.{name}: expected a mapping of parameters")
        for key, d in (sub or {}).items():
            _check_key(key, known, f"space.model.{name}")
            if key == "model":
                raise ConfigError(f"space.model.{name}.model: nested model choice")
            _check_domain(d, f"space.model.{name}.{key}")


def _check_domain(dom, where: str) -> None:
    if isinstance(dom, list):
        if not dom:
            raise ConfigError(f"{where}: an empty choice")
        return
    if not isinstance(dom, dict):
        return  # a constant
    if len(dom) != 1 or next(iter(dom)) not in DOMAINS:
        raise ConfigError(f"{where}: expected a list (choice), a constant, or one of "
                          f"{', '.join(DOMAINS)}: got {dom!r}")
    (kind, arg), = dom.items()
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: an empty choice")
        return
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) for v in arg)
            and arg[0] < arg[1]):
        raise ConfigError(f"{where}: {kind} needs [low, high] with low < high")
    if kind == "loguniform" and arg[0] <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0")


def _draw(dom, rng: random.Random):
    if isinstance(dom, list):
        return rng.choice(dom)
    if not isinstance(dom, dict):
        return dom
    (kind, arg), = dom.items()
    if kind == "choice":
        return rng.choice(arg)
    lo, hi = arg
    if kind == "uniform":
        return round(rng.uniform(lo, hi), 6)
    if kind == "loguniform":
        return float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.4g}")
    return rng.randrange(int(lo), int(hi))  # randint: [low, high)


def nest_params(flat: dict) -> dict:
    """A trial's flat parameters (`model_args.width`, as the search space names them) -> the
    nesting TrainConfig has (`model_args: {width: ...}`). Used by the GPU sweep too."""
    out: dict = {}
    for key, v in flat.items():
        if key.startswith("model_args."):
            out.setdefault("model_args", {})[key.split(".", 1)[1]] = v
        else:
            out[key] = v
    return out


def sample_trials(space: dict, n: int, seed: int) -> list[dict]:
    """n flat parameter dicts; a family's own parameters override shared ones of the same key."""
    rng = random.Random(seed)
    models = families(space["model"]) if "model" in space else None
    # families are stratified (each gets n/F trials, in shuffled order) so a short search
    # still explores every family; everything else is drawn independently per trial
    drawn = None
    if models is not None:
        names = sorted(models)
        drawn = [names[i % len(names)] for i in range(n)]
        rng.shuffle(drawn)
    out = []
    for i in range(n):
        p: dict = {}
        family = drawn[i] if drawn else None
        for key in sorted(k for k in space if k != "model"):
            p[key] = _draw(space[key], rng)
        if family:  # a family's own parameters win over the shared ones
            p["model"] = family
            for key in sorted(models[family] or {}):
                p[key] = _draw(models[family][key], rng)
        out.append({"model": p.pop("model"), **p} if family else p)
    return out


def drawn_config(drawn: dict, tid: str, params: dict) -> TrainConfig:
    """The TrainConfig of a trial a searcher proposed (the same rule as a sampled trial's)."""
    cfg = from_dict(TuneConfig, drawn["settings"])
    tcfg = trial_config(drawn["base"], params, cfg, f"{cfg.name}-{tid}")
    tcfg.cpus_per_worker = drawn["cpus_per_worker"]
    return tcfg


def trial_config(base: dict, params: dict, cfg: TuneConfig, run_name: str) -> TrainConfig:
    """The TrainConfig a trial trains with: defaults <- space base <- command line <- params."""
    d = {k: v for k, v in base.items() if k not in FIXED}
    d.update(params)
    d = nest_params(d)
    d.update(data=cfg.data, dataset=cfg.dataset, out=cfg.out, name=run_name,
             publish=False, num_workers=cfg.workers_per_trial, placement=cfg.placement,
             gpu=cfg.gpu,
             limit_train=cfg.limit_train, limit_val=cfg.limit_val)
    if cfg.epochs:
        d["epochs"] = cfg.epochs
    return from_dict(TrainConfig, d)


# -- one trial (runs inside a Tune trial actor) ------------------------------------------------
def train_trial(config: dict, trials: dict, runs_uri: str, tracking: Tracking | None = None,
                drawn: dict | None = None) -> None:
    """Tune function trainable: one `run_training` whose every epoch report reaches Tune
    through TuneReportCallback (so ASHA can stop it), checkpoints in the experiment's runs/.
    Tune's config holds the trial id: a grid trial's TrainConfig comes from `trials`; a trial
    a searcher proposed also holds its params, made into a TrainConfig from `drawn` (the
    space's base, the search's settings, the planned CPUs per worker). With `tracking`, the
    trial is one MLflow run in the search's experiment."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..training.train import run_training

    if config["trial"] in trials:
        tcfg = from_dict(TrainConfig, trials[config["trial"]])
    else:
        tcfg = drawn_config(drawn, config["trial"], config["params"])
    # Tune, not Ray Train, restarts a trial whose worker died (RunConfig's failure_config below;
    # the restarted trial resumes its Train run from the last checkpoint). A Train controller
    # that restarts its own workers reserves a new placement group first, and when the worker
    # died because ASHA stopped the trial, that group is made just before the controller is
    # killed and before anyone can know its id to remove it: a CPU lost for the whole search.
    tcfg.max_failures = 0
    run_training(tcfg, callbacks=[TuneReportCallback()], storage=open_location(runs_uri),
                 tracking=tracking)


# -- the search (driver) -----------------------------------------------------------------------
def _reaper():
    """A Tune callback that removes the Train worker group's placement group of a trial Tune
    has ended. When ASHA stops a trial, Tune kills its actor, which kills the trial's Train
    controller before it can release its workers' placement group; Ray's own cleaner needs the
    State API (dashboard, one Ray instance per host), so without this a laptop search leaks a
    CPU per stopped trial and the next trial's data pipeline waits for it forever."""
    import ray
    from ray import tune
    from ray.util.placement_group import PlacementGroup

    class ReapPlacementGroups(tune.Callback):
        def __init__(self):
            self.pgs: dict[str, str] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("placement_group"):
                self.pgs[trial.trial_id] = result["placement_group"]

        def _reap(self, trial):
            pg = self.pgs.pop(trial.trial_id, "")
            if pg and ray.util.placement_group_table().get(pg, {}).get("state") not in (None, "REMOVED"):
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._reap(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._reap(trial)

    return ReapPlacementGroups()


@dataclass
class TuneResult:
    experiment_uri: str
    leaderboard: list[dict]
    best: dict | None
    model_uri: str | None
    report_uri: str | None
    seconds: float


class Plan(NamedTuple):
    """How a search is scheduled: trials at once (Tune's max_concurrent_trials), CPUs per
    train worker, and a one-line note for the user when the plan counts on GPUs the cluster
    does not have yet ("" otherwise)."""

    trials: int
    cpus_per_worker: float
    note: str = ""


def concurrency(cfg: TuneConfig, cpus: float, gpus: float = 0.0,
                max_gpus: float | None = None) -> Plan:
    """The search's Plan from the cluster's resources now (`cpus`, `gpus`) and, with --gpu,
    the most GPUs its autoscaler may bring (`max_gpus`; None where unknown), so that trials
    never starve each other or Ray Data: workers get at most one CPU each, and at least one
    whole CPU is left for Ray Data (by default one per running trial). A pure function:
    run_search reads the cluster, tests pass numbers.

    GPU trials on an autoscaling cluster (GPU nodes at min_workers 0, or fewer now than it
    may add) are sized from --max-concurrent, else from the autoscaler's maximum, else 1;
    Tune then waits for the autoscaler to bring the GPUs. Only a cluster whose known maximum
    cannot hold one trial is refused."""
    w = cfg.workers_per_trial
    if cfg.gpu:
        ceiling = max(gpus, max_gpus or 0.0)
        if max_gpus is not None and ceiling < w:
            raise ConfigError(f"--gpu with {w} workers per trial needs {w} GPUs; the cluster "
                              f"has {gpus:g} and its autoscaler can bring at most {max_gpus:g}")
        if gpus >= w and (max_gpus is None or max_gpus <= gpus):  # a fixed cluster: what fits now
            fit = int(min(gpus // w, max(1, (cpus - 1) // (2 * w))))
            conc = min(cfg.max_concurrent or fit, fit)
            return Plan(max(1, conc), 2.0)
        # GPUs to come: new nodes bring their own CPUs, so only GPUs bound the plan
        if cfg.max_concurrent:
            conc, why = cfg.max_concurrent, "--max-concurrent"
        elif max_gpus is not None:
            conc = max(1, int(min(ceiling // w, cfg.num_samples)))
            why = f"the autoscaler's maximum of {ceiling:g} GPUs"
        else:
            conc, why = 1, "the cluster's maximum is unknown: set --max-concurrent for more"
        return Plan(conc, 2.0, f"brainmri tune: the cluster has {gpus:g} GPUs now; planning {conc} "
                               f"trial(s) of {w} GPU worker(s) at once ({why}); they wait for the "
                               "autoscaler to bring the GPUs")
    # by default as many trials as have w workers at 1 CPU and 1 CPU of data loading each;
    # --max-concurrent may ask for more, down to one CPU of data loading for them all (reads of
    # pixel shards need none; a decode task needs a whole one: with 0.99 free it would wait)
    fit = max(1, int(cpus // (w + 1)))
    conc = min(cfg.max_concurrent or fit, max(1, int(cpus - 1)))
    per = math.floor(min(1.0, (cpus - 1) / (conc * w)) * 4) / 4
    if per <= 0:
        raise ConfigError(f"{conc} trials of {w} workers do not fit in {cpus:g} CPUs with one "
                          "CPU left for data loading: lower --max-concurrent")
    return Plan(conc, per)


def cluster_max_gpus() -> float | None:
    """The most GPUs the cluster's autoscaler may bring (what Ray Train's worker group and Ray
    Data read for the same question); None on a cluster without an autoscaler config (local
    Ray, a fixed cluster) or when it cannot be read."""
    from ..core.cluster import autoscaler_max_resources

    res = autoscaler_max_resources()
    return float(res.get("GPU", 0)) if res else None


@dataclass
class Search:
    """A search as planned, or as trials.json saved it when it is restored."""

    cfg: TuneConfig
    out: Location  # the store: models/ and reports/ of the winner
    exp: Location  # tune/<experiment>/
    trials: list[dict]  # {"id", "params", "train": TrainConfig as a dict}
    max_concurrent: int
    cpus_per_worker: float
    version: Location  # the dataset version every trial trains on
    classes: list[str]  # its manifest's classes, in label order
    restoring: bool
    base: dict | None = None  # the space file's, for trials a searcher proposes
    space: dict | None = None
    most_epochs: int = 0  # planned before a searcher's trials exist (0: from `trials`)

    @property
    def epochs(self) -> int:
        """The longest trial's epochs: ASHA's max_t (no trial is stopped at its own end) and
        what the leaderboard calls "completed" (per trial, its own epochs)."""
        return self.most_epochs or max(t["train"]["epochs"] for t in self.trials)

    @property
    def max_failures(self) -> int:
        """Restarts Tune grants each trial: the trials' own `max_failures` (Ray Train's inside
        a trial is 0, see train_trial)."""
        found = [t["train"].get("max_failures", TrainConfig.max_failures) for t in self.trials]
        return max(found or [(self.base or {}).get("max_failures", TrainConfig.max_failures)])

    def drawn(self) -> dict:
        """What a trial proposed by a searcher needs to make its TrainConfig (drawn_config)."""
        return {"settings": to_dict(self.cfg), "base": self.base or {},
                "cpus_per_worker": self.cpus_per_worker}


def run_search(cfg: TuneConfig, tracking: Tracking | None = None) -> TuneResult:
    t0 = time.time()
    search = open_search(cfg, tracking)
    # never saved in trials.json (the URI may hold credentials): given again on --resume
    tracking = search_tracking(tracking, search.cfg)
    errors = run_trials(search, tracking)
    rows = leaderboard(search.exp, search.trials, errors, search.classes)
    write_leaderboard(search.exp, rows, search.cfg)
    best, model_uri, report_uri = publish_winner(search, rows)
    track_search(search, tracking, rows, model_uri, report_uri)
    (search.exp / "summary.json").write_json({
        "best": best, "model": model_uri, "report": report_uri, "trials": len(rows),
        "seconds": time.time() - t0, "max_concurrent": search.max_concurrent,
        "cpus_per_worker": search.cpus_per_worker})
    return TuneResult(search.exp.uri, rows, best, model_uri, report_uri, time.time() - t0)


def saved_search(exp: Location) -> list[str]:
    """The files in `exp` that make it an existing search: our trials.json and Tune's own
    experiment state (tuner.pkl, experiment_state-*.json), in listing order ([] when none)."""
    return [n for n in exp.listdir() if n in ("trials.json", "tuner.pkl")
            or (n.startswith("experiment_state-") and n.endswith(".json"))]


def open_search(cfg: TuneConfig, tracking: Tracking | None = None) -> Search:
    """The experiment named by `cfg`. An existing one (`saved_search`) is refused, before
    Ray is imported, unless `cfg.resume`: restoring unpickles the Tune state stored in
    it. With resume, it is restored from its trials.json when Tune can restore it; otherwise,
    and for a new name, the search is planned now (trials sampled and checked, scheduled on
    the cluster). Starts Ray. With `tracking`, its server must answer first (the MLflow
    experiment is the search's name unless one is given)."""
    cfg.validate()
    name = check_name(cfg.name or f"tune-{time.strftime('%Y%m%d-%H%M%S')}", "experiment name")
    cfg.name = name
    out = open_location(cfg.out, check=True)
    exp = out / "tune" / name
    found = saved_search(exp)
    if found and not cfg.resume:
        raise ConfigError(
            f"experiment {exp.uri} already exists ({', '.join(found)}): --resume restores it, "
            "which unpickles the Tune state stored there, so only do that for storage you "
            "trust; or choose a new --name")
    if tracking is not None:
        from ..core.tracking import check

        check(search_tracking(tracking, cfg))  # before Ray and trials.json: a retry needs no --resume
    if cfg.resume:
        from ray import tune

        if (exp / "trials.json").exists() and tune.Tuner.can_restore(exp.path, storage_filesystem=exp.fs):
            return restore_search(cfg, out, exp)
        has = f" (it has only {', '.join(found)})" if found else ""
        print(f"brainmri tune: --resume: {exp.uri} holds no search Tune can restore{has}; "
              "starting a new search", file=sys.stderr, flush=True)
    return plan_search(cfg, out, exp)


def search_tracking(tracking: Tracking | None, cfg: TuneConfig) -> Tracking | None:
    """The search's MLflow experiment: its own name unless --tracking-experiment gives one."""
    return tracking and tracking.named(cfg.name)


def restore_search(cfg: TuneConfig, out: Location, exp: Location) -> Search:
    """The search as it was started: its trials and schedule, not today's files."""
    from ..core.cluster import init_ray
    from ..data.datasets import resolve_dataset
    from ..models.zoo import full_shape

    saved = (exp / "trials.json").read_json()
    trials = saved["trials"]
    for t in trials:  # a search planned before shapes were filled: the networks it recorded
        t["train"]["model_args"] = full_shape(t["train"]["model"], t["train"].get("model_args") or {})
    cfg = from_dict(TuneConfig, {**saved["settings"], "evaluate": cfg.evaluate,
                                      "resume": cfg.resume})
    version, manifest = resolve_dataset(trials[0]["train"]["data"], cfg.dataset)
    init_ray()
    return Search(cfg, out, exp, trials, saved["max_concurrent"], saved["cpus_per_worker"],
                  version, list(manifest["classes"]), restoring=True, base=saved.get("base"),
                  space=saved.get("space"), most_epochs=saved.get("most_epochs", 0))


def plan_search(cfg: TuneConfig, out: Location, exp: Location) -> Search:
    """Sample the trials, check every trial's config before Ray starts, size the schedule to
    the cluster, and save it all in trials.json."""
    from ..core.cluster import init_ray
    from ..data.datasets import resolve_dataset

    base, space = load_space(cfg.space)
    params = sample_trials(space, cfg.num_samples, cfg.seed)
    version, manifest = resolve_dataset(cfg.data, cfg.dataset)
    # absolute URIs, the exact version: trials run in their own working folders, and a
    # version ingested mid-search must not change what later trials train on
    cfg.data, cfg.out = version.uri, out.uri
    trials = build_trials(base, params, cfg)  # every trial checked (for tpe: a sample of them)
    most = max(t["train"]["epochs"] for t in trials)
    if cfg.search != "random":
        most = max([most] + ([] if cfg.epochs else domain_max(space, "epochs")))  # TPE may ask any
        if base.get("teacher"):  # checked once: the file found now, pinned for every trial
            base = {**base, "teacher": trials[0]["train"]["teacher"]}
        trials = []  # proposed as the search goes; recorded when it is done (record_trials)
    init_ray()
    plan = schedule(cfg)
    for t in trials:
        t["train"]["cpus_per_worker"] = plan.cpus_per_worker
    (exp / "trials.json").write_json({"settings": to_dict(cfg), "base": base, "space": space,
                                      "trials": trials, "max_concurrent": plan.trials,
                                      "cpus_per_worker": plan.cpus_per_worker, "most_epochs": most})
    return Search(cfg, out, exp, trials, plan.trials, plan.cpus_per_worker, version,
                  list(manifest["classes"]), restoring=False, base=base, space=space,
                  most_epochs=most)


def domain_max(space: dict, key: str) -> list[int]:
    """The largest value each domain of `key` in the space (shared or a family's) can take."""
    doms = [space[key]] if key in space else []
    doms += [sub[key] for sub in families(space.get("model", {})).values() if key in (sub or {})]
    out = []
    for d in doms:
        if isinstance(d, dict):
            (kind, arg), = d.items()
            d = arg if kind == "choice" else [arg[1] - 1 if kind == "randint" else arg[1]]
        out += [int(v) for v in (d if isinstance(d, list) else [d])]
    return out


def build_trials(base: dict, params: list[dict], cfg: TuneConfig) -> list[dict]:
    """One record per sampled parameter set; every trial fails here, before Ray, if its
    config is bad."""
    from ..training.train import prepare

    trials = []
    for i, p in enumerate(params):
        tid = f"t{i:03d}-{p.get('model', base.get('model', 'brainnet'))}"
        ready = prepare(trial_config(base, p, cfg, f"{cfg.name}-{tid}"))
        tcfg = ready.cfg  # resolved: the whole network shape, recorded in trials.json
        if ready.teacher:  # the file checked now (absolute), not "latest" again in every trial
            tcfg.teacher = ready.teacher["uri"]
        trials.append({"id": tid, "params": p, "train": to_dict(tcfg)})
    return trials


def schedule(cfg: TuneConfig) -> Plan:
    """The Plan for the cluster Ray is connected to (its note printed when there is one)."""
    import ray

    res = ray.cluster_resources()
    plan = concurrency(cfg, res.get("CPU", 1.0), res.get("GPU", 0.0),
                       cluster_max_gpus() if cfg.gpu else None)
    if plan.note:
        print(plan.note, flush=True)
    return plan


def make_tuner(search: Search, tracking: Tracking | None = None):
    """Tune's Tuner over the search's trials (a grid of trial ids, ASHA on METRIC), or the
    saved one when the search is restored; with `tracking`, each trial is an MLflow run."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cfg, exp, epochs = search.cfg, search.exp, search.epochs
    trainable = tune.with_parameters(train_trial, trials={t["id"]: t["train"] for t in search.trials},
                                     runs_uri=(exp / "runs").uri, tracking=tracking, drawn=search.drawn())
    trainable = tune.with_resources(trainable, TRIAL_RESOURCES)
    if search.restoring:
        print(f"brainmri tune: warning: --resume: unpickling the Tune experiment state under "
              f"{exp.uri} to restore the search (only safe for storage you trust)",
              file=sys.stderr, flush=True)
        return tune.Tuner.restore(exp.path, trainable, storage_filesystem=exp.fs,
                                  resume_unfinished=True, resume_errored=True)
    # max_t one past the last epoch: ASHA never stops a trial at its end, run_training finishes
    scheduler = ASHAScheduler(time_attr="epochs_done", max_t=epochs + 1,
                              grace_period=min(cfg.grace_period, epochs),
                              reduction_factor=cfg.reduction_factor)
    run_config = tune.RunConfig(name=cfg.name, storage_path=(search.out / "tune").path,
                                storage_filesystem=search.out.fs, verbose=1, callbacks=[_reaper()],
                                failure_config=tune.FailureConfig(max_failures=search.max_failures))
    if cfg.search == "random":
        space, how = {"trial": tune.grid_search([t["id"] for t in search.trials])}, {}
    else:
        from .searchers import tpe_searcher

        model = (search.base or {}).get("model", TrainConfig.model)
        space = {}
        how = {"search_alg": tpe_searcher(search.space, model, cfg.num_samples, cfg.seed),
               "num_samples": cfg.num_samples}
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, **how,
                                    max_concurrent_trials=search.max_concurrent,
                                    trial_name_creator=lambda t: t.config["trial"],
                                    trial_dirname_creator=lambda t: t.config["trial"]),
        run_config=run_config)


def run_trials(search: Search, tracking: Tracking | None = None) -> dict[str, str]:
    """Run (or resume) every trial; {trial id: first line of its error} for those that failed."""
    grid = make_tuner(search, tracking).fit()
    if search.cfg.search != "random":
        record_trials(search, [r.config for r in grid if r.config])
    return {r.config["trial"]: str(r.error).splitlines()[0][:300]
            for r in grid if r.error and r.config}


def record_trials(search: Search, configs: list[dict]) -> None:
    """The trials a searcher proposed, as a sampled search records its own (resolved, in
    trials.json), in the order they were proposed."""
    from ..training.train import prepare

    drawn = search.drawn()
    search.trials = [{"id": c["trial"], "params": c["params"],
                      "train": to_dict(prepare(drawn_config(drawn, c["trial"], c["params"])).cfg)}
                     for c in sorted(configs, key=lambda c: c["trial"])]
    saved = (search.exp / "trials.json").read_json()
    (search.exp / "trials.json").write_json({**saved, "trials": search.trials})


def publish_winner(search: Search, rows: list[dict]) -> tuple[dict | None, str | None, str | None]:
    """Publish the best trial (when one has a score), evaluate it on the test split unless
    told not to, and rewrite the leaderboard with the winner's links -> (best row, model URI,
    report URI)."""
    best = rows[0] if rows and rows[0]["best_val_macro_f1"] is not None else None
    if not best:
        return None, None, None
    cfg, report_uri = search.cfg, None
    model_uri = publish_best(search.out, search.exp, best)
    best["model_uri"] = model_uri
    if cfg.evaluate:
        from ..config import EvaluateConfig
        from ..evaluation.evaluate import evaluate

        report_uri = evaluate(EvaluateConfig(model=model_uri, data=search.version.uri, out=search.out.uri,
                                             split="test", gpu=cfg.gpu)).report_uri
        best["report_uri"] = report_uri
    write_leaderboard(search.exp, rows, cfg)  # now with the winner's links
    return best, model_uri, report_uri


def track_search(search: Search, tracking: Tracking | None, rows: list[dict], model_uri: str | None,
                 report_uri: str | None) -> None:
    """The search's MLflow side, from the driver once Tune is done: every trial's run tagged
    with its leaderboard status and rank; the runs of trials Tune ended (ASHA's stops, errors)
    closed as KILLED or FAILED, since their actor died inside run_training; the winner's run
    given the published model and its test report. A trial ASHA stopped was killed right
    after it reported the epoch that stopped it, often before Train's controller logged that
    epoch: the epochs its run lacks are logged from the leaderboard's history before it is
    closed (tagged brainmri.epochs_logged_at_end, as after training). An outage now only
    warns: the search is done and its leaderboard written."""
    if tracking is None:
        return
    from ..core import tracking as T
    from ..models.checkpoints import META_FILE, MODEL_FILE

    ended = {"stopped by ASHA": "KILLED", "error": "FAILED"}
    try:
        with T.talking(tracking.uri, "record the search's trials"):
            T.tag_experiment(tracking, {"brainmri.tune": search.exp.uri,
                                        "brainmri.leaderboard": (search.exp / "leaderboard.html").uri})
            for r in rows:
                run = T.find_run(tracking, r["run_uri"])
                if run is None:
                    continue  # never started
                run.set_tags({"brainmri.status": r["status"], "brainmri.rank": r["rank"]})
                if r["status"] in ended:
                    run.catch_up(r["history"])
                    run.end(ended[r["status"]])
                if model_uri and r is rows[0]:
                    T.log_model(run, model_uri, (META_FILE, MODEL_FILE))
                    if report_uri:
                        T.log_report(run, report_uri)
    except T.TrackingError as e:
        T.warn(str(e))


# -- results -----------------------------------------------------------------------------------
def flops(model, image_size: int) -> int:
    """Forward FLOPs of one image at the trial's input size (torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, image_size, image_size))
    return int(counter.get_total_flops())


def leaderboard(exp: Location, trials: list[dict], errors: dict, classes: list[str]) -> list[dict]:
    """One row per trial from what its Train run left in storage, best first (columns:
    evaluation.report.LEADERBOARD_COLUMNS); `classes`: the dataset's, for the model's size.
    A trial is "completed" when it ran its own epochs (a space may sample them)."""
    from ..models.zoo import count_params, create_model

    rows = []
    for t in trials:
        train, run = t["train"], exp / "runs" / t["train"]["name"]
        hist = (run / "history.json").read_json() if (run / "history.json").exists() else []
        done = (run / "summary.json").exists()
        best = max(hist, key=lambda h: h[METRIC]) if hist else {}
        epochs = train["epochs"]
        if t["id"] in errors:
            status = "error"
        elif done:
            status = "completed" if len(hist) >= epochs else "early stop (patience/time)"
        elif hist:
            status = "completed" if len(hist) >= epochs else "stopped by ASHA"
        else:
            status = "not run"
        model = create_model(train["model"], len(classes), 1, image_size=train["image_size"],
                             **train["model_args"])
        rows.append({
            "trial": t["id"], "model": train["model"], "status": status,
            "best_val_macro_f1": best.get(METRIC), "val_accuracy": best.get("val_accuracy"),
            "val_recall_glioma": M.class_metric(best, "recall", "glioma", prefix="val_"),
            "best_epoch": best.get("epoch"),
            "epochs_run": len(hist), "wall_s": round(sum(h["epoch_seconds"] for h in hist), 1),
            "params": count_params(model), "gflops": round(flops(model, train["image_size"]) / 1e9, 3),
            "config": json.dumps(t["params"], sort_keys=True), "run_uri": run.uri,
            "error": errors.get(t["id"], ""), "history": hist,
        })
    rows.sort(key=lambda r: -1 if r["best_val_macro_f1"] is None else r["best_val_macro_f1"],
              reverse=True)
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return rows


def write_leaderboard(exp: Location, rows: list[dict], cfg: TuneConfig) -> None:
    """leaderboard.{csv,md,html} and search.png, rendered by the evaluation's report modules."""
    from ..evaluation.figures import search_plot
    from ..evaluation.report import render_leaderboard

    png = search_plot(rows, METRIC)
    (exp / "search.png").write_bytes(png)
    note = (f"Search: {cfg.search} (seed {cfg.seed}); ASHA grace {cfg.grace_period} epochs, "
            f"reduction factor {cfg.reduction_factor}. Space: `{cfg.space}`.")
    for name, data in render_leaderboard(rows, cfg.name, METRIC, note, png).items():
        (exp / name).write_bytes(data)


def publish_best(out: Location, exp: Location, best: dict) -> str:
    """Publish the winning trial through the same finishing step as `brainmri train`
    (training.finalize: its best checkpoint, the decision rule its recipe asks for, exports,
    card), recording the search it won."""
    from ..training.finalize import finalize

    run = open_location(best["run_uri"])
    return finalize(run, out, record={"tune": {"experiment": exp.uri, "trial": best["trial"]}}).model_uri
