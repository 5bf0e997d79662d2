"""The benchmark scripts' own building blocks (the scripts themselves print figures)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from brainmri.config import IngestConfig
from brainmri.data.ingest import ingest
from brainmri.data.transforms import preprocess

from support.data import REPO, real_subset


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_reexports_the_test_split_at_other_sizes_and_contrasts(tmp_path):
    q = load("quality")
    src = real_subset(tmp_path / "src", per_class=8)
    ingest(str(src), str(tmp_path / "lake"), IngestConfig(val_fraction=0.25, test_fraction=0.25, workers=1))
    version, copies = q.build_shifted(str(tmp_path / "lake"), "brain-tumor-mri", seed=0)
    n_test = json.loads((tmp_path / "lake" / "datasets" / "brain-tumor-mri" / version.rsplit("/", 1)[-1]
                         / "manifest.json").read_text())["rows"]["test"]
    for side in q.SIDES:
        files = sorted((tmp_path / "lake").glob(f"benchmarks/shifted/*/export-{side}/*/*.jpg"))
        assert len(files) == n_test > 0
        im = Image.open(files[0])
        assert max(im.size) == side and im.format == "JPEG"
    # a re-export is the same scan, not the same bytes: the model's input moves, but not far
    data = next(iter(sorted(src.rglob("*.jpg")))).read_bytes()
    shifted = q.reexport(data, 224, np.random.default_rng(1))
    a, b = preprocess(data, 160).astype(float), preprocess(shifted, 160).astype(float)
    assert shifted != data and 0 < np.abs(a - b).mean() < 40
    assert q.build_shifted(str(tmp_path / "lake"), "brain-tumor-mri")[1] == copies  # built once


def test_quality_goal_lines_judge_the_test_split_and_the_worst_re_export():
    q = load("quality")
    row = dict(model="recipe", accuracy=0.99, recall_glioma=0.995)
    lines = q.goal_lines([{**row, "data": "test"}, {**row, "data": "export-224", "accuracy": 0.985},
                          {**row, "data": "export-512", "accuracy": 0.975}])
    assert [ln.split()[0] for ln in lines] == ["PASS", "PASS", "MISS"]  # 0.99 - 0.975 > 0.01
    assert "0.0150" in lines[2] and "interval" not in lines[0]
    test = {**row, "data": "test", "accuracy_interval": [0.98, 0.995]}
    assert q.goal_lines([test, {**row, "data": "export-224"}])[0].endswith("(95% interval 0.9800-0.9950)")
    # the printed table takes rows as evaluate() makes them, intervals included
    full = {**test, "macro_f1": 0.98, "accuracy_no_dup": 0.97, "recall_glioma_interval": [0.97, 1.0],
            "train_minutes": 16.4, "images_per_s": 177.0}
    head, line = q.table_lines([full])
    assert head.split() == ["model", "data", "accuracy", "macro_f1", "rec_glioma", "acc_no_dup", "train",
                            "min", "img/s"]
    assert line.split() == ["recipe", "test", "0.9900", "0.9800", "0.9950", "0.9700", "16.4", "177"]


def test_quality_reads_the_decision_rule_each_model_applies(tmp_path):
    from brainmri.core.storage import open_location

    q = load("quality")
    meta = open_location(str(tmp_path)) / "metadata.json"
    kept = {"after": {"bias": 1.25}, "fitted": {"bias": 1.25}, "held_out": {"accuracy_change": 0.002}}
    refused = {"after": {"bias": 0.0}, "fitted": {"bias": 1.6}, "held_out": {"accuracy_change": -0.0036}}
    old = {"after": {"bias": 1.6}}  # published before the half-split check
    for inference, want in [({"logit_bias": [1.25, 0, 0, 0], "decision": kept}, (1.25, 1.25, 0.002)),
                            ({"logit_bias": None, "decision": refused}, (0.0, 1.6, -0.0036)),
                            ({"logit_bias": [1.6, 0, 0, 0], "decision": old}, (1.6, 1.6, None)),
                            ({}, (0.0, None, None))]:  # argmax
        meta.write_json({"inference": {"tta": True, **inference}})
        got = q.decision(meta)
        assert want == (got["decision_bias"], got["decision_bias_fitted"],
                        got["decision_held_out_accuracy_change"])


def test_quality_ensembles_the_recipe_seeds_and_counts_all_their_training(tmp_path, monkeypatch):
    """The ensemble row: one recipe model per seed (here fitted in-process instead of trained),
    published as one, the members' minutes summed."""
    from brainmri.models.checkpoints import load_model_state

    from support.tiny import small_lake, train_inprocess

    q = load("quality")
    lake, version_uri = small_lake(tmp_path, per_class=8)
    uris = {s: train_inprocess(lake, version_uri, steps=10, seed=s) for s in (3, 4)}
    trained = []

    def fake_train(store, dataset, recipe, model, budget, seed, reuse, log):
        trained.append((model, seed, budget))
        return {"model_uri": uris[seed], "train_minutes": 2.0 + seed, "images_per_s": 100.0 * seed,
                "epochs": 3, "best_val_macro_f1": 0.5}

    monkeypatch.setattr(q, "train", fake_train)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("decision_rule: argmax\n")
    t = q.ensemble(str(lake), "brain-tumor-mri", str(recipe), 25.0, [3, 4], False, tmp_path / "q.log")
    assert trained == [("recipe", 3, 25.0), ("recipe", 4, 25.0)]
    assert t["train_minutes"] == 11.0 and t["epochs"] == 6 and t["members"] == [uris[3], uris[4]]
    assert t["images_per_s"] == pytest.approx((300 * 5 + 400 * 6) / 11)  # all images / all seconds
    state = load_model_state(t["model_uri"])
    assert state["config"]["model"] == "ensemble" and state["inference"]["decision"] is None
    assert [m["uri"].rsplit("/", 2)[-2] for m in state["ensemble"]["members"]] == \
        [u.rstrip("/").rsplit("/", 1)[-1] for u in (uris[3], uris[4])]
    assert t["decision_bias"] == 0.0 and t["best_val_macro_f1"] == state["best"]


