"""training.finalize: the one finishing step (best checkpoint, its own metrics, the decision
rule, publish) on run folders as Ray Train leaves them, without Ray."""

from __future__ import annotations

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
