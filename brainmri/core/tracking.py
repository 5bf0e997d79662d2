"""Experiment tracking in MLflow, an optional extra (`pip install 'brainmri[mlflow]'`).

Each training run (`brainmri train`, every tune trial, retrain's challengers) becomes an MLflow
run: its config as params (flattened: `model_args.width`), one point per epoch of every number
in its history (step = epoch), then the published model (`model/`) and, where an evaluation
runs for it, its report (`report/`); retrain's promotion registers the model version and points
the registered model's `champion` alias at it. The bucket keeps its own record (history.json,
leaderboards, reports, champion.json); tracking is a copy for teams that browse MLflow.

Where it runs, with Ray Train V2 (never in a train worker):

    driver of the run (`run_training`; a tune trial's actor)
        start_run    the server must answer (one-line TrackingError otherwise, before any
                     training); the run is created, or reused when one already carries this
                     run's storage URI (a resumed run goes on in the same MLflow run)
        finish_run   epochs the callback could not log, the model files, status FINISHED
    Train controller: `run_callbacks` -> a `ray.train.UserCallback`, one log_batch per epoch
                     from rank 0's report

Ray's own integrations do not fit V2: `setup_mlflow` runs in the train workers (every worker
node would have to reach the server) and `MLflowLoggerCallback` is a Tune callback, which V2's
RunConfig refuses and which would see only Tune's results, never the model.

Policy: a server that does not answer fails a command before it trains (one line, exit 2);
once a run trains, an outage only warns: the run is never lost to its tracking.

With tracking off nothing here runs and mlflow is never imported. A tracking URI may carry
credentials (`https://user:password@host`): it is never printed, stored or logged (messages
show it redacted), which is why it is not a field of any config that is written to storage.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

from ..config import TrackingConfig
from .storage import Location, StorageError

ENV_URI = "MLFLOW_TRACKING_URI"  # MLflow's own variable: --tracking-uri wins over it
RUN_TAG = "brainmri.run_uri"  # finds a training run's MLflow run again (resume, tune, retrain)
CHAMPION = "champion"  # the registered model's alias retrain moves on promotion
REPORT_FILES = ("metrics.json", "report.html")  # of a report folder (evaluation.evaluate's format)
# (retries, seconds per request): MLflow's defaults back off for minutes on a dead server
PROBE, EPOCH, FINISH = (0, 10), (1, 10), (2, 120)


class TrackingError(StorageError):
    """The tracking server cannot be used; one sentence, the URI redacted."""


@dataclass(frozen=True)
class Tracking:
    """Where a run reports: the tracking URI (never shown: it may hold credentials) and the
    experiment ("" = the command's own default, see `named`)."""

    uri: str = field(repr=False)
    experiment: str = ""

    def named(self, default: str) -> Tracking:
        return self if self.experiment else replace(self, experiment=default)


def from_config(tc: TrackingConfig) -> Tracking | None:
    """The command line's tracking (--tracking-uri, else $MLFLOW_TRACKING_URI), or None: off."""
    uri = tc.tracking_uri or os.environ.get(ENV_URI, "")
    return Tracking(uri, tc.tracking_experiment) if uri else None


def redact(uri: str) -> str:
    """The URI without user, password and query (where tokens travel): safe to print."""
    u = urlsplit(uri)
    if not u.netloc:
        return uri.split("?", 1)[0]
    host = u.netloc.rsplit("@", 1)[-1]
    return urlunsplit((u.scheme, ("***@" if "@" in u.netloc else "") + host, u.path, "", ""))


def _scrub(text: str, uri: str) -> str:
    text = text.replace(uri, redact(uri))
    u = urlsplit(uri)
    for secret in (u.password, u.query):
        if secret:
            text = text.replace(secret, "***")
    return text


def _why(e: Exception, uri: str) -> str:
    """A failed MLflow call in a few words: the socket's reason when the server did not
    answer (MLflow wraps it in a long message that repeats the URI), else its first line."""
    cause = e.__cause__ or e.__context__
    if cause is not None and type(cause).__module__.split(".")[0] in ("requests", "urllib3"):
        found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(cause))
        return "no answer: " + (found.group(1) if found else type(cause).__name__)
    text = (str(e).splitlines() or [type(e).__name__])[0]
    return _scrub(text, uri)[:200]


def warn(message: str) -> None:
    print(f"brainmri: tracking: warning: {message}", file=sys.stderr, flush=True)


