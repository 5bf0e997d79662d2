"""Scheduled retraining on local Ray with a few real scans: no-op, challenger, rejection of a
worse challenger, frozen test set, lease, a crash before promotion, and the promotion tracked
in MLflow."""

from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import replace

import pytest

from brainmri.cli import main
from brainmri.config import ConfigError, EvaluateConfig
from brainmri.core.lock import Lease, LockHeld, read_tagged, write_if
from brainmri.core.storage import open_location
from brainmri.data.ingest import frozen_test_hashes
from brainmri.models.checkpoints import load_model_state, model_file
from brainmri.ops.retrain import RetrainConfig, audit_log, decide, earlier_report, retrain, state_root

from support.data import real_subset
from support.tracked import (
    assert_epochs_logged,
    assert_model_logged,
    assert_no_secret,
    assert_report_logged,
    runs_of,
    tracked,
)

# a recipe small enough for CI: brainnet width 8 at 64 px, one worker
TINY = {"epochs": 4, "image_size": 64, "batch_size": 16, "warmup_epochs": 0.5, "patience": 0,
        "model_args": {"width": 8}, "num_workers": 1, "aug_strength": 0.5,
        # the recipe knobs this lifecycle was measured with, whatever the defaults become
        "ema_decay": 0.0, "mix_prob": 0.0, "weight_decay": 0.05, "label_smoothing": 0.1,
        "class_weighting": True, "tta": False, "decision_rule": "argmax"}


def unfenced(record: dict) -> dict:
    """A state object without the lease generation that each run stamps into it."""
    return {k: v for k, v in record.items() if k != "fence"}


def test_decision_rule():
    cfg = RetrainConfig(tolerance_macro_f1=0.01, tolerance_glioma_recall=0.02)
    champ = {"macro_f1": 0.90, "recall_glioma": 0.90}
    assert decide(None, champ, cfg) == (True, "no champion yet")
    assert decide(champ, {"macro_f1": 0.895, "recall_glioma": 0.885}, cfg)[0]  # within tolerance
    ok, why = decide(champ, {"macro_f1": 0.95, "recall_glioma": 0.85}, cfg)
    assert not ok and "glioma recall -0.0500" in why  # better overall, worse on glioma: no
    ok, why = decide(champ, {"macro_f1": 0.80, "recall_glioma": 0.95}, cfg)
    assert not ok and "macro-F1 -0.1000" in why


def test_a_challenger_builds_the_network_its_champion_recorded(tmp_path, monkeypatch):
    """A champion trained when {} meant the factory's brainnet (width 32) gets a width-32
    challenger, not the recipe's (pinned to width 40 here, apart from the factory's); a given
    recipe or no champion gets the recipe's."""
    from brainmri.config import RECIPE_SHAPES, TrainConfig, to_dict
    from brainmri.ops.retrain import challenger_config

    monkeypatch.setitem(RECIPE_SHAPES["brainnet"], "width", 40)

    store = open_location(str(tmp_path))
    old = {"recipe": {**to_dict(TrainConfig()), "model_args": {}}}
    assert challenger_config(RetrainConfig(), old, "v", store, "r").model_args["width"] == 32
    kept = {"recipe": {**to_dict(TrainConfig()), "model_args": {"width": 16}}}
    assert challenger_config(RetrainConfig(), kept, "v", store, "r").model_args["width"] == 16
    assert challenger_config(RetrainConfig(), None, "v", store, "r").shape()["width"] == 40


def test_a_training_override_changes_one_shape_argument_of_the_champions_network(tmp_path):
    """`--train model_args.width=48` on a champion with depth [2, 2, 2, 2] and kernel 5: the
    challenger is that network at width 48, not the recipe's shape at width 48."""
    from brainmri.cli import build_parser, config_from_args
    from brainmri.config import TrainConfig, to_dict
    from brainmri.ops.retrain import challenger_config

    cfg = config_from_args(build_parser().parse_args(["retrain", "--train", "model_args.width=48",
                                                      "--train", "epochs=3"]))
    champ = {"recipe": {**to_dict(TrainConfig()),
                        "model_args": {"width": 40, "depth": [2, 2, 2, 2], "kernel": 5, "stem_stride": 4}}}
    got = challenger_config(cfg, champ, "v", open_location(str(tmp_path)), "r")
    want = {"width": 48, "depth": [2, 2, 2, 2], "kernel": 5, "stem_stride": 4}
    assert {k: got.model_args.get(k) for k in want} == want
    assert got.epochs == 3 and got.candidate and got.publish


