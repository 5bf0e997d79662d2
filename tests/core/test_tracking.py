"""brainmri.core.tracking without a Ray cluster: URIs shown redacted, params flattened, a dead
tracking server refused in one line before anything is written, tracking off never imports
mlflow; against a real `mlflow server`: a run reused on resume, the epochs an outage cost logged
at the end, FAILED when training raises. (A tracked tune
search and retrain on Ray: tests/ops/test_tune.py, tests/ops/test_retrain.py, with the checks of
support/tracked.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from brainmri.cli import main
from brainmri.config import IngestConfig
from brainmri.core.tracking import (
    TrackedRun,
    Tracking,
    failing,
    finish_run,
    flatten,
    metric_points,
    redact,
    run_callbacks,
    start_run,
)
from brainmri.data.ingest import ingest

from support.data import REPO, real_subset
from support.mlflow_server import free_port


def test_uris_are_shown_without_credentials():
    assert redact("https://bob:s3cret@mlflow.example.com:5000/x?token=t0k") == \
        "https://***@mlflow.example.com:5000/x"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact("databricks") == "databricks"


def test_params_are_flat_and_metrics_are_the_numbers_of_an_epoch():
    assert flatten({"lr": 0.1, "model_args": {"width": 8, "depth": 3}, "empty": {}, "tags": [1, 2]}) == {
        "lr": "0.1", "model_args.width": "8", "model_args.depth": "3", "empty": "{}", "tags": "[1, 2]"}
    assert metric_points({"epoch": 3, "val_macro_f1": 0.5, "train_images": 64, "gpu": True,
                          "placement_group": "ab12", "val_confusion": [[1]]}) == {
        "val_macro_f1": 0.5, "train_images": 64.0}


def test_tracking_off_never_imports_mlflow():
    code = """
import sys
from brainmri import cli
from brainmri.core import tracking
from brainmri.ops import retrain, tune
from brainmri.training import train
assert cli.tracking_from_args(cli.build_parser().parse_args(["train"])) is None
assert tracking.start_run(None, "/r", "r", {}, {}) is None and tracking.run_callbacks(None) == []
tracking.finish_run(None, [], None)
retrain.track_decision(None, {}, "brainnet")
with tracking.failing(None):
    pass
print("mlflow" in sys.modules)
"""
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_a_dead_tracking_server_fails_each_command_in_one_line_before_any_work(tmp_path, capsys):
    src = real_subset(tmp_path / "src", per_class=4)
    lake = tmp_path / "lake"
    ingest(str(src), str(lake), IngestConfig(val_fraction=0.25, test_fraction=0.25, workers=1))
    dead = f"http://bob:s3cret@127.0.0.1:{free_port()}"  # nothing listens there
    store = tmp_path / "store"
    commands = {
        "train": ["train", "--data", str(lake), "--out", str(store), "--name", "r", "--batch-size", "2",
                  "--num-workers", "1", "--epochs", "1", "--image-size", "64"],
        "tune": ["tune", "--data", str(lake), "--out", str(store), "--name", "s"],
        "retrain": ["retrain", "--store", str(store), "--incoming", str(src)],
    }
    for cmd, argv in commands.items():
        capsys.readouterr()
        t0 = time.time()
        assert main([*argv, "--tracking-uri", dead]) == 2, cmd
        err = capsys.readouterr().err
        assert time.time() - t0 < 30, cmd  # no minutes of MLflow's default retries
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"brainmri {cmd}: error: MLflow tracking at "
                                                       "http://***@127.0.0.1:"), err
        assert "no answer" in err and "s3cret" not in err and "bob" not in err
    # nothing was written: no run, no search, no lease, no ingest into the store
    assert not store.exists() or sorted(p.name for p in store.iterdir()) == []


@pytest.mark.slow  # starts the real `mlflow server` (session fixture): ~10-30 s on 2 cores
def test_a_run_is_reused_catches_up_after_an_outage_and_ends_failed_or_finished(
        mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    tracking = Tracking(mlflow_server, "core-unit")
    run = start_run(tracking, "/lake/runs/r1", "r1", {"lr": 0.1, "model_args": {"width": 8}},
                    {"brainmri.dataset_version": "v1"})
    (callback,) = run_callbacks(run)  # what Train's controller runs after each epoch's report
    callback.after_report(None, [{"epoch": 0, "val_macro_f1": 0.5, "train_loss": 1.0}], None)
    # the same training run started again (a resume) goes on in the same MLflow run
    again = start_run(tracking, "/lake/runs/r1", "r1", {}, {})
    assert again.run_id == run.run_id

    # a controller that loses the server warns once and lets training go on...
    dead = TrackedRun(Tracking(f"http://127.0.0.1:{free_port()}", "core-unit"), run.run_id)
    (lost,) = run_callbacks(dead)
    for epoch in (1, 2):
        lost.after_report(None, [{"epoch": epoch, "val_macro_f1": 0.6, "train_loss": 0.9}], None)
    assert lost.lost and capsys.readouterr().err.count("brainmri: tracking: warning:") == 1
    # ...and the end of the run logs the epochs it missed, then the model
    history = [{"epoch": e, "val_macro_f1": 0.5 + e / 10, "train_loss": 1.0 - e / 10} for e in range(3)]
    model = tmp_path / "models" / "brainnet" / "v1"
    model.mkdir(parents=True)
    (model / "metadata.json").write_text('{"version": "v1"}')
    (model / "model.pt").write_bytes(b"weights")
    finish_run(again, history, str(model), ("metadata.json", "model.pt"))

    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.info.run_name == "r1"
    assert r.data.params == {"lr": "0.1", "model_args.width": "8"}
    assert r.data.tags["brainmri.epochs_logged_at_end"] == "1,2"
    assert r.data.tags["brainmri.model"] == str(model)
    points = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "train_loss"))
    assert points == [(0, 1.0), (1, pytest.approx(0.9)), (2, pytest.approx(0.8))]
    assert {a.path for a in client.list_artifacts(run.run_id, "model")} == {
        "model/metadata.json", "model/model.pt"}

    # a run whose training raises ends FAILED, and the error goes on up
    other = start_run(tracking, "/lake/runs/r2", "r2", {}, {})
    with pytest.raises(RuntimeError, match="worker died"), failing(other):
        raise RuntimeError("worker died")
    assert client.get_run(other.run_id).info.status == "FAILED"
