"""Architecture search: space files, sampling, and a tiny real search on local Ray (ASHA)."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle

import pytest
import yaml

from brainmri.cli import main
from brainmri.config import ConfigError, TuneConfig
from brainmri.core.storage import open_location
from brainmri.models.checkpoints import build_model, load_model_state
from brainmri.ops import tune as tune_mod
from brainmri.ops.tune import (
    Search,
    cluster_max_gpus,
    concurrency,
    load_space,
    make_tuner,
    open_search,
    run_search,
    sample_trials,
    trial_config,
)

from support.tiny import finished_run, small_lake
from support.tracked import assert_epochs_logged, assert_model_logged, assert_no_secret, runs_of, tracked

SPACE = {
    # after the first epoch a trial's preprocessed shard is cached, so epochs are cheap: enough
    # steps (6 epochs x ~10 batches) that a learning trial separates from a stuck one
    "base": {"epochs": 6, "image_size": 64, "batch_size": 8, "warmup_epochs": 0.5, "patience": 0,
             "aug_strength": 0.3,
             # the recipe knobs this test was measured with, whatever the defaults become
             "weight_decay": 0.05, "class_weighting": True, "tta": False},
    "space": {
        "model": {
            "brainnet": {"model_args.width": [8, 12], "model_args.kernel": [3, 5]},
            # a family whose trials cannot learn at this learning rate: ASHA must stop them
            "seed_cnn": {"lr": [1e-7]},
        },
        "lr": [3e-3],
        "label_smoothing": {"uniform": [0.0, 0.1]},
    },
}


def write_space(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize("doc, message", [
    ({"space": {"learning_rate": [0.1]}}, "unknown key space.learning_rate"),
    ({"space": {"model": {"brainnet": {"widht": [8]}}}}, "unknown key space.model.brainnet.widht"),
    ({"space": {"lr": []}}, "space.lr: an empty choice"),
    ({"space": {"lr": {"choice": []}}}, "space.lr: an empty choice"),
    ({"space": {"model": {}}}, "space.model: an empty choice"),
    ({"space": {"model": ["brainnet", "resnet9000"]}}, "unknown model 'resnet9000'"),
    ({"space": {"lr": {"uniform": [0.1, 0.01]}}}, "low < high"),
    ({"space": {"lr": {"normal": [0, 1]}}}, "one of choice, uniform"),
    ({"space": {"out": ["s3://elsewhere"]}}, "cannot be searched"),
    ({"base": {"epocs": 3}, "space": {"lr": [0.1]}}, "unknown key base.epocs"),
    ({"space": {}}, "non-empty mapping"),
    ({"spaces": {"lr": [0.1]}}, "only 'base' and 'space'"),
])
def test_bad_space_fails_clearly(tmp_path, doc, message):
    with pytest.raises(ConfigError, match=message):
        load_space(write_space(tmp_path / "space.yaml", doc))


def test_bad_space_on_the_command_line_exits_2_before_ray(tmp_path, capsys):
    space = write_space(tmp_path / "s.yaml", {"space": {"lr": []}})
    assert main(["tune", "--data", str(tmp_path), "--out", str(tmp_path), "--space", space]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["brainmri tune: error: space.lr: an empty choice"]
    assert main(["tune", "--space", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_sampling_is_seeded_and_conditional(tmp_path):
    base, space = load_space(write_space(tmp_path / "s.yaml", SPACE))
    a, b = sample_trials(space, 12, seed=3), sample_trials(space, 12, seed=3)
    assert a == b and a != sample_trials(space, 12, seed=4)
    families = {p["model"] for p in a}
    assert families == {"brainnet", "seed_cnn"}
    for p in a:
        if p["model"] == "brainnet":  # family-only parameters exist only for their family
            assert p["model_args.width"] in (8, 12) and p["lr"] == 3e-3
        else:
            assert not any(k.startswith("model_args.") for k in p)
            assert p["lr"] == 1e-7  # the family's own value wins over the shared one
        assert 0.0 <= p["label_smoothing"] <= 0.1
    cfg = trial_config(base, a[0], TuneConfig(data="d", out="o", workers_per_trial=1), "run-1")
    assert cfg.epochs == SPACE["base"]["epochs"] and cfg.publish is False
    assert cfg.name == "run-1" and cfg.out == "o"


def test_concurrency_leaves_a_whole_cpu_for_data():
    # 2-core laptop: one trial; its worker gets a CPU, the other is Ray Data's (the trial's
    # driver asks for memory, not CPU: 0.99 of a CPU free would deadlock a decode task)
    assert concurrency(TuneConfig(), cpus=2) == (1, 1.0, "")
    assert concurrency(TuneConfig(workers_per_trial=2), cpus=2) == (1, 0.5, "")
    assert concurrency(TuneConfig(), cpus=16) == (8, 1.0, "")
    assert concurrency(TuneConfig(max_concurrent=2), cpus=16) == (2, 1.0, "")
    # --max-concurrent may share one CPU of data loading: 3 one-CPU hosts run 2 trials of a
    # whole CPU each (on two hosts, as their workers cannot share one), never 3
    assert concurrency(TuneConfig(max_concurrent=2), cpus=3) == (2, 1.0, "")
    assert concurrency(TuneConfig(max_concurrent=3), cpus=3) == (2, 1.0, "")
    assert concurrency(TuneConfig(max_concurrent=2, workers_per_trial=2), cpus=4) == (2, 0.75, "")
    # GPU cluster: bounded by GPUs and by 2 CPUs per GPU worker
    assert concurrency(TuneConfig(gpu=True), cpus=16, gpus=4) == (4, 2.0, "")
    assert concurrency(TuneConfig(gpu=True, workers_per_trial=2), cpus=64, gpus=8) == (4, 2.0, "")
    assert concurrency(TuneConfig(gpu=True, max_concurrent=8), cpus=16, gpus=4, max_gpus=4) == (4, 2.0, "")
    # a cluster whose autoscaler can never bring one trial's GPUs is refused before Ray Tune waits
    with pytest.raises(ConfigError,
                       match="needs 2 GPUs; the cluster has 1 and its autoscaler can bring at most 1"):
        concurrency(TuneConfig(gpu=True, workers_per_trial=2), cpus=16, gpus=1, max_gpus=1)


def test_gpu_search_on_an_autoscaling_cluster_waits_for_its_gpus():
    # GPU workers at min_workers 0: no GPU yet. --max-concurrent is trusted
    plan = concurrency(TuneConfig(gpu=True, max_concurrent=2), cpus=2, gpus=0)
    assert plan[:2] == (2, 2.0) and "has 0 GPUs now" in plan.note and "--max-concurrent" in plan.note
    # no --max-concurrent and no readable maximum: one trial at a time, and it says so
    plan = concurrency(TuneConfig(gpu=True), cpus=2, gpus=0)
    assert plan.trials == 1 and "set --max-concurrent" in plan.note and "\n" not in plan.note
    plan = concurrency(TuneConfig(gpu=True, workers_per_trial=2), cpus=16, gpus=1)
    assert plan.trials == 1 and plan.note
    # the autoscaler's maximum (its cluster config), in whole trials, at most one per sample
    plan = concurrency(TuneConfig(gpu=True, workers_per_trial=2, num_samples=8), cpus=4, gpus=0, max_gpus=6)
    assert plan.trials == 3 and "maximum of 6 GPUs" in plan.note
    assert concurrency(TuneConfig(gpu=True, num_samples=8), cpus=4, gpus=1, max_gpus=2**63 - 1).trials == 8
    with pytest.raises(ConfigError, match="at most 0"):
        concurrency(TuneConfig(gpu=True), cpus=4, gpus=0, max_gpus=0)


class _Unpickled:
    """Unpickling this creates the folder `marker`: proof of whether anything read the state."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def existing_experiment(tmp_path, files=("trials.json", "tuner.pkl", "experiment_state-2025.json")):
    """out/tune/exp/ as an earlier search left it; its tuner.pkl makes `pwned` when unpickled."""
    exp = tmp_path / "out" / "tune" / "exp"
    (exp / "runs").mkdir(parents=True)
    for name in files:
        data = (pickle.dumps(_Unpickled(tmp_path / "pwned")) if name.endswith(".pkl")
                else json.dumps({"trials": []}).encode())
        (exp / name).write_bytes(data)
    return exp


