"""training.progress: the driver's one line per epoch, followed from the run's history.json
(a real local folder, written the way rank 0 writes it; no Ray)."""

from __future__ import annotations

import time

from brainmri.core.storage import open_location
from brainmri.training import progress
from brainmri.training.progress import EpochLines, epoch_line


def entry(epoch: int, f1: float, resumes: int = 0, seconds: float = 10.0) -> dict:
    """A history entry as train.epoch_metrics makes it (the keys the line reads, and more)."""
    return {"epoch": epoch, "epochs_done": epoch + 1, "train_loss": 1.0 / (epoch + 1),
            "train_accuracy": 0.5, "train_images": 64, "val_loss": 0.9, "lr": 1e-3,
            "epoch_seconds": seconds, "train_images_per_s": 123.4, "val_n": 20,
            "val_accuracy": 0.6, "val_macro_f1": f1, "val_recall_glioma": 0.75,
            "val_support_glioma": 5, "resumes": resumes, "best_val_macro_f1": f1}


def test_epoch_line_reads_the_metrics_schema():
    line = epoch_line(entry(2, 0.5432), total=40, eta_s=37 * 60.0, new_best=True)
    assert line == ("epoch  3/40: train loss 0.3333 acc 0.5000 | val acc 0.6000 macro-F1 0.5432 "
                    "(best) glioma recall 0.7500 | 10.0 s, 123 img/s, ETA 37 min")
    no_glioma = {k: v for k, v in entry(0, 0.1).items() if k != "val_recall_glioma"}
    assert "glioma recall n/a" in epoch_line(no_glioma, 1, None, False)
    assert "ETA" not in epoch_line(entry(0, 0.1), 1, None, False)


def test_follows_new_epochs_once_each_and_says_when_the_run_resumed(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "POLL_S", 0.05)
    hist = open_location(tmp_path / "runs" / "r" / "history.json")
    old = [entry(0, 0.3), entry(1, 0.4)]  # a resumed run's earlier epochs: not repeated
    hist.write_json(old)
    lines: list[str] = []
    with EpochLines(hist, total=5, say=lines.append):
        hist.write_json(old + [entry(2, 0.35, resumes=1, seconds=20.0)])
        deadline = time.time() + 10
        while not lines and time.time() < deadline:  # the thread prints while training runs
            time.sleep(0.02)
        assert len(lines) == 2
        hist.write_json(old + [entry(2, 0.35, resumes=1, seconds=20.0), entry(3, 0.5, resumes=1)])
    assert lines[0] == "resumed from the checkpoint of epoch 2"
    assert lines[1].startswith("epoch 3/5:") and "(best)" not in lines[1]  # 0.35 < 0.4
    assert lines[1].endswith("ETA 40 s")  # 2 epochs left at 20 s
    assert lines[2].startswith("epoch 4/5:") and "(best)" in lines[2] and lines[2].endswith("ETA 15 s")
    assert len(lines) == 3  # the exit's last read printed epoch 4, and nothing twice


def test_a_missing_or_unreadable_history_is_not_an_error(tmp_path):
    hist = open_location(tmp_path / "history.json")
    lines: list[str] = []
    with EpochLines(hist, total=2, say=lines.append):
        (tmp_path / "history.json").write_text("{not json")  # never happens (atomic writes)
    assert lines == []