def test_the_challenger_records_its_whole_network(tmp_path, monkeypatch):
    """What champion.json keeps as the recipe (to_dict of the challenger's config) names the
    network it trained: with no champion, the recipe's shape, not {} (which a later run would
    read as the factory's width 32); another model starts from that model's own shape. The
    recipe's width is pinned to 40, apart from the factory's."""
    from brainmri.config import RECIPE_SHAPES, to_dict
    from brainmri.models.zoo import full_shape
    from brainmri.ops.retrain import challenger_config

    monkeypatch.setitem(RECIPE_SHAPES["brainnet"], "width", 40)

    store = open_location(str(tmp_path))
    first = challenger_config(RetrainConfig(), None, "v", store, "r")
    assert first.model_args == full_shape("brainnet", RECIPE_SHAPES["brainnet"]) and first.model_args["width"] == 40
    champ = {"recipe": to_dict(first)}
    other = challenger_config(RetrainConfig(train={"model": "seed_cnn"}), champ, "v", store, "r")
    assert other.model == "seed_cnn" and other.model_args == full_shape("seed_cnn", {})


def test_bad_settings_fail_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown config key.*train.epocs"):
        RetrainConfig(train={"epocs": 3}).validate()
    assert main(["retrain", "--store", str(tmp_path), "--incoming", str(tmp_path / "nope")]) == 2
    assert "incoming prefix" in capsys.readouterr().err
    assert not (tmp_path / "retrain").exists()


