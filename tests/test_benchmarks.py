"""The benchmark scripts' own building blocks (the scripts themselves print figures), and the
harness they share. The scripts are the package `benchmarks`, imported and run (`python -m
benchmarks.<name>`) from the repository root, where `python -m pytest` runs (.ci/run)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import harness
from brainmri.config import CLASSES, IngestConfig, TrainConfig
from brainmri.data.ingest import ingest
from brainmri.data.transforms import preprocess

from support.data import REPO, real_subset

SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py")
                 if p.stem not in ("__init__", "harness"))


def load(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def bench(name: str, *args: str, log: Path, timeout: float, env: dict | None = None) -> harness.Run:
    """`python -m benchmarks.<name> <args>` from the repository root, through the harness."""
    return harness.run([sys.executable, "-m", f"benchmarks.{name}", *args], log, timeout=timeout, env=env)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- the harness -------------------------------------------------------------------------------
# a shell that starts a grandchild (sleep), prints its pid, then waits for it or exits 3
WAITS = ["sh", "-c", "sleep 60 & echo $!; wait"]
LEAVES = ["sh", "-c", "sleep 60 & echo $!; exit 3"]


def test_run_kills_the_whole_process_group_at_its_timeout(tmp_path):
    r = harness.run(WAITS, tmp_path / "a.log", timeout=3)
    sleeper = int(r.output().split()[0])
    try:
        assert r.returncode is None and not r.ok and 3 <= r.seconds < 30
        assert not alive(sleeper)  # the grandchild too, not only the shell
        assert "killed at its timeout" in r.describe()
        with pytest.raises(harness.RunFailed, match="killed at its timeout"):
            r.check()
    finally:
        if alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def test_run_leaves_nothing_behind_and_reports_a_failure_with_its_log(tmp_path):
    r = harness.run(LEAVES, tmp_path / "b.log")
    sleeper = int(r.output().split()[0])
    try:
        assert r.returncode == 3 and not alive(sleeper)  # the orphan went with the command
        with pytest.raises(harness.RunFailed, match=f"exit 3 after .*\\n{sleeper}"):
            r.check()
    finally:
        if alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def test_ctrl_c_during_a_run_kills_its_process_group(tmp_path):
    """SIGINT to the process waiting in harness.run (a Ctrl-C): the command's group, which
    the terminal's SIGINT does not reach (a session of its own), is killed before it exits."""
    log = tmp_path / "c.log"
    # as a shell starts it: SIGINT deliverable and Python's handler in place, whatever this
    # test process inherited or was left with (a child keeps blocked and ignored signals)
    code = ("import signal, sys; signal.pthread_sigmask(signal.SIG_SETMASK, []); "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"from benchmarks.harness import run; run({WAITS!r}, sys.argv[1])")
    driver = subprocess.Popen([sys.executable, "-c", code, str(log)], cwd=REPO)
    sleeper = None
    try:
        deadline = time.monotonic() + 60
        while sleeper is None and time.monotonic() < deadline:
            time.sleep(0.1)
            text = log.read_text() if log.exists() else ""
            sleeper = int(text.split()[0]) if text.endswith("\n") else None
        assert sleeper is not None and alive(sleeper)
        driver.send_signal(signal.SIGINT)
        try:
            rc = driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sig = [ln for ln in open(f"/proc/{driver.pid}/status") if ln.startswith("Sig")]
            pytest.fail(f"the driver did not end within 60 s of SIGINT; its signals: {sig}")
        assert rc != 0
        assert not alive(sleeper)
    finally:
        driver.kill()
        if sleeper and alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def test_child_result_reads_the_last_result_line_of_its_own_run(tmp_path):
    log = tmp_path / "phases.log"
    code = "import sys; from benchmarks.harness import print_result; print('noise'); print_result({'n': %d})"
    assert harness.child_result([sys.executable, "-c", code % 1], log) == {"n": 1}
    assert harness.child_result([sys.executable, "-c", code % 2], log, append=True) == {"n": 2}
    with pytest.raises(harness.RunFailed, match="printed no RESULT line"):  # the earlier ones not its own
        harness.child_result(["sh", "-c", "echo noise"], log, append=True)
    assert log.read_text().count("RESULT") == 2 and log.read_text().count("noise") == 3