def snapshot(folder) -> dict:
    """Every path under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def no_ray(monkeypatch):
    def fail():
        raise AssertionError("Ray was started")
    monkeypatch.setattr("brainmri.core.cluster.init_ray", fail)


@pytest.mark.parametrize("files", [("trials.json",), ("tuner.pkl", "experiment_state-2025.json"),
                                   ("trials.json", "tuner.pkl", "experiment_state-2025.json")])
def test_an_existing_experiment_is_refused_without_resume(tmp_path, monkeypatch, files):
    no_ray(monkeypatch)
    exp = existing_experiment(tmp_path, files)
    space = write_space(tmp_path / "s.yaml", SPACE)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"experiment .*tune/exp already exists \(") as e:
        run_search(TuneConfig(data=str(tmp_path), out=str(tmp_path / "out"), space=space, name="exp"))
    assert all(n in str(e.value) for n in files)
    assert snapshot(tmp_path) == before and not (tmp_path / "pwned").exists()
    assert exp.is_dir()


def test_the_refusal_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    no_ray(monkeypatch)
    existing_experiment(tmp_path)
    space = write_space(tmp_path / "s.yaml", SPACE)
    before = snapshot(tmp_path)
    argv = ["tune", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--space", space,
            "--name", "exp"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    exp_uri = str(tmp_path / "out" / "tune" / "exp")
    assert err.startswith(f"brainmri tune: error: experiment {exp_uri} already exists ")
    for words in ("--resume restores it", "unpickles the Tune state", "storage you trust",
                  "choose a new --name"):
        assert words in err, words
    assert snapshot(tmp_path) == before and not (tmp_path / "pwned").exists()


def test_resume_restores_an_existing_search_and_warns(tmp_path, monkeypatch, capsys):
    existing_experiment(tmp_path)
    monkeypatch.setattr(tune_mod, "restore_search", lambda settings, out, exp: ("restored", exp.uri))
    monkeypatch.setattr(tune_mod, "plan_search", lambda *a: pytest.fail("planned a new search"))
    settings = TuneConfig(data=str(tmp_path), out=str(tmp_path / "out"), name="exp", resume=True)
    exp_uri = str(tmp_path / "out" / "tune" / "exp")
    assert open_search(settings) == ("restored", exp_uri)

    # the unpickling itself is Tune's (Tuner.restore, stubbed here): it is announced on stderr
    from ray import tune

    monkeypatch.setattr(tune.Tuner, "restore", lambda path, trainable, **kw: ("tuner", path))
    exp = open_location(exp_uri)
    search = Search(settings, open_location(settings.out), exp,
                    [{"id": "t000", "train": {"epochs": 1}}], 1, 1.0, exp, [], restoring=True)
    assert make_tuner(search) == ("tuner", exp.path)
    err = capsys.readouterr().err
    assert f"warning: --resume: unpickling the Tune experiment state under {exp_uri}" in err


@pytest.mark.parametrize("files", [(), ("trials.json",)])
def test_resume_with_nothing_to_restore_starts_a_new_search(tmp_path, monkeypatch, capsys, files):
    exp = existing_experiment(tmp_path, files)
    monkeypatch.setattr(tune_mod, "restore_search", lambda *a: pytest.fail("restored"))
    monkeypatch.setattr(tune_mod, "plan_search", lambda settings, out, exp: ("planned", exp.uri))
    settings = TuneConfig(data=str(tmp_path), out=str(tmp_path / "out"), name="exp", resume=True)
    assert open_search(settings) == ("planned", str(exp))
    err = capsys.readouterr().err
    assert f"--resume: {exp} holds no search Tune can restore" in err and "starting a new search" in err
    assert ("it has only trials.json" in err) == bool(files)


@pytest.mark.quick
def test_local_ray_has_no_autoscaler_maximum(ray_local):
    assert ray_local.cluster_resources().get("GPU", 0) == 0
    assert cluster_max_gpus() is None  # so a --gpu search here plans one trial and says why


def _rows(exp) -> list[dict]:
    return list(csv.DictReader(io.StringIO((exp / "leaderboard.csv").read_bytes().decode())))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_search_stops_early_tracks_each_trial_and_publishes_the_winner(tmp_path, ray_local,
                                                                          monkeypatch, capsys,
                                                                          mlflow_server):
    """Tracked into a real `mlflow server` through a URI with a password (support.tracked):
    each trial is one run of the search's experiment, its epochs logged while it trained, the
    trials ASHA stopped closed as KILLED, the winner's run carrying the model."""
    small_lake(tmp_path, per_class=40)
    write_space(tmp_path / "space.yaml", SPACE)
    monkeypatch.chdir(tmp_path)  # relative paths, as typed on a command line: trials run elsewhere
    # seed 0 samples brainnet, brainnet, seed_cnn, seed_cnn (stuck at lr 1e-7); one at a time,
    # so ASHA's rung at epoch 3 has the brainnet trials to compare the stuck ones with
    settings = TuneConfig(data="lake", out="out", space="space.yaml", name="tiny",
                          num_samples=4, seed=0, grace_period=3, max_concurrent=1)
    before = set(ray_local.util.placement_group_table())
    tracking, client = tracked(mlflow_server)
    res = run_search(settings, tracking)
    captured = capsys.readouterr()
    # every trial's workers' placement group is gone, the stopped trials' too: one left
    # reserved is a CPU the next run's Ray Data waits for
    kept = {k: v["state"] for k, v in ray_local.util.placement_group_table().items()
            if k not in before and v["state"] != "REMOVED"}
    assert not kept, kept

    exp = open_location(res.experiment_uri)
    rows = _rows(exp)
    assert len(rows) == 4 and {r["model"] for r in rows} == {"brainnet", "seed_cnn"}
    status = [r["status"] for r in rows]
    assert "stopped by ASHA" in status, status  # weak trials end before 6 epochs
    assert next(r for r in rows if r["model"] == "seed_cnn")["status"] == "stopped by ASHA"
    assert all(s in ("completed", "stopped by ASHA") for s in status), status
    for r in rows:
        assert int(r["params"]) > 0 and float(r["gflops"]) > 0 and float(r["wall_s"]) > 0
    f1 = [float(r["best_val_macro_f1"]) for r in rows]
    assert f1 == sorted(f1, reverse=True) and rows[0]["model"] == "brainnet"
    for name in ("leaderboard.md", "leaderboard.html", "search.png", "summary.json", "trials.json"):
        assert (exp / name).exists(), name
    assert (exp / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert rows[0]["trial"] in (exp / "leaderboard.md").read_bytes().decode()

    # the winner is a published, loadable model whose metadata names the search, with a report
    state = load_model_state(res.model_uri)
    assert state["tune"]["trial"] == rows[0]["trial"]
    # its recipe's decision rule (the default, glioma_recall) was chosen, as `brainmri train` does
    assert state["inference"]["decision"]["rule"] == "logit bias on glioma"
    assert max(h["val_macro_f1"] for h in state["history"]) == pytest.approx(f1[0], abs=1e-4)
    build_model(state)
    assert open_location(res.report_uri + "/report.html").exists()
    assert res.report_uri in (exp / "leaderboard.html").read_bytes().decode()

    # MLflow: the experiment is the search's name, one run a trial
    runs = runs_of(client, "tiny")
    assert sorted(runs) == sorted(r["run_uri"] for r in res.leaderboard)
    assert client.get_experiment_by_name("tiny").tags["brainmri.tune"] == res.experiment_uri
    for row in res.leaderboard:
        run = runs[row["run_uri"]]
        trial = json.loads(row["config"])
        assert run.info.run_name == row["run_uri"].rsplit("/", 1)[-1]
        if "model_args.width" in trial:
            assert run.data.params["model_args.width"] == str(trial["model_args.width"])
        assert float(run.data.params["lr"]) == trial["lr"]
        assert run.data.params["dataset.version"] == run.data.tags["brainmri.dataset_version"]
        assert run.data.tags["brainmri.status"] == row["status"]
        # a trial ASHA stopped died inside run_training: the search's driver closes its run
        expected = {"completed": "FINISHED", "stopped by ASHA": "KILLED"}[row["status"]]
        assert run.info.status == expected, row["status"]
        assert_epochs_logged(client, run, row["history"], stopped=row["status"] == "stopped by ASHA")
    winner = runs[res.leaderboard[0]["run_uri"]]
    assert_model_logged(client, client.get_run(winner.info.run_id), res.model_uri, tmp_path)
    assert_no_secret(tmp_path / "out", client, runs.values(), captured.out + captured.err)

    # the same command again is refused, leaving what Tune wrote as it was...
    folder = tmp_path / "out" / "tune" / "tiny"
    assert (folder / "tuner.pkl").exists()  # Tune's pickled state: what --resume would unpickle
    before = snapshot(folder)
    capsys.readouterr()
    with pytest.raises(ConfigError, match="already exists .*--resume restores it"):
        run_search(TuneConfig(**{**settings.__dict__, "evaluate": False}))
    assert snapshot(folder) == before

    # ...and with --resume it restores the finished experiment instead of redoing it
    again = run_search(TuneConfig(**{**settings.__dict__, "evaluate": False, "resume": True}))
    assert "unpickling the Tune experiment state under" in capsys.readouterr().err
    assert [r["trial"] for r in again.leaderboard] == [r["trial"] for r in rows]
    assert [r["epochs_run"] for r in again.leaderboard] == [int(r["epochs_run"]) for r in rows]


def test_the_winner_is_finished_like_a_train_run(tmp_path):
    """Tune publishes its winner through training.finalize: the best checkpoint (epoch 0 here,
    not the latest) with the decision rule its recipe asks for, exactly what `brainmri train`
    publishes for the same run, and the search recorded."""
    from brainmri.training.finalize import finalize

    lake, run, best = finished_run(tmp_path, "glioma_recall")
    out = open_location(str(lake))
    won = load_model_state(tune_mod.publish_best(out, open_location(str(tmp_path / "exp")), best))
    assert won["epoch"] == 0 and won["tune"] == {"experiment": open_location(str(tmp_path / "exp")).uri,
                                                  "trial": "t000-brainnet"}
    assert won["inference"]["decision"]["rule"] == "logit bias on glioma"  # the rule was chosen
    trained = finalize(run, out).state  # what `brainmri train` publishes for this run
    assert won["inference"] == trained["inference"]
    assert won["history"] == best["history"]

    _, run, best = finished_run(tmp_path / "argmax", "argmax")
    plain = load_model_state(tune_mod.publish_best(out, open_location(str(tmp_path / "exp")), best))
    assert plain["inference"]["decision"] is None and plain["inference"]["logit_bias"] is None


def test_the_search_lasts_as_long_as_its_longest_trial():
    """A space may sample epochs: ASHA's max_t and the leaderboard's "completed" follow each
    trial, not trial 0."""
    trials = [{"id": f"t{i}", "train": {"epochs": e}} for i, e in enumerate((2, 6, 4))]
    search = Search(TuneConfig(), None, None, trials, 1, 1.0, None, [], False)
    assert search.epochs == 6


def test_tune_restarts_a_failed_trial_not_ray_train(tmp_path, monkeypatch):
    """A trial's Train run never restarts its own workers (a restart reserves a placement
    group that an ASHA stop would leak); Tune restarts the trial instead, as often as the
    trials allow, and the restarted trial resumes its Train run."""
    import ray.tune.integration.ray_train as tune_train

    import brainmri.training.train as train_mod
    from brainmri.config import TrainConfig, to_dict

    seen = []
    monkeypatch.setattr(train_mod, "run_training", lambda tcfg, **kw: seen.append(tcfg))
    monkeypatch.setattr(tune_train, "TuneReportCallback", object)  # outside a Tune session
    given = to_dict(TrainConfig(name="t", max_failures=3))
    tune_mod.train_trial({"trial": "t000"}, {"t000": given}, str(tmp_path / "runs"))
    assert seen[0].max_failures == 0 and given["max_failures"] == 3
    trials = [{"id": f"t{i}", "train": {"epochs": 2, "max_failures": m}} for i, m in enumerate((1, 3))]
    assert Search(TuneConfig(), None, None, trials, 1, 1.0, None, [], False).max_failures == 3
    assert Search(TuneConfig(), None, None, [], 1, 1.0, None, [], False,
                  base={"max_failures": 5}).max_failures == 5
    assert Search(TuneConfig(), None, None, [], 1, 1.0, None, [], False).max_failures == 2


def test_a_trial_is_completed_when_it_ran_its_own_epochs(tmp_path):
    """Two trials that sampled 2 and 6 epochs, both 2 epochs in: the first completed, the
    second was stopped (by ASHA: no summary.json)."""
    exp = open_location(str(tmp_path))
    trials = []
    for tid, epochs in (("t000-brainnet", 2), ("t001-brainnet", 6)):
        run = exp / "runs" / tid
        (run / "history.json").write_json([{"epoch": e, "val_macro_f1": 0.5, "val_accuracy": 0.5,
                                            "epoch_seconds": 1.0} for e in range(2)])
        if epochs == 2:
            (run / "summary.json").write_json({})
        trials.append({"id": tid, "params": {}, "train": {"name": tid, "epochs": epochs, "model": "brainnet",
                                                         "image_size": 32, "model_args": {"width": 8}}})
    rows = {r["trial"]: r["status"] for r in tune_mod.leaderboard(exp, trials, {}, ["a", "b", "c", "d"])}
    assert rows == {"t000-brainnet": "completed", "t001-brainnet": "stopped by ASHA"}


def test_each_trial_records_its_whole_network(tmp_path):
    """trials.json names every shape argument a trial trains (the recipe's, then the
    factory's), as a `brainmri train` run records it: the leaderboard builds that network."""
    from brainmri.config import RECIPE_SHAPES
    from brainmri.models.zoo import full_shape

    _, version = small_lake(tmp_path, per_class=10)
    settings = TuneConfig(data=version, out=str(tmp_path / "out"), name="s")
    (trial,) = tune_mod.build_trials({"image_size": 64, "batch_size": 8},
                                     [{"model": "brainnet", "model_args.width": 8}],
                                     settings)
    assert trial["train"]["model_args"] == full_shape("brainnet", {**RECIPE_SHAPES["brainnet"], "width": 8})
    assert trial["train"]["name"] == "s-t000-brainnet"
