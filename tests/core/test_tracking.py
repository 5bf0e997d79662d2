"""brainmri.core.tracking without Ray: URIs shown redacted, params flattened, a dead tracking
server refused in one line before anything is written, and tracking off never imports mlflow.
(Tracked training, tune and retrain against a real `mlflow server`: tests/ops/test_tracked_runs.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from brainmri.cli import main
from brainmri.config import IngestConfig
from brainmri.core.tracking import flatten, metric_points, redact
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