def test_data_root_is_the_shared_folder_unless_the_environment_names_another(tmp_path, monkeypatch):
    monkeypatch.delenv(harness.DATA_ENV, raising=False)
    assert harness.data_root() == REPO.parent / "shared" / "data" / "brain-tumor-mri"
    monkeypatch.setenv(harness.DATA_ENV, str(tmp_path))
    assert harness.data_root() == tmp_path
    for c in CLASSES:
        (tmp_path / "Training" / c).mkdir(parents=True)
    assert harness.training_folder() == tmp_path / "Training"
    assert harness.training_folder(tmp_path / "Training") == tmp_path / "Training"  # the classes' parent
    # a script run as a module reads it: here a folder without scans, refused in one line
    elsewhere = tmp_path / "elsewhere"
    r = bench("chaos", "--work", str(tmp_path / "work"), log=tmp_path / "chaos.log", timeout=120,
              env={**os.environ, harness.DATA_ENV: str(elsewhere)})
    assert r.returncode == 2 and f"under {elsewhere} or" in r.output(), r.describe()


def test_training_folder_exits_with_one_line_when_the_class_folders_are_missing(tmp_path, capsys):
    (tmp_path / "Training" / "glioma").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        harness.training_folder(tmp_path)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and harness.DATA_ENV in err


