"""Checks of what a tracked run left in a real `mlflow server` (conftest's mlflow_server): the
tune search (tests/ops/test_tune.py) and the retrain promotion (tests/ops/test_retrain.py)
track into one, through a URI that carries a user and password that must land nowhere."""

from __future__ import annotations

import hashlib
import json

import pytest

from brainmri.core.storage import open_location
from brainmri.core.tracking import RUN_TAG, Tracking

SECRET = "s3cret-pw"
EPOCH_KEYS = ("val_accuracy", "val_macro_f1", "val_recall_glioma", "train_loss")


def tracked(mlflow_server: str):
    """(Tracking with a user and SECRET in its URI, an MlflowClient of the same server)."""
    from mlflow.tracking import MlflowClient

    return (Tracking(mlflow_server.replace("http://", f"http://bob:{SECRET}@")),
            MlflowClient(mlflow_server, registry_uri=mlflow_server))


def runs_of(client, experiment: str) -> dict:
    """{training run URI: MLflow run} of an experiment."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, experiment
    return {r.data.tags[RUN_TAG]: r for r in client.search_runs([exp.experiment_id])}


def assert_epochs_logged(client, run, history: list[dict], stopped: bool = False) -> None:
    """Every epoch of history.json is one point per metric (step = epoch), logged by the
    Train controller's callback while training, not caught up at the end; of a trial ASHA
    `stopped` (killed right after it reported), the last epoch may have been caught up."""
    late = run.data.tags.get("brainmri.epochs_logged_at_end")
    assert late is None or (stopped and late == str(history[-1]["epoch"])), late
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
