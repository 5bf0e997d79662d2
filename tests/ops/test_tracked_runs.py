"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts served
by the server) and a real local Ray: a tune search (each trial one run of the search's
experiment, every epoch logged from Train's controller, the winner's model) and a retrain
promotion (the challenger's run with its model and test report, the registered model's
`champion` alias). The tracking URI carries a user and password: they must land nowhere.
Kept to two tiny trainings' worth of work (the search does not evaluate its winner: the report
goes to MLflow through the same `log_report` that the retrain test checks)."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from brainmri.config import RetrainConfig, TuneConfig
from brainmri.core.storage import open_location
from brainmri.core.tracking import RUN_TAG, Tracking
from brainmri.ops.retrain import retrain
from brainmri.ops.tune import run_search

from support.data import real_subset
from support.tiny import small_lake

SECRET = "s3cret-pw"
EPOCH_KEYS = ("val_accuracy", "val_macro_f1", "val_recall_glioma", "train_loss")


@pytest.fixture
def tracking(mlflow_server):
    return Tracking(mlflow_server.replace("http://", f"http://bob:{SECRET}@"))


@pytest.fixture
def client(mlflow_server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(mlflow_server, registry_uri=mlflow_server)


def runs_of(client, experiment: str) -> dict:
    """{training run URI: MLflow run} of an experiment."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, experiment
    return {r.data.tags[RUN_TAG]: r for r in client.search_runs([exp.experiment_id])}


def assert_epochs_logged(client, run, history: list[dict]) -> None:
    """Every epoch of history.json is one point per metric (step = epoch), logged by the
    Train controller's callback while training, not caught up at the end."""
    assert "brainmri.epochs_logged_at_end" not in run.data.tags
    for key in EPOCH_KEYS:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in points] == [h["epoch"] for h in history], key
        assert [v for _, v in points] == pytest.approx([h[key] for h in history]), key


def assert_model_logged(client, run, model_uri: str, tmp_path) -> None:
    got = client.download_artifacts(run.info.run_id, "model", str(tmp_path / run.info.run_id))
    meta = json.loads(open(f"{got}/metadata.json").read())
    assert meta["sha256"] == hashlib.sha256(open(f"{got}/model.pt", "rb").read()).hexdigest()
    assert model_uri.endswith(meta["version"]) and run.data.tags["brainmri.model"] == model_uri


def assert_report_logged(client, run_id: str, report_uri: str, folder: str = "report",
                         prefix: str = "test_") -> None:
    names = {a.path for a in client.list_artifacts(run_id, folder)}
    assert names == {f"{folder}/metrics.json", f"{folder}/report.html"}
    metrics = (open_location(report_uri) / "metrics.json").read_json()["metrics"]["all"]
    assert client.get_run(run_id).data.metrics[f"{prefix}macro_f1"] == pytest.approx(metrics["macro_f1"])


def assert_no_secret(root, client, runs, out: str) -> None:
    assert SECRET not in out
    for run in runs:
        assert SECRET not in json.dumps([run.data.params, run.data.tags])
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_each_trial_is_a_run_of_the_search_and_the_winner_carries_the_model(
        tmp_path, ray_local, tracking, client, capsys):
    lake, _ = small_lake(tmp_path, per_class=12)
    space = {"base": {"epochs": 2, "image_size": 64, "batch_size": 8, "warmup_epochs": 0.5,
                      "patience": 0, "aug_strength": 0.3},
             "space": {"model": ["brainnet"], "model_args.width": [8], "lr": [3e-3, 1e-3]}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    out = tmp_path / "out"
    res = run_search(TuneConfig(data=str(lake), out=str(out), space=str(tmp_path / "space.yaml"),
                                name="tracked-search", num_samples=2, max_concurrent=1,
                                grace_period=1, evaluate=False), tracking)

    runs = runs_of(client, "tracked-search")  # the experiment is the search's name
    assert sorted(runs) == sorted(r["run_uri"] for r in res.leaderboard)
    exp = client.get_experiment_by_name("tracked-search")
    assert exp.tags["brainmri.tune"] == res.experiment_uri
    for row in res.leaderboard:
        run = runs[row["run_uri"]]
        trial = json.loads(row["config"])
        assert run.info.run_name == row["run_uri"].rsplit("/", 1)[-1]
        assert run.data.params["model_args.width"] == "8"
        assert float(run.data.params["lr"]) == trial["lr"]
        assert run.data.params["dataset.version"] == run.data.tags["brainmri.dataset_version"]
        assert run.data.tags["brainmri.status"] == row["status"]
        # a trial ASHA stopped died inside run_training: the search's driver closes its run
        expected = {"completed": "FINISHED", "stopped by ASHA": "KILLED"}[row["status"]]
        assert run.info.status == expected, row["status"]
        assert_epochs_logged(client, run, row["history"])

    winner = runs[res.leaderboard[0]["run_uri"]]
    assert_model_logged(client, client.get_run(winner.info.run_id), res.model_uri, tmp_path)
    captured = capsys.readouterr()
    assert_no_secret(out, client, runs.values(), captured.out + captured.err)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_retrain_promotion_moves_the_champion_alias(tmp_path, ray_local, tracking, client, capsys):
    incoming = real_subset(tmp_path / "incoming", per_class=16)
    store = tmp_path / "store"
    cfg = dict(store=str(store), incoming=str(incoming),
               train={"epochs": 2, "image_size": 64, "batch_size": 16, "warmup_epochs": 0.5,
                      "patience": 0, "model_args": {"width": 8}, "num_workers": 1,
                      "aug_strength": 0.5})
    d = retrain(RetrainConfig(**cfg), tracking=tracking)
    assert d.action == "promoted", d.reason
    rec = d.record

    runs = runs_of(client, "retrain-brain-tumor-mri")  # the default experiment of retrain
    run = runs[rec["challenger"]["run"]]
    assert run.info.status == "FINISHED"
    assert run.data.tags["brainmri.decision"] == "promoted"
    assert run.data.params["candidate"] == "True" and run.data.params["epochs"] == "2"
    assert_epochs_logged(client, run, (open_location(rec["challenger"]["run"]) / "history.json").read_json())
    assert_model_logged(client, run, rec["challenger"]["model"], tmp_path)
    assert_report_logged(client, run.info.run_id, rec["challenger"]["report"])
    audit = client.download_artifacts(run.info.run_id, "retrain/audit.json", str(tmp_path / "audit"))
    assert json.loads(open(audit).read())["id"] == rec["id"]

    # the registry: the challenger's version, and the champion alias on it
    mv = client.get_model_version_by_alias("brainnet", "champion")
    assert mv.run_id == run.info.run_id
    assert mv.tags["brainmri.model"] == rec["challenger"]["model"]
    champion = (store / "retrain" / "brain-tumor-mri" / "champion.json").read_text()
    assert json.loads(champion)["model"] == rec["challenger"]["model"]

    # nothing new: no run, no change in MLflow
    assert retrain(RetrainConfig(**cfg), tracking=tracking).action == "noop"
    assert sorted(runs_of(client, "retrain-brain-tumor-mri")) == sorted(runs)
    captured = capsys.readouterr()
    assert_no_secret(store, client, runs.values(), captured.out + captured.err)
