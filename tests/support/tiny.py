"""Test helpers for evaluation and prediction: a small real lake, a tiny model trained in
this process with plain PyTorch (seconds, no Ray), and a Kaggle-layout folder with bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from brainmri.config import IngestConfig, TrainConfig, to_dict
from brainmri.core.storage import open_location
from brainmri.data.datasets import manifest_hash, resolve_dataset, split_files
from brainmri.data.ingest import ingest
from brainmri.data.transforms import preprocess_many, to_model_input
from brainmri.models.checkpoints import make_checkpoint, publish_model
from brainmri.models.zoo import count_params, create_model

from support.data import CLASSES, SHARED_DATA, real_subset

SIZE = 64
MODEL_ARGS = {"width": 8}


def small_lake(root: Path, per_class: int = 20) -> tuple[Path, str]:
    """~per_class real scans per class ingested (val 25 %, test 25 %); (lake, version URI)."""
    src = real_subset(root / "src", per_class=per_class)
    res = ingest(str(src), str(root / "lake"),
                 IngestConfig(val_fraction=0.25, test_fraction=0.25, workers=1))
    return root / "lake", res.location.uri


def train_inprocess(lake: Path, version_uri: str, steps: int = 30, seed: int = 0) -> str:
    """A brainnet (width 8, 64 px) fitted for a few full-batch steps on the train split, then
    published like run_training does; returns the model version URI."""
    version, manifest = resolve_dataset(version_uri)
    t = pq.read_table(split_files(version, manifest, "train")[0], columns=["image", "label"])
    x = torch.from_numpy(preprocess_many(t.column("image").to_pylist(), SIZE))
    y = torch.as_tensor(np.asarray(t.column("label"), dtype=np.int64))
    torch.manual_seed(seed)
    cfg = TrainConfig(data=version_uri, out=str(lake), name="tiny", image_size=SIZE,
                      model_args=dict(MODEL_ARGS), epochs=1, num_workers=1)
    model = create_model("brainnet", len(CLASSES), 1, image_size=SIZE, **MODEL_ARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(steps):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(to_model_input(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            history.append({"epoch": len(history), "train_loss": loss.item(), "val_loss": loss.item(),
                            "val_accuracy": 0.5, "val_macro_f1": 0.5})
    ckpt = make_checkpoint(
        model.eval().state_dict(), epoch=0, best=0.5, bad_epochs=0, history=history, resumes=[],
        config=to_dict(cfg), classes=list(CLASSES),
        dataset={"uri": version.uri, "name": manifest["name"], "version": manifest["version"],
                 "manifest_hash": manifest_hash(manifest)},
        params=count_params(model))
    return publish_model(open_location(str(lake)), "brainnet", ckpt, history[-1]).uri


BAD_FILES = {  # name -> bytes; all three must be rejected, none may stop the run
    "empty.jpg": b"",
    "notes.jpg": b"patient notes, not a scan\n" * 20,
}


def kaggle_folder(dest: Path, per_class: int = 3, offset: int = 200) -> tuple[Path, int, dict]:
    """Real scans not in small_lake (offset) in <class>/ folders, plus bad files; returns
    (folder, number of good images, {reason: count} expected)."""
    src = SHARED_DATA / "Training"
    good = 0
    for c in CLASSES:
        (dest / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).iterdir())[offset:offset + per_class]:
            shutil.copy2(f, dest / c / f.name)
            good += 1
    first = sorted((src / CLASSES[0]).iterdir())[offset].read_bytes()
    for name, data in BAD_FILES.items():
        (dest / CLASSES[1] / name).write_bytes(data)
    (dest / CLASSES[2] / "truncated.jpg").write_bytes(first[: len(first) // 2])
    (dest / CLASSES[3] / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (dest / "readme.txt").write_text("not in a class folder\n")
    expected = {"empty_file": 1, "not_an_image": 1, "corrupt_or_truncated": 1,
                "hidden_or_system_file": 1, "outside_known_class_folder": 1}
    return dest, good, expected


def publish_untrained(out: Path, seed: int, name: str = "brainnet") -> str:
    """A brainnet (width 8, 64 px) with seeded random weights, published like run_training
    does, without any training or data (milliseconds): two seeds give two versions that
    answer the same scan differently. Returns the version URI."""
    torch.manual_seed(seed)
    cfg = TrainConfig(out=str(out), name=f"untrained-{seed}", image_size=SIZE, model_args=dict(MODEL_ARGS))
    model = create_model("brainnet", len(CLASSES), 1, image_size=SIZE, **MODEL_ARGS)
    ckpt = make_checkpoint(model.eval().state_dict(), epoch=0, best=0.0, bad_epochs=0, history=[],
                           resumes=[], config=to_dict(cfg), classes=list(CLASSES),
                           dataset={"uri": "", "name": "none", "version": "none"},
                           params=count_params(model))
    return publish_model(open_location(str(out)), name, ckpt, {"val_macro_f1": 0.25 + seed / 100}).uri


def finished_run(root: Path, decision_rule: str, scores=(0.6, 0.5), history_rows: int | None = None):
    """A small real dataset version and a run folder as a finished Train run leaves it
    (config.json, history.json, one checkpoint per epoch, each holding the history up to its
    epoch), without Ray: (lake, run Location, the leaderboard row tune publishes from).
    `history_rows`: history.json lags the checkpoints by keeping only that many rows."""
    from brainmri.models.checkpoints import CKPT_FILE, dump_state

    lake, version_uri = small_lake(root, per_class=10)
    version, manifest = resolve_dataset(version_uri)
    cfg = TrainConfig(data=version_uri, out=str(lake), name="t000-brainnet", image_size=SIZE,
                      epochs=len(scores), model_args=dict(MODEL_ARGS), num_workers=1, publish=False,
                      decision_rule=decision_rule, decision_max_f1_drop=0.1, decision_max_accuracy_cost=0.1)
    run = open_location(str(root / "exp" / "runs" / cfg.name))
    history = [{"epoch": e, "val_macro_f1": f, "val_accuracy": f} for e, f in enumerate(scores)]
    for epoch in range(len(scores)):
        torch.manual_seed(epoch)
        net = create_model("brainnet", len(CLASSES), 1, image_size=SIZE, **MODEL_ARGS)
        state = make_checkpoint(net.state_dict(), epoch=epoch, best=max(scores[:epoch + 1]), bad_epochs=0,
                                history=history[:epoch + 1], resumes=[], config=to_dict(cfg),
                                classes=list(manifest["classes"]),
                                dataset={"uri": version.uri, "name": manifest["name"],
                                         "version": manifest["version"],
                                         "manifest_hash": manifest_hash(manifest)},
                                params=count_params(net))
        (run / f"checkpoint_00000{epoch}" / CKPT_FILE).write_bytes(dump_state(state))
    (run / "history.json").write_json(history[:history_rows] if history_rows else history)
    return lake, run, {"trial": cfg.name, "run_uri": run.uri, "history": history}