def test_scans_reads_each_class_folder_in_name_order(tmp_path):
    counts = {c: 5 + i for i, c in enumerate(CLASSES)}
    for c, n in counts.items():
        (tmp_path / "Training" / c).mkdir(parents=True)
        for k in reversed(range(n)):
            (tmp_path / "Training" / c / f"{c}-{k:02d}.jpg").write_bytes(f"{c} {k}".encode())
    (tmp_path / "Training" / "glioma" / ".DS_Store").write_bytes(b"")
    (tmp_path / "Training" / "glioma" / "nested").mkdir()
    (tmp_path / "Training" / "other").mkdir()  # not a class: not read

    got = harness.scans(root=tmp_path)
    assert list(got) == list(CLASSES) and {c: len(f) for c, f in got.items()} == counts
    assert [f.name for f in harness.scans(2, offset=1, root=tmp_path)["notumor"]] == \
        ["notumor-01.jpg", "notumor-02.jpg"]
    assert {c: len(f) for c, f in harness.scans(every=2, root=tmp_path).items()} == \
        {c: (n + 1) // 2 for c, n in counts.items()}
    assert [f.name for f in harness.scans(2, offset=1, every=2, root=tmp_path)["glioma"]] == \
        ["glioma-01.jpg", "glioma-03.jpg"]
    data, labels = harness.read_scans(2, offset=3, root=tmp_path)
    assert labels == [0, 0, 1, 1, 2, 2, 3, 3] and data[:2] == [b"glioma 3", b"glioma 4"]
    copies = harness.copy_scans(tmp_path / "copy", 3, root=tmp_path / "Training")
    assert len(copies) == 12 and all(len(list((tmp_path / "copy" / c).iterdir())) == 3 for c in CLASSES)
    assert copies[0].read_bytes() == b"glioma 0"


def test_published_small_model_records_the_whole_shape_of_its_network(tmp_path):
    """What export and serve benchmark: random weights of the config's network, published
    (exports included) so that predict's loader rebuilds and verifies it."""
    from brainmri.evaluation.inference import load_network, open_model

    cfg = TrainConfig(image_size=64, model_args={"width": 8})
    ref = open_model(harness.publish_small_model(tmp_path, cfg))
    assert ref.image_size == 64 and ref.state["config"]["model_args"] == cfg.shape() != cfg.model_args
    assert ref.state["dataset"]["name"] == "none" and cfg.model_args == {"width": 8}  # cfg left as it was
    load_network(*ref.runtime_file("onnx"), runtime="onnx")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_as_a_module_of_the_package(name):
    assert callable(load(name).main)


# -- the scripts -------------------------------------------------------------------------------


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
    retrain, every store invariant checked after each (the full run is in its docstring).
    The training's kill delay is scaled by a given duration (an uninterrupted run took 62 s
    in a full suite) instead of a reference training run."""
    r = bench("chaos", "--trials", "3", "--seed", "7", "--per-class", "12", "--work", str(tmp_path / "chaos"),
              "--train-seconds", "45", log=tmp_path / "chaos.log", timeout=1500).check()
    summary = json.loads([line for line in r.output().splitlines() if line.startswith("{")][-1])
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
    """benchmarks.scale end to end at two tiny sizes, local and to the loopback S3 server: every
    planted bad file, exact and near copy accounted for, and the JSON's fields (the 10k..1M
    sizes stay out of CI)."""
    out = tmp_path / "scale.json"
    r = bench("scale", "--sizes", "300,900", "--workers", "2", "--cache-dir", str(tmp_path / "cache"),
              "--out", str(out), log=tmp_path / "scale.log", timeout=300).check()
    assert "  FAIL  " not in r.output() and r.output().count("  PASS  ") == 4 * 5 and "ALL PASS" in r.output()
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


@pytest.mark.slow  # its own Ray and one TorchTrainer run: a minute or two on 2 cores
def test_gpu_path_benchmark_runs_on_cpu_and_says_how_the_path_compares(tmp_path):
    """benchmarks.gpu_path, the device measurement prepared on CPU: generated scans (all kept
    by ingest), the resident step, `brainmri train` streaming pixel shards, the ratio."""
    out_json = tmp_path / "path.json"
    r = bench("gpu_path", "--device", "cpu", "--synthetic", "64", "--model", "brainnet", "--size", "64",
              "--batch-size", "8", "--epochs", "2", "--steps", "2", "--work", str(tmp_path / "w"),
              "--json", str(out_json), log=tmp_path / "path.log", timeout=900).check()
    d = json.loads(out_json.read_text())
    assert d["device"] == "cpu" and d["published"] is None and d["train_rows"] >= 40
    assert [e["epoch"] for e in d["epochs"]] == [0, 1] and d["path_images_per_s"] > 0
    assert d["path_over_resident"] == pytest.approx(d["path_images_per_s"] / d["resident_images_per_s"])
    assert "x the step on resident data; no published rate on record for this device" in r.output()
    from benchmarks.gpu_path import PUBLISHED
    assert set(PUBLISHED) == {"H200", "A100"}


def test_feed_rounds_alternate_the_modes_and_pair_each_round(tmp_path, monkeypatch):
    """benchmarks.train.bench_feed with 3 rounds: cached-streamed, streamed-cached,
    cached-streamed; a run's figure is the median of its epochs after the first, a mode's the
    median of its runs, and each round's ratio pairs the round's own two runs."""
    import tempfile

    import brainmri.data.datasets
    import brainmri.data.pixels

    t = load("train")
    monkeypatch.setattr(brainmri.data.datasets, "resolve_dataset", lambda *a: ("version", "manifest"))
    monkeypatch.setattr(brainmri.data.pixels, "ensure_pixels", lambda *a: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # the later epochs of each run, in the order the runs should come
    later = {"feed-0-1": 5.0, "feed-0-0": 5.5, "feed-1-0": 6.0, "feed-1-1": 6.0,
             "feed-2-1": 7.0, "feed-2-0": 7.7}
    calls = []

    def history(lake, out, name, limit, limit_val, epochs, batch, cache, image_size):
        calls.append(name)
        assert cache is name.endswith("-1") and image_size == 64 and epochs == 3
        e = later[name]  # the first epoch (decoding in both modes) must not count
        return [{"epoch_seconds": 99.0, "train_feed_wait_seconds": 9.0}] + \
            [{"epoch_seconds": e, "train_feed_wait_seconds": e / 10}] * 2

    monkeypatch.setattr(t, "_history", history)
    res = t.bench_feed("lake", 64, 16, 4, 3, 4, rounds=3)
    assert calls == list(later)
    assert res["round_ratios"] == pytest.approx([1.1, 1.0, 1.1])
    assert res["cached"]["epoch_s"] == 6.0 and res["streamed"]["epoch_s"] == 6.0 and res["ratio"] == 1.0
    assert res["streamed"]["wait_s"] == pytest.approx(0.6)


def test_train_benchmark_needs_a_warm_pass_of_each_side(tmp_path):
    """--only data with one pass would call the cold pass warm: refused in one line before Ray
    starts."""
    r = bench("train", "--only", "data", "--data-passes", "1", log=tmp_path / "t.log", timeout=120)
    assert r.returncode == 2 and "--data-passes: at least 2" in r.output(), r.describe()


def test_train_benchmark_peer_decodes_the_feeds_files_and_refuses_a_source_without_them(tmp_path):
    """The data section's peer (ImageFolder + DataLoader) reads exactly the files of the Ray
    side's training rows, in their order, not a sample of the folder; a --source that lacks
    one of them is refused in one line."""
    t = load("train")
    src = real_subset(tmp_path / "src", per_class=3)
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*.jpg"))
    chosen = [files[5], files[0], files[9]]
    seen = []
    real_open = open

    def spy(path, *a, **kw):  # the loader opens each file it decodes (DataLoader workers: 0)
        seen.append(os.path.relpath(path, src))
        return real_open(path, *a, **kw)

    one = t.imagefolder_pass(str(src), 32, chosen, batch=2, workers=0)
    with pytest.MonkeyPatch.context() as m:
        m.setattr("builtins.open", spy)
        assert one() > 0
    assert seen == chosen
    refused = r"1 of the lake's training files are not in it \(e.g. Training/x.jpg\)"
    with pytest.raises(SystemExit, match=refused):
        t.imagefolder_pass(str(src), 32, chosen + ["Training/x.jpg"], batch=2, workers=0)


@pytest.mark.slow  # its own Ray, a TorchTrainer run and six sections: minutes on 2 cores
def test_train_benchmark_feed_default_and_trainer_sections_at_tiny_size(tmp_path):
    """benchmarks.train's data (decoding JPEGs: Ray Data vs ImageFolder + DataLoader), feed
    (streamed vs cached, feed rate per CPU, CPUs per GPU), default (`brainmri train`'s default
    vs a plain loop) and trainer (1-worker TorchTrainer vs the same loop without Ray) sections
    on a few dozen scans."""
    src = real_subset(tmp_path / "src", per_class=10)
    ingest(str(src), str(tmp_path / "lake"), IngestConfig(val_fraction=0.2, test_fraction=0.1, workers=1))
    args = ["--lake", str(tmp_path / "lake"), "--source", str(src), "--data-passes", "2",
            "--only", "data", "feed", "default", "trainer", "layout", "distill",
            "--limit", "16", "--members", "2",
            "--limit-val", "4", "--batch", "4", "--epochs", "2", "--size", "64", "--rounds", "1"]
    out = bench("train", *args, log=tmp_path / "train.log", timeout=600).check().output()
    assert "ratio streamed/cached = " in out and "img/s per CPU" in out
    # the feed section trains and builds at --size, the size its line names
    assert "pixel shards at 64 px" in out and "pixel shards at 160 px" not in out
    # the GPU's rate comes from the committed benchmarks/results/gpu-*.json (whichever they say)
    rate = load("train").gpu_rates()[("brainnet", 160)][0]
    assert f"brainnet 160px trains at {rate:.0f} img/s" in out and "CPUs of pixel-shard feed per GPU" in out
    assert "pixel shards (data.pixels), built once: " in out
    # the plain pyarrow reader of the same shard files is the feed's peer, in the same run
    peer = next(line for line in out.splitlines() if "plain reader (pyarrow" in line)
    assert "the pixel feed (Ray Data dealing the rows" in peer and "ratio feed/plain = " in peer
    assert "this process on one core" in peer
    assert "per CPU-second of the whole machine over those passes: feed " in out
    codecs = next(line for line in out.splitlines() if "[feed] compression of the pixel shards" in line)
    assert all(f"{c} " in codecs for c in ("none", "lz4", "zstd"))
    assert "[default]" in out and "ratio Ray/plain = " in out
    # trainer: one round, the Ray run between two plain runs, 2 timed epochs each (4 batches of
    # 4), every epoch's rate printed, the overhead the median of the rounds' bracketed ones
    assert "TorchTrainer 1 worker" in out and "Ray overhead" in out and "the median of the rounds'" in out
    per_epoch = out.split("[trainer]   per epoch, plain: ")[1].splitlines()[0]
    plain_rates, trainer_rates = per_epoch.split("; TorchTrainer: ")
    assert len(plain_rates.split()) == 4 and len(trainer_rates.split()) == 2
    # data: 16 scans each side, two passes each (the first cold), the wall ratio of the warm
    # ones, and the CPU an image (Ray: every process on the machine; the peer: its own)
    data = next(line for line in out.splitlines() if line.startswith("[data] decoding JPEGs, 16 images"))
    assert ", 2 passes each, " in data
    ray_rates = data.split(" CPUs ")[1].split(" img/s")[0].split(" / ")
    plain_rates = data.split("ImageFolder+DataLoader(2 workers) ")[1].split(" img/s")[0].split(" / ")
    assert len(ray_rates) == 2 and len(plain_rates) == 2
    warm = float(data.split("ratio Ray/plain = ")[1].split(" warm")[0])
    assert warm == pytest.approx(float(ray_rates[1]) / float(plain_rates[1]), rel=0.05, abs=0.01)
    cpu = next(line for line in out.splitlines() if line.startswith("[data]   CPU a warm image"))
    ray_ms = float(cpu.split("Ray (every process on the machine) ")[1].split(" ms")[0])
    plain_ms = float(cpu.split("ImageFolder+DataLoader (its own processes) ")[1].split(" ms")[0])
    # a pass of 16 scans is a few of /proc/stat's 10 ms ticks: Ray's (planning, tasks) at least one
    assert ray_ms > 0 and plain_ms > 0
    assert float(cpu.split("ratio plain/Ray = ")[1]) == pytest.approx(plain_ms / ray_ms, rel=0.01)
    assert "[models] est." not in out
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


def test_suite_cpu_counts_the_cpu_of_the_processes_a_command_starts(tmp_path):
    """benchmarks.suite_cpu on a command whose child burns ~1.5 s of CPU: the child is seen,
    its CPU counted (a floor: the last sampling interval is lost), the command's exit status
    passed on, and a process that was running before the command (this one) left out."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"
    out = tmp_path / "cpu.json"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}]); sys.exit(3)"
    r = subprocess.run([sys.executable, "-m", "benchmarks.suite_cpu", "--interval", "0.1", "--json", str(out),
                        "--", sys.executable, "-c", parent],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    d = json.loads(out.read_text())
    assert d["returncode"] == 3 and d["processes"] >= 2 and 1.2 <= d["cpu_s"] <= 1.5 + 2 * d["wall_s"]
    assert d["kinds"]["other"]["cpu_s"] >= 1.2 and d["startup_cpu_s"] >= 1.2  # young: under 6 s old
    assert "burned" in r.stdout and "other" in r.stdout
    k = load("suite_cpu").kind  # the kinds it names
    assert k("ray::RayTrainWorker.__init__") == "Ray Train run actors"
    assert k("ray::MapWorker(MapBatches(decode))") == "Ray Data and other tasks"
    assert k("/x/bin/python -m brainmri train --data lake") == "commands (brainmri, jobs/, benchmarks, ray)"