# -- talking to the server -------------------------------------------------------------------
def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("tracking needs MLflow: pip install 'brainmri[mlflow]'") from None
    # MLflow prints "View run <name> at: <tracking URI>/#/..." when a run ends: the URI may
    # hold a password, so that line is always off
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def talking(uri: str, doing: str, patience: tuple[int, float] = FINISH):
    """A block of MLflow calls with bounded retries (MLflow reads these variables on every
    request), any failure turned into one TrackingError sentence with the URI redacted."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(patience[0]),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(patience[1]))}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow tracking at {redact(uri)}: could not {doing} "
                            f"({_why(e, uri)})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name)
    if exp.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} is deleted: restore it or choose "
                            "another --tracking-experiment")
    return exp.experiment_id


def check(tracking: Tracking) -> str:
    """Prove the server answers now and the experiment is usable (created when missing);
    returns its id. The one-line failure of a command that would train untracked."""
    with talking(tracking.uri, f"open experiment {tracking.experiment!r}", PROBE):
        return _experiment_id(_client(tracking.uri), tracking.experiment)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"model_args": {"width": 16}} -> {"model_args.width": "16"}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]  # MLflow's limit for a param value
    return out


def metric_points(metrics: dict) -> dict[str, float]:
    """The numbers of one epoch's metrics (history.json's entries, Train's reports); the epoch
    itself is the step, not a metric."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}


# -- a tracked run ---------------------------------------------------------------------------
class TrackedRun:
    """One MLflow run, by id; the client is made where it is used (driver or controller)."""

    def __init__(self, tracking: Tracking, run_id: str):
        self.tracking, self.run_id, self._client = tracking, run_id, None

    def __getstate__(self):  # travels to Ray's Train controller without a live client
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.tracking.uri)
        return self._client

    def talking(self, doing: str, patience=FINISH):
        return talking(self.tracking.uri, doing, patience)

    def log_epoch(self, metrics: dict, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = timestamp_ms or int(time.time() * 1000)
        points = [Metric(k, v, ts, int(metrics["epoch"])) for k, v in metric_points(metrics).items()]
        self.client.log_batch(self.run_id, metrics=points)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, 0) for k, v in values.items()])

    def log_files(self, folder: Location, names, artifact_path: str) -> None:
        """Files of a storage folder (local or s3://) as artifacts under `artifact_path`."""
        with tempfile.TemporaryDirectory(prefix="brainmri-tracking-") as tmp:
            for name in names:
                if (folder / name).exists():
                    local = os.path.join(tmp, name)
                    with open(local, "wb") as f:
                        f.write((folder / name).read_bytes())
                    self.client.log_artifact(self.run_id, local, artifact_path)

    def log_missing_epochs(self, history: list[dict]) -> list[int]:
        """The epochs of `history` the run has no point for (the callback lost the server, or
        the run was resumed by a driver without tracking), logged now; returns them."""
        from .metrics import SELECTION_METRIC

        logged = {m.step for m in self.client.get_metric_history(self.run_id, SELECTION_METRIC)}
        missing = [h for h in history if int(h["epoch"]) not in logged]
        ts = int(time.time() * 1000)
        for h in missing:
            self.log_epoch(h, ts)
        return [int(h["epoch"]) for h in missing]

    def catch_up(self, history: list[dict]) -> None:
        """log_missing_epochs, the epochs so logged named in the tag
        brainmri.epochs_logged_at_end (they were not logged while the run trained)."""
        missed = self.log_missing_epochs(history)
        if missed:
            self.set_tags({"brainmri.epochs_logged_at_end": ",".join(map(str, missed))})

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def start_run(tracking: Tracking | None, run_uri: str, name: str, params: dict,
              tags: dict) -> TrackedRun | None:
    """The MLflow run of training run `run_uri` (storage URI of runs/<name>), created with its
    params and tags, or the one a previous attempt left (set RUNNING again). None when off."""
    if tracking is None:
        return None
    with talking(tracking.uri, f"start run {name!r} in experiment {tracking.experiment!r}", PROBE):
        client = _client(tracking.uri)
        experiment = _experiment_id(client, tracking.experiment)
        run = find_run(tracking, run_uri, client, experiment)
        if run is not None:
            client.update_run(run.run_id, status="RUNNING")
            return run
        created = client.create_run(experiment, run_name=name,
                                    tags={RUN_TAG: run_uri, **{k: str(v) for k, v in tags.items()}})
        run = TrackedRun(tracking, created.info.run_id)
        run._client = client
        run.log_params(flatten(params))
        return run


