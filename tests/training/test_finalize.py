"""training.finalize: the one finishing step (best checkpoint, its own metrics, the decision
rule, publish) on run folders as Ray Train leaves them, without Ray."""

from __future__ import annotations

import pytest

from brainmri.core.storage import open_location
from brainmri.models.checkpoints import load_model_state
from brainmri.training.finalize import finalize

from support.tiny import finished_run


def test_the_best_epoch_is_published_with_its_own_metrics(tmp_path):
    """Epoch 1 is the best of three (a later tie does not move it); its row is the metrics."""
    lake, run, _ = finished_run(tmp_path, "argmax", scores=(0.5, 0.7, 0.7))
    done = finalize(run, open_location(str(lake)))
    assert done.state["epoch"] == 1 and done.best["epoch"] == 1
    meta = (open_location(done.model_uri) / "metadata.json").read_json()
    assert meta["metrics"]["epoch"] == 1 and len(meta["history"]) == 3
    assert load_model_state(done.model_uri)["inference"]["decision"] is None  # argmax: no rule


def test_a_history_that_lags_its_last_checkpoint_is_not_trusted(tmp_path):
    """history.json is written after the checkpoint: a crash between them leaves it a row
    short. The checkpoints' own history wins, and the best epoch keeps its own row."""
    lake, run, _ = finished_run(tmp_path, "argmax", scores=(0.5, 0.8), history_rows=1)
    done = finalize(run, open_location(str(lake)))
    assert done.state["epoch"] == 1 and done.best == {"epoch": 1, "val_macro_f1": 0.8, "val_accuracy": 0.8}
    assert [h["epoch"] for h in done.state["history"]] == [0, 1]


def test_a_rerun_of_a_finished_run_publishes_it_without_starting_ray(tmp_path, monkeypatch):
    """Every epoch in history.json: Ray Train would resume past the last epoch and train
    nothing, so run_training publishes the run (finalize) without starting Ray. A history a
    row short (a crash between checkpoint and history.json) is not finished: Ray starts."""
    from dataclasses import replace

    from brainmri.config import TrainConfig, from_dict
    from brainmri.models.checkpoints import CKPT_FILE, load_state
    from brainmri.training import train as T

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(T, "init_ray", no_ray)
    lake, run, row = finished_run(tmp_path, "argmax", scores=(0.5, 0.7))
    recorded = load_state((run / "checkpoint_000001" / CKPT_FILE).read_bytes())["config"]
    cfg = replace(from_dict(TrainConfig, recorded), publish=True, batch_size=8)  # 24 training rows
    storage = open_location(str(tmp_path / "exp" / "runs"))
    (run / "history.json").write_json(row["history"][:1])
    with pytest.raises(AssertionError, match="Ray started"):
        T.run_training(cfg, storage=storage)
    (run / "history.json").write_json(row["history"])
    res = T.run_training(cfg, storage=storage)
    assert [h["epoch"] for h in res.history] == [0, 1] and res.best["epoch"] == 1
    assert load_model_state(res.model_uri)["epoch"] == 1
    assert (run / "summary.json").read_json()["model"] == res.model_uri