@pytest.mark.slow
def test_retrain_lifecycle(tmp_path, ray_local, mlflow_server, capsys):
    """The first two ticks are tracked into a real `mlflow server` through a URI with a
    password (support.tracked): the challenger's run with its epochs, model, test report and
    audit record, the registered model's `champion` alias on it; nothing new, nothing logged."""
    incoming = real_subset(tmp_path / "incoming", per_class=40)
    store = tmp_path / "store"
    root = state_root(open_location(str(store)), "brain-tumor-mri")
    cfg = dict(store=str(store), incoming=str(incoming), train=TINY)
    tracking, client = tracked(mlflow_server)

    # 1. first run: nothing to beat; the challenger becomes the champion
    d1 = retrain(RetrainConfig(**cfg), tracking=tracking)
    assert d1.action == "promoted" and d1.reason == "no champion yet"
    champ1 = unfenced((root / "champion.json").read_json())
    assert champ1["model"] == d1.record["challenger"]["model"]
    # the promoted challenger is what models/<model> serves from now on
    assert model_file(str(store / "models" / "brainnet")).uri == champ1["model"] + "/model.pt"
    assert champ1["frozen_test"] == champ1["dataset"]  # the first version's test split is frozen
    load_model_state(champ1["model"])
    runs_before = sorted((store / "runs").iterdir())

    # ...tracked: the challenger's run (the default experiment of retrain) and the registry
    rec = d1.record
    runs = runs_of(client, "retrain-brain-tumor-mri")
    run = runs[rec["challenger"]["run"]]
    assert run.info.status == "FINISHED"
    assert run.data.tags["brainmri.decision"] == "promoted"
    assert run.data.params["candidate"] == "True" and run.data.params["epochs"] == str(TINY["epochs"])
    assert_epochs_logged(client, run, (open_location(rec["challenger"]["run"]) / "history.json").read_json())
    assert_model_logged(client, run, rec["challenger"]["model"], tmp_path)
    assert_report_logged(client, run.info.run_id, rec["challenger"]["report"])
    audit = client.download_artifacts(run.info.run_id, "retrain/audit.json", str(tmp_path / "audit"))
    assert json.loads(open(audit).read())["id"] == rec["id"]
    mv = client.get_model_version_by_alias("brainnet", "champion")
    assert mv.run_id == run.info.run_id and mv.tags["brainmri.model"] == rec["challenger"]["model"]

    # 2. nothing new: exit quietly, write nothing, log nothing
    d2 = retrain(RetrainConfig(**cfg), tracking=tracking)
    assert d2.action == "noop" and "unchanged" in d2.reason
    assert len(audit_log(str(store), "brain-tumor-mri")) == 1
    assert sorted((store / "runs").iterdir()) == runs_before
    assert sorted(runs_of(client, "retrain-brain-tumor-mri")) == sorted(runs)
    captured = capsys.readouterr()
    assert_no_secret(store, client, runs.values(), captured.out + captured.err)

    # 3. new scans and a deliberately bad recipe: trained and evaluated, but not promoted
    real_subset(tmp_path / "more", per_class=8, offset=300)
    shutil.copytree(tmp_path / "more" / "Training", incoming / "Training", dirs_exist_ok=True)
    d3 = retrain(RetrainConfig(**{**cfg, "train": {**TINY, "lr": 1e-7, "epochs": 1}}))
    assert d3.action == "rejected" and "challenger worse" in d3.reason, d3.reason
    rec = d3.record
    assert rec["frozen_test"]["uri"] == champ1["frozen_test"]
    assert rec["champion"]["test"]["n"] == rec["challenger"]["test"]["n"] == rec["frozen_test"]["rows"]
    assert rec["challenger"]["test"]["macro_f1"] < rec["champion"]["test"]["macro_f1"]
    assert unfenced((root / "champion.json").read_json()) == champ1
    # the rejected challenger is a published candidate, and models/<model> does not serve it
    assert load_model_state(rec["challenger"]["model"])["config"]["candidate"]
    assert model_file(str(store / "models" / "brainnet")).uri == champ1["model"] + "/model.pt"
    assert [a["decision"] for a in audit_log(str(store), "brain-tumor-mri")] == ["promoted", "rejected"]
    # the new dataset version kept every frozen test image in its test split
    assert rec["dataset"] != champ1["dataset"]
    assert frozen_test_hashes(champ1["frozen_test"]) <= frozen_test_hashes(rec["dataset"])
    created = (open_location(rec["champion"]["report"]) / "metrics.json").read_json()["created_at"]

    # 4. a crash between training and promotion leaves the champion in place and the lease free
    real_subset(tmp_path / "more2", per_class=4, offset=400)
    shutil.copytree(tmp_path / "more2" / "Training", incoming / "Training", dirs_exist_ok=True)

    def crash(stage):
        if stage == "trained":  # right after training: both evaluations the rerun does anyway
            raise RuntimeError("simulated crash before promotion")

    with pytest.raises(RuntimeError, match="simulated crash"):
        retrain(RetrainConfig(**cfg), hooks=crash)
    assert unfenced((root / "champion.json").read_json()) == champ1
    assert (root / "lock.json").read_json()["released"]
    assert len(audit_log(str(store), "brain-tumor-mri")) == 2
    runs_after_crash = sorted(p.name for p in (store / "runs").iterdir())
    # ...and the next scheduled run does the work again, picking up the crashed run's training
    # (same data + recipe -> same run name -> resumed from its checkpoints, not trained anew)
    d5 = retrain(RetrainConfig(**cfg))
    assert d5.action in ("promoted", "rejected") and d5.record["dataset"] != rec["dataset"]
    assert len(audit_log(str(store), "brain-tumor-mri")) == 3
    assert sorted(p.name for p in (store / "runs").iterdir()) == runs_after_crash
    assert d5.record["challenger"]["run"].rsplit("/", 1)[-1] in runs_after_crash
    champ = (root / "champion.json").read_json()
    assert champ["model"] == (d5.record["challenger"]["model"] if d5.action == "promoted"
                              else champ1["model"])
    # the champion's report on the frozen test set from decision 3 stands (same weights, same
    # shards, same settings): not scored again; other settings would score it again
    assert d5.record["champion"]["report"] == rec["champion"]["report"]
    assert d5.record["champion"]["test"] == rec["champion"]["test"]
    assert (open_location(rec["champion"]["report"]) / "metrics.json").read_json()["created_at"] == created
    same = EvaluateConfig(model=champ1["model"], data=champ1["frozen_test"], out=str(store), split="test",
                          batch_size=RetrainConfig().batch_size)
    assert earlier_report(same).report_uri == rec["champion"]["report"]
    assert earlier_report(replace(same, batch_size=same.batch_size + 1)) is None
    assert earlier_report(replace(same, split="val")) is None  # never scored on that split


