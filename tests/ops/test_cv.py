"""`brainmri cv`: grouped, class-balanced folds; fold versions written and verified like any
version; a real 2-fold estimate on local Ray."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest

from brainmri.config import ConfigError, CvConfig
from brainmri.core.storage import open_location
from brainmri.data.datasets import load_manifest, split_files, verify_shards
from brainmri.ops.cv import assign_folds, fold_splits, group_classes, run_cv, write_folds

from support.tiny import small_lake


def synthetic(n_groups: int = 120):
    """Groups of 1-3 rows over 4 classes, a few groups mixing two labels."""
    groups, labels = [], []
    for g in range(n_groups):
        for r in range(1 + g % 3):
            groups.append(f"g{g:03d}")
            labels.append((g + (r if g % 17 == 0 else 0)) % 4)
    return groups, labels


def test_folds_take_whole_groups_and_balance_every_class():
    groups, labels = synthetic()
    fold_of = assign_folds(groups, labels, 5, seed=0)
    assert fold_of == assign_folds(groups, labels, 5, seed=0) != assign_folds(groups, labels, 5, seed=1)
    assert set(fold_of) == set(groups) and set(fold_of.values()) == set(range(5))
    sizes, classes_of = group_classes(groups, labels)
    for y in range(4):  # each class spread evenly: folds differ by at most one largest group
        per_fold = Counter()
        for g, f in fold_of.items():
            if classes_of[g] == y:
                per_fold[f] += sizes[g]
        assert max(per_fold.values()) - min(per_fold.values()) <= 3, (y, per_fold)
    plan = fold_splits(fold_of, sizes, classes_of, 2, val_share=0.2, seed=0)
    assert set(plan) == set(fold_of)
    assert {g for g, s in plan.items() if s == "test"} == {g for g, f in fold_of.items() if f == 2}
    val = sum(sizes[g] for g, s in plan.items() if s == "val")
    rest = sum(sizes[g] for g, s in plan.items() if s != "test")
    assert 0.15 <= val / rest <= 0.3


def test_fold_versions_hold_every_row_once_and_verify(tmp_path):
    lake, uri = small_lake(tmp_path, per_class=10)
    version = open_location(uri)
    man = load_manifest(version)
    store = open_location(str(tmp_path / "cvstore"))
    folds = write_folds(version, man, store, 3, seed=4)

    def rows(v, split, col="sha256"):
        m = load_manifest(v)
        return [x for p in split_files(v, m, split) for x in pq.read_table(v.fs.open_input_file(p),
                                                                              columns=[col]).column(col).to_pylist()]

    pool = sorted(rows(version, "train") + rows(version, "val"))
    held = []
    for f in folds:
        m = load_manifest(f)
        verify_shards(f, m)  # written like an ingest: every shard's size and sha256 recorded
        assert m["derived_from"]["version"] == man["version"] and m["rows"]["test"] > 0
        assert sorted(rows(f, "train") + rows(f, "val") + rows(f, "test")) == pool  # all, once
        by_split = {s: set(rows(f, s, "group")) for s in ("train", "val", "test")}
        assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                    or by_split["val"] & by_split["test"])  # no group straddles two splits
        assert sum(m["counts"]["test"].values()) == m["rows"]["test"]
        held += rows(f, "test")
    assert sorted(held) == pool  # each row held out exactly once
    assert not set(held) & set(rows(version, "test"))  # the version's test split takes no part
    before = [load_manifest(f)["created_unix"] for f in folds]
    assert [load_manifest(f)["created_unix"] for f in write_folds(version, man, store, 3, seed=4)] == before


def test_bad_settings_fail_before_any_work():
    with pytest.raises(ConfigError, match="folds must be 2..20"):
        CvConfig(folds=1).validate()
    with pytest.raises(ConfigError, match="train.epoch"):
        CvConfig(train={"epoch": 3}).validate()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_two_fold_estimate_on_local_ray(tmp_path, ray_local, mlflow_server):
    from mlflow.tracking import MlflowClient

    from brainmri.core.tracking import Tracking

    lake, uri = small_lake(tmp_path, per_class=10)
    cfg = CvConfig(data=uri, out=str(tmp_path / "out"), folds=2, seed=0, name="tiny",
                   train={"epochs": 1, "image_size": 64, "batch_size": 8, "num_workers": 1,
                          "model_args": {"width": 8}, "warmup_epochs": 0})
    res = run_cv(cfg, Tracking(mlflow_server, "cv-test"))
    assert res.uri == open_location(str(tmp_path / "out" / "cv" / "tiny")).uri
    assert [f["fold"] for f in res.folds] == [0, 1]
    for f in res.folds:
        assert "/cv/tiny/models/" in f["model"] and 0.0 <= f["metrics"]["accuracy"] <= 1.0
        assert f["metrics"]["n"] > 0
    s = res.summary["macro_f1"]
    vals = [f["metrics"]["macro_f1"] for f in res.folds]
    assert s["mean"] == pytest.approx(sum(vals) / 2) and s["min"] == min(vals)
    assert "recall_glioma" in res.summary
    out = open_location(res.uri)
    assert (out / "cv.json").read_json()["summary"] == res.summary
    assert "mean +- sd" in (out / "cv.md").read_bytes().decode()
    assert (open_location(uri) / "cv" / "tiny.json").exists()  # beside the dataset version
    assert not (tmp_path / "out" / "models").exists()  # fold models never enter the registry
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("cv-test").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.metrics["cv_macro_f1_mean"] == pytest.approx(s["mean"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "cv")} == {"cv/cv.json", "cv/cv.md"}
    again = run_cv(cfg)  # finished folds are read back, not retrained
    assert again.summary == res.summary and again.seconds < res.seconds


def test_a_fold_trains_the_recipe_with_the_overrides_by_the_configs_own_merge(tmp_path):
    """--train model_args.width=48 changes the width of the recipe's network, not the rest of
    its shape; --train model=resnet18 starts from resnet18's own shape, not brainnet's (the
    merge that retrain's challenger uses: config.with_overrides)."""
    from brainmri.config import TrainConfig, load_config
    from brainmri.ops.cv import fold_config
    from support.data import REPO

    store, fold = open_location(str(tmp_path / "cv")), open_location(str(tmp_path / "fold"))
    recipe = str(REPO / "configs" / "cpu.yaml")  # its network's whole shape, spelled out
    shape = load_config(TrainConfig, recipe).model_args
    assert shape["width"] != 48 and shape["depth"]  # the override changes something
    wider = fold_config(CvConfig(recipe=recipe, train={"model_args": {"width": 48}}), fold, store, "f0")
    assert wider.model_args == {**shape, "width": 48} and wider.data == fold.uri and wider.publish
    other = fold_config(CvConfig(recipe=recipe, train={"model": "resnet18"}), fold, store, "f0")
    assert other.model == "resnet18" and other.model_args == {}