def find_run(tracking: Tracking, run_uri: str, client=None, experiment_id: str | None = None
             ) -> TrackedRun | None:
    """The MLflow run carrying training run `run_uri` in the experiment, or None."""
    client = client or _client(tracking.uri)
    exp = experiment_id or _experiment_id(client, tracking.experiment)
    if "'" in run_uri:  # not expressible in MLflow's filter language: never reused
        return None
    found = client.search_runs([exp], f"tags.`{RUN_TAG}` = '{run_uri}'", max_results=1)
    return TrackedRun(tracking, found[0].info.run_id) if found else None


def run_callbacks(run: TrackedRun | None) -> list:
    """[the Train V2 callback logging each epoch from the controller], or [] when off."""
    if run is None:
        return []
    import ray.train

    class EpochsToMLflow(ray.train.UserCallback):
        """Rank 0's report of each epoch -> one MLflow log_batch. A failure warns once and
        stops it: the run goes on, and finish_run logs the epochs it missed."""

        def __init__(self, run: TrackedRun):
            self.run, self.lost = run, False

        def after_report(self, run_context, metrics, checkpoint):
            if self.lost or not metrics or "epoch" not in metrics[0]:
                return
            try:
                with self.run.talking("log an epoch", EPOCH):
                    self.run.log_epoch(metrics[0])  # every rank reports the same all-reduced numbers
            except TrackingError as e:
                self.lost = True
                warn(f"{e}; training goes on, the missing epochs are logged when it ends")

    return [EpochsToMLflow(run)]


@contextmanager
def failing(run: TrackedRun | None):
    """Marks the run FAILED when the block raises (then re-raises): a run Ray gave up on."""
    try:
        yield
    except BaseException:
        if run is not None:
            try:
                with run.talking("mark the run failed", PROBE):
                    run.end("FAILED")
            except TrackingError as e:
                warn(str(e))
        raise


def finish_run(run: TrackedRun | None, history: list[dict], model: str | None,
               model_files=()) -> None:
    """After training: epochs not yet logged, the published model's files under `model/`,
    status FINISHED. An outage now only warns: the model is published either way."""
    if run is None:
        return
    try:
        with run.talking("finish the run"):
            run.catch_up(history)
            if model:
                log_model(run, model, model_files)
            run.end("FINISHED")
    except TrackingError as e:
        warn(str(e))


def log_model(run: TrackedRun, model_uri: str, files) -> None:
    from .storage import open_location

    loc = open_location(model_uri)
    run.log_files(loc, files, "model")
    run.set_tags({"brainmri.model": model_uri, "brainmri.model_version": loc.name})


def log_report(run: TrackedRun, report_uri: str, artifact_path: str = "report",
               prefix: str = "test_") -> None:
    """An evaluation report's metrics.json and report.html under `artifact_path`, and its
    numbers on all its images as metrics `<prefix><name>` (test_macro_f1, ...)."""
    from .storage import open_location

    folder = open_location(report_uri)
    run.log_files(folder, REPORT_FILES, artifact_path)
    values = metric_points((folder / "metrics.json").read_json()["metrics"]["all"])
    run.log_metrics({prefix + k: v for k, v in values.items()})
    run.set_tags({f"brainmri.{artifact_path}": report_uri})


def tag_experiment(tracking: Tracking, tags: dict) -> None:
    client = _client(tracking.uri)
    experiment = _experiment_id(client, tracking.experiment)
    for k, v in tags.items():
        client.set_experiment_tag(experiment, k, str(v))


def set_champion(run: TrackedRun, model_name: str, model_uri: str) -> str:
    """Register the model version logged in `run` (under `model/`) as a version of registered
    model `model_name` and point its `champion` alias at it; returns the registry version."""
    from mlflow.exceptions import MlflowException

    client = run.client
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = model_uri.rstrip("/").rsplit("/", 1)[-1]
    mv = client.create_model_version(model_name, f"runs:/{run.run_id}/model", run_id=run.run_id,
                                     tags={"brainmri.model": model_uri, "brainmri.model_version": version})
    client.set_registered_model_alias(model_name, CHAMPION, mv.version)
    return mv.version
