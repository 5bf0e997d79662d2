"""The driver's one line per epoch.

Rank 0 rewrites the run's `history.json` after each epoch's checkpoint (train.py); the
driver follows that file from a thread while `trainer.fit()` blocks, and prints each new
epoch from it. Storage is the one thing driver and workers share in every deployment (local
Ray, `ray job submit`, KubeRay), so this needs no Ray internals: a Ray Train callback runs in
the Train controller actor, whose prints would reach the console as Ray's
"(TrainController pid=...)" lines, and only where worker output is forwarded at all.
"""

from __future__ import annotations

import threading
from typing import Callable

from ..core import metrics as M
from ..core.storage import Location

POLL_S = 2.0  # one small read of history.json per poll (a GET on S3)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def epoch_line(m: dict, total: int, eta_s: float | None, new_best: bool) -> str:
    """One history entry (the metrics schema, `val_` prefixed; train.epoch_metrics) as a line."""
    glioma = M.class_metric(m, "recall", "glioma", prefix="val_")
    width = len(str(total))
    line = (f"epoch {m['epoch'] + 1:>{width}}/{total}: train loss {m['train_loss']:.4f} "
            f"acc {m['train_accuracy']:.4f} | val acc {m['val_accuracy']:.4f} "
            f"macro-F1 {m['val_macro_f1']:.4f}{' (best)' if new_best else ''} glioma recall "
            f"{'n/a' if glioma is None else f'{glioma:.4f}'} | {m['epoch_seconds']:.1f} s, "
            f"{m['train_images_per_s']:.0f} img/s")
    return line + (f", ETA {duration(eta_s)}" if eta_s is not None else "")


class EpochLines:
    """Follows `history` (a Location) and calls `say(line)` once for every epoch that appears
    in it after the start (a resumed run's earlier epochs are not repeated), with a note when
    the run resumed from a checkpoint. Use as a context manager around `trainer.fit()`; on
    exit it reads the file once more, so the last epochs are out before the caller's summary."""

    def __init__(self, history: Location, total: int, say: Callable[[str], None]):
        self.history, self.total, self.say = history, total, say
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="brainmri-epochs", daemon=True)
        old = self._read()
        self._last = old[-1]["epoch"] if old else -1
        self._resumes = old[-1].get("resumes", 0) if old else 0
        self._best = max((e["val_macro_f1"] for e in old), default=-1.0)
        self._seconds: list[float] = []

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.poll()

    def _read(self) -> list:
        try:
            return self.history.read_json() if self.history.exists() else []
        except Exception:  # a storage hiccup, never a reason to fail the run: next poll
            return []

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        for m in self._read():
            if m["epoch"] <= self._last:
                continue
            self._last = m["epoch"]
            if m.get("resumes", 0) > self._resumes:
                self._resumes = m["resumes"]
                self.say(f"resumed from the checkpoint of epoch {m['epoch']}")
            self._seconds.append(m["epoch_seconds"])
            recent = self._seconds[-3:]  # the first epoch also fills the workers' caches
            left = self.total - m["epoch"] - 1
            new_best = m["val_macro_f1"] > self._best
            self._best = max(self._best, m["val_macro_f1"])
            self.say(epoch_line(m, self.total, sum(recent) / len(recent) * left if left else None,
                                new_best))