def test_a_running_retrain_keeps_the_next_one_out(tmp_path):
    store = tmp_path / "store"
    incoming = real_subset(tmp_path / "incoming", per_class=2)
    root = state_root(open_location(str(store)), "brain-tumor-mri")
    holder = Lease(root / "lock.json", ttl_s=600, purpose="another retrain").acquire()
    d = retrain(RetrainConfig(store=str(store), incoming=str(incoming)))
    assert d.action == "locked" and "another retrain" in d.reason
    assert not (store / "datasets").exists()  # it left without ingesting anything
    assert root.exists() and (root / "lock.json").read_json()["holder"] == holder.id
    holder.release()


def test_a_retrain_that_loses_its_lease_stops_and_writes_nothing(tmp_path):
    # the heartbeat interrupts like a SIGINT: Python's own handler (a Ray Train fit earlier in
    # this process may have left its graceful-abort handler installed, which aborts a fit)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _lose_the_lease(tmp_path)
    finally:
        signal.signal(signal.SIGINT, old)


def _lose_the_lease(tmp_path):
    """Its lease taken over (as after a pause longer than the ttl), the heartbeat stops the
    run mid-stage; the new holder's claim fences out every later write."""
    store = tmp_path / "store"
    incoming = real_subset(tmp_path / "incoming", per_class=6)
    root = state_root(open_location(str(store)), "brain-tumor-mri")

    def stolen(stage):
        if stage == "ingested":
            lock = root / "lock.json"
            for _ in range(200):  # a heartbeat may renew between the read and the swap: retry,
                held, tag = read_tagged(lock)  # as a real taker's compare-and-swap would
                if write_if(lock, held.replace(b'"generation": 1', b'"generation": 2'), tag):
                    break
            else:
                pytest.fail("the lease could not be taken over in 200 tries")
            # the "training", in short steps: interrupt_main lands between Python steps, not
            # inside one blocking call, and the heartbeat stops it within ttl/4
            for _ in range(300):
                time.sleep(0.1)

    cfg = RetrainConfig(store=str(store), incoming=str(incoming), lock_ttl_min=0.01)
    with pytest.raises(LockHeld, match="lost the lease .* while working"):
        retrain(cfg, hooks=stolen)
    assert (root / "champion.json").read_json() == {"fence": 1}  # no champion was written
    assert not (root / "audit").exists() and (root / "seen.json").read_json() == {"fence": 1}
    assert b'"generation": 2' in read_tagged(root / "lock.json")[0]  # the thief's lease kept


def test_an_s3_incoming_prefix_is_fingerprinted_by_its_keys_alone(tmp_path, s3_bucket, monkeypatch):
    """The listing's hash names object keys relative to the prefix, by the string: where the
    process's working directory is gone (a job's working-dir copy on a node), relpath on an
    S3 key ('bucket/key' is not absolute) failed with a bare [Errno 2]."""
    from brainmri.data.walk import walk_location
    from brainmri.ops.retrain import fingerprint

    inc = open_location(f"s3://{s3_bucket}/incoming")
    (inc / "glioma" / "a.jpg").write_bytes(b"x")
    (inc / "notumor" / "b.jpg").write_bytes(b"yy")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    digest, n = fingerprint(inc)
    assert n == 2 and len(digest) == 64
    assert sorted(r.path for r in walk_location(inc, ["glioma", "notumor"])) == ["glioma/a.jpg", "notumor/b.jpg"]