def test_quality_counts_the_teachers_training_behind_a_distilled_model(tmp_path):
    q = load("quality")

    def version(name: str, seconds: list[float], **extra) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "metadata.json").write_text(json.dumps(
            {"history": [{"epoch": i, "epoch_seconds": s} for i, s in enumerate(seconds)], **extra}))
        return str(d / "model.pt")

    one, two = version("m1", [60.0, 60.0]), version("m2", [90.0, 30.0, 60.0])
    ens = version("ens", [], ensemble={"members": [{"uri": one}, {"uri": two}]})
    assert q.teacher_minutes({"distillation": {"uri": ens}}) == pytest.approx(5.0)  # the members' sum
    assert q.teacher_minutes({"distillation": {"uri": one}}) == pytest.approx(2.0)
    assert q.teacher_minutes({}) is None
    assert q.teacher_minutes({"distillation": {"uri": str(tmp_path / "gone" / "model.pt")}}) is None


@pytest.mark.slow
def test_chaos_short(tmp_path):
    """The chaos benchmark's short version: one killed-and-rerun ingest, training and
    retrain, every store invariant checked after each (the full run is in its docstring)."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "chaos.py"), "--trials", "3",
                        "--seed", "7", "--per-class", "12", "--work", str(tmp_path / "chaos")],
                       capture_output=True, text=True, timeout=1500, check=False,
                       env=dict(os.environ, RAY_ADDRESS=""))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["trials"] == 3 and summary["failures"] == 0
    assert set(summary["tamper_detected"]) == {"image_bytes", "label_column", "test_shard_as_train",
                                               "truncated", "missing", "model_weights"}


def test_dedup_benchmark_holds_the_index_to_the_scan():
    d = load("dedup")
    args = argparse.Namespace(scan_max=10000, distance=12, swaps=4)
    rows = d.bench_kind("uniform", [2000, 10000], args, None)  # asserts equal pair sets itself
    assert [r["scan"] for r in rows] == ["measured", "measured"]
    assert rows[-1]["tables"] > 0 and rows[-1]["compared"] < 0.2 * rows[-1]["all_pairs"]
    assert rows[-1]["pairs"] >= 400  # the 500 planted copies, most of them within 12 bits
    flips = d.random_flips(np.random.default_rng(0), np.array([0, 1, 12, 64]))
    assert np.bitwise_count(flips).tolist() == [0, 1, 12, 64]


def test_scale_benchmark_checks_a_tiny_corpus(tmp_path):
    """scale.py end to end at two tiny sizes, local and to the loopback S3 server: every
    planted bad file, exact and near copy accounted for, and the JSON's fields (the 10k..1M
    sizes stay out of CI)."""
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), "--sizes", "300,900",
                        "--workers", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "  FAIL  " not in r.stdout and r.stdout.count("  PASS  ") == 4 * 5 and "ALL PASS" in r.stdout
    res = json.loads(out.read_text())
    assert res["checks_passed"] and res["sizes"] == [300, 900]
    assert [(x["n"], x["route"]) for x in res["runs"]] == [
        (300, "local->local"), (300, "local->s3"), (900, "local->local"), (900, "local->s3")]
    run = res["runs"][-2]
    assert run["files"]["seen"] == 900 and run["peak_tree_pss"] > 0
    assert {"walk", "inspect", "group", "write", "other"} <= set(run["phases"])
    assert run["dedup"]["allpairs"] == "measured" and run["dedup"]["pairs"] >= 9  # the planted near copies
    assert run["dedup"]["hashes_joined"] == 2 * run["dedup"]["n"]  # with the mirrors' hashes, as ingest
    assert set(res["ratio"]) == {"local local->local", "local local->s3", "local local->local cpu",
                                 "local local->s3 cpu"}
    model = res["model"]["local"]
    assert model["target"] == 10_000_000 and model["nodes"] == 16 and model["cluster_s"] > 0
    assert model["memory_fit"]["terms"] == ["1", "n"]
    assert model["fits"]["near-dup index"]["terms"] == ["1", "n^1.5"]
    assert res["corpora"]["900"]["bad"] == 4 and res["corpora"]["900"]["near"] == 9


def test_train_benchmark_feed_default_and_trainer_sections_at_tiny_size(tmp_path):
    """benchmarks/train.py's feed (streamed vs cached, feed rate per CPU, CPUs per GPU), default
    (`brainmri train`'s default vs a plain loop) and trainer (1-worker TorchTrainer vs the same
    loop without Ray) sections on a few dozen scans."""
    src = real_subset(tmp_path / "src", per_class=10)
    ingest(str(src), str(tmp_path / "lake"), IngestConfig(val_fraction=0.2, test_fraction=0.1, workers=1))
    args = ["--lake", str(tmp_path / "lake"), "--only", "feed", "default", "trainer", "layout", "distill",
            "--limit", "16", "--members", "2",
            "--limit-val", "4", "--batch", "4", "--epochs", "2", "--size", "64", "--rounds", "1"]
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), *args], capture_output=True,
                       text=True, timeout=600, check=False, env=dict(os.environ, RAY_ADDRESS=""))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "ratio streamed/cached = " in out and "img/s per CPU" in out
    # the GPU's rate comes from the committed benchmarks/results/gpu-*.json (whichever they say)
    rate = load("train").gpu_rates()[("brainnet", 160)][0]
    assert f"brainnet 160px trains at {rate:.0f} img/s" in out and "CPUs of pixel-shard feed per GPU" in out
    assert "pixel shards (data.pixels), built once: " in out
    assert "[default]" in out and "ratio Ray/plain = " in out
    # trainer: one round, the Ray run between two plain runs, 2 timed epochs each (4 batches of
    # 4), every epoch's rate printed, the overhead the median of the rounds' bracketed ones
    assert "TorchTrainer 1 worker" in out and "Ray overhead" in out and "the median of the rounds'" in out
    per_epoch = out.split("[trainer]   per epoch, plain: ")[1].splitlines()[0]
    plain_rates, trainer_rates = per_epoch.split("; TorchTrainer: ")
    assert len(plain_rates.split()) == 4 and len(trainer_rates.split()) == 2
    assert "[data]" not in out and "[models]" not in out
    assert "[layout] " in out and "channels-last" in out
    assert "taught by an ensemble of 2 of it" in out and "of a step)" in out


def test_sweep_pack_holds_train_and_val_only_and_a_trial_trains_from_it(tmp_path):
    """The GPU sweep's pack: the dataset version's train and val rows (never test), each image
    the recipe's preprocessing within JPEG error; a trial trains from it with the project's
    own loop and reports its best validation epoch; seeds of a trial are averaged."""
    s = load("sweep")
    src = real_subset(tmp_path / "src", per_class=6)
    ingest(str(src), str(tmp_path / "lake"), IngestConfig(val_fraction=0.25, test_fraction=0.25, workers=1))
    meta = s.pack(str(tmp_path / "lake"), "brain-tumor-mri", 64, str(tmp_path / "pack.npz"))
    manifest = json.loads(next((tmp_path / "lake").glob("datasets/*/*/manifest.json")).read_text())
    assert meta["rows"] == {k: manifest["rows"][k] for k in ("train", "val")} and manifest["rows"]["test"] > 0
    assert not list(tmp_path.glob("pack.npz.tmp*"))  # written atomically
    meta2, splits = s.unpack(str(tmp_path / "pack.npz"))
    assert meta2 == meta and splits["train"][0].shape == (meta["rows"]["train"], 64, 64)
    # the first train row is a training image, preprocessed as training would
    first = sorted(p for p in src.rglob("*.jpg"))
    want = [preprocess(p.read_bytes(), 64).astype(float) for p in first]
    got = splits["train"][0][0].astype(float)
    assert min(np.abs(w - got).mean() for w in want) < 3.0
    assert set(splits["val"][1].tolist()) <= {0, 1, 2, 3}

    s._init(str(tmp_path / "pack.npz"), "cpu", 1)
    base = {"model": "brainnet", "model_args": {"width": 8, "depth": [1]}, "image_size": 64,
            "epochs": 2, "batch_size": 4, "num_workers": 2, "patience": 0, "ema_decay": 0.9, "mix_prob": 0.5}
    r = s.run_trial({"trial": "t000", "params": {}, "config": {**base, "seed": 0}, "limit_train": 0})
    assert r["epochs_run"] == 2 and r["best"]["epoch"] in (0, 1) and 0 <= r["best"]["val_macro_f1"] <= 1
    assert r["config"]["ema_decay"] == 0.9 and r["config"]["image_size"] == 64
    r2 = {**r, "seed": 1, "best": {**r["best"], "val_macro_f1": r["best"]["val_macro_f1"] + 0.1}}
    other = {**r, "trial": "t001", "best": {**r["best"], "val_macro_f1": r["best"]["val_macro_f1"] + 0.06}}
    rows = s.summarise([r, r2, other])
    assert [x["trial"] for x in rows] == ["t001", "t000"]  # t000's mean is +0.05, t001's +0.06
    assert rows[1]["seeds"] == 2 and abs(rows[1]["spread"] - 0.1) < 1e-9


def _report(folder, truth: list[str], predicted: list[str], complete: bool = True):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    pq.write_table(pa.table({"path": [f"img{i}.jpg" for i in range(len(truth))], "true_label": truth,
                             "predicted_label": predicted}), folder / "predictions.parquet")
    if complete:
        (folder / "complete.json").write_text(json.dumps({"complete": True}))
    return str(folder)


def test_hard_images_counts_the_misses_models_share_and_what_a_goal_needs(tmp_path, capsys):
    h = load("hard_images")
    truth = ["glioma"] * 5 + ["meningioma"] * 5
    a = _report(tmp_path / "a", truth, ["meningioma", "meningioma"] + ["glioma"] * 3 + ["meningioma"] * 5)
    b = _report(tmp_path / "b", truth, ["meningioma"] + ["glioma"] * 4 + ["glioma"] + ["meningioma"] * 4)
    c = _report(tmp_path / "c", truth, ["pituitary"] + ["glioma"] * 4 + ["glioma"] + ["meningioma"] * 4)
    o = h.overlap([h.read_report(u) for u in (a, b, c)], goal=0.9)
    assert o["errors_per_model"] == [2, 2, 2]
    assert o["missed_by_at_least"] == {1: 3, 2: 2, 3: 1}  # img0 by all, img5 by two, img1 by one
    assert o["missed_by_majority"] == 2 and o["majority_missed_by_class"] == {"glioma": 1, "meningioma": 1}
    assert o["goal_allows_errors"] == 1 and o["goal_needs_majority_missed_right"] == 1
    assert h.main([a, b, c, "--goal", "0.9"]) == 0
    assert "must get right at least 1 of the 2" in capsys.readouterr().out
    # other labels, or a report a crash left without complete.json: one line, exit 2
    d = _report(tmp_path / "d", ["notumor"] + truth[1:], truth)
    e = _report(tmp_path / "e", truth, truth, complete=False)
    for bad, why in ((d, "same images with the same labels"), (e, "not a complete evaluation report")):
        assert h.main([a, bad]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1
    assert h.main([a]) == 2
    assert h.main([a, b, "--goal", "98.5"]) == 2 and "--goal is an accuracy" in capsys.readouterr().err
