"""brainmri.cli: every config flag is generated from its dataclass field (config.flag) and maps
back to that field; help texts show the dataclass defaults; old command lines still work."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field

import pytest

from brainmri import cli
from brainmri.config import (
    RUNTIMES,
    ConfigError,
    EnsembleConfig,
    EvaluateConfig,
    IngestConfig,
    PredictConfig,
    RetrainConfig,
    ServeConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    flag,
    flag_fields,
    to_dict,
)

from support.data import REPO

COMMANDS = {"ingest": IngestConfig, "train": TrainConfig, "tune": TuneConfig,
            "retrain": RetrainConfig, "evaluate": EvaluateConfig, "serve": ServeConfig,
            "ensemble": EnsembleConfig, "predict": PredictConfig}
# commands that also take the shared MLflow tracking flags (TrackingConfig, never in their config)
TRACKED = ("train", "tune", "retrain")
POSITIONAL = {"ingest": ["SRC", "DEST"], "ensemble": ["M1", "M2"], "predict": ["x.jpg"]}
REQUIRED = {"evaluate": ["--model", "m", "--data", "d", "--out", "o"], "predict": ["--model", "m"]}
ON_RAY = ("train", "tune", "retrain", "evaluate")  # they take the common --verbose


def subparsers() -> dict[str, argparse.ArgumentParser]:
    ap = cli.build_parser()
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def parse(cmd: str, *argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args([cmd, *POSITIONAL.get(cmd, []), *argv])


def flag_of(f: dataclasses.Field) -> str:
    if f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return "--" + f.name.replace("_", "-")


def sample(cls, f: dataclasses.Field) -> tuple[list[str], object]:
    """A command-line value for field `f` and the override it must become."""
    tp = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp is bool:
        return [flag_of(f)], not f.default
    if tp is dict:
        return [flag_of(f), "epochs=2"], {"epochs": 2}
    if typing.get_origin(tp) is list:
        return [flag_of(f), "a", "b"], ["a", "b"]
    if "choices" in f.metadata:
        value = [c for c in f.metadata["choices"] if c != f.default][0]
        return [flag_of(f), value], value
    if tp is int:
        return [flag_of(f), "7"], 7
    if tp is float:
        return [flag_of(f), "0.25"], 0.25
    return [flag_of(f), "x-1"], "x-1"


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_the_flags_are_exactly_the_fields_marked_as_flags(cmd):
    cls = COMMANDS[cmd]
    fields = flag_fields(cls) + (flag_fields(TrackingConfig) if cmd in TRACKED else [])
    p = subparsers()[cmd]
    options = {o for a in p._actions for o in a.option_strings if o.startswith("--")}
    options -= {"--help", "--config", "--set", "--verbose"}
    assert options == {flag_of(f) for f in fields}
    assert flag_fields(cls), cls
    # and each flag lands in its field's own attribute
    dests = {a.dest for a in p._actions
             if a.option_strings and a.dest not in ("help", "config", "overrides", "verbose")}
    assert dests == {f.name for f in fields}


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_flag_maps_to_its_field_and_back(cmd):
    cls = COMMANDS[cmd]
    for f in flag_fields(cls):
        argv, value = sample(cls, f)
        required = dict(zip(REQUIRED.get(cmd, [])[::2], REQUIRED.get(cmd, [])[1::2], strict=False))
        if argv[0] in required:  # a required flag (no default): given in every command line
            argv, value = [], required[argv[0]]
        a = parse(cmd, *REQUIRED.get(cmd, []), *argv)
        got = cli.given(a)
        assert got == {**{k[2:]: v for k, v in required.items()}, f.name: value}, f.name


def test_every_config_key_is_a_flag_of_its_command():
    """Nothing reachable only through --set: every field of a command's config has a flag."""
    for cls in (*COMMANDS.values(), TrackingConfig):
        assert [f.name for f in dataclasses.fields(cls) if f not in flag_fields(cls)] == [], cls.__name__


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_verbose_is_a_console_option_of_the_commands_on_ray(cmd, monkeypatch):
    """--verbose is not a config key (it changes what the console shows, not the run): it
    never becomes an override, and main() hands it to core.console."""
    from brainmri.core import console

    if cmd not in ON_RAY:
        with pytest.raises(SystemExit):
            parse(cmd, "--verbose")
        return
    for argv, on in (([], False), (["--verbose"], True)):
        a = parse(cmd, *REQUIRED.get(cmd, []), *argv)
        assert a.verbose is on and "verbose" not in cli.given(a)
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    monkeypatch.setattr(a, "func", lambda a: 0)
    monkeypatch.setattr(cli, "build_parser", lambda: types.SimpleNamespace(parse_args=lambda argv: a))
    assert cli.main([]) == 0 and console.verbose()


def test_tracking_flags_stay_out_of_the_command_config(monkeypatch):
    """--tracking-uri may hold credentials: it never becomes part of a config that is written
    to storage (config.json, trials.json, audit records), and it wins over the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for cmd in TRACKED:
        a = parse(cmd, "--tracking-uri", "http://u:pw@127.0.0.1:5000", "--tracking-experiment", "e")
        assert cli.given(a) == {} and "pw" not in str(to_dict(cli.config_from_args(a)))
        t = cli.tracking_from_args(a)
        assert (t.uri, t.experiment) == ("http://u:pw@127.0.0.1:5000", "e")
        assert "pw" not in repr(t)
        assert cli.tracking_from_args(parse(cmd)) is None  # off
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert cli.tracking_from_args(parse("train")).uri == "http://127.0.0.1:5001"
    assert cli.tracking_from_args(parse("train", "--tracking-uri", "http://h:1")).uri == "http://h:1"


def test_only_given_flags_become_overrides():
    for cmd in ("ingest", "train", "tune", "retrain"):
        assert cli.given(parse(cmd)) == {}
        assert cli.config_from_args(parse(cmd)) == COMMANDS[cmd]()
    a = parse("train", "--epochs", "3", "--gpu")
    assert cli.given(a) == {"epochs": 3, "gpu": True}
    cfg = cli.config_from_args(a)
    assert cfg.epochs == 3 and cfg.gpu is True and cfg.lr == TrainConfig().lr


def test_existing_command_lines_still_work(tmp_path):
    a = parse("train", "--data", "X", "--out", "Y", "--name", "N", "--epochs", "3", "--image-size",
              "64", "--batch-size", "16", "--set", "model_args={width: 16}")
    cfg = cli.config_from_args(a)
    assert (cfg.data, cfg.out, cfg.name, cfg.epochs, cfg.image_size, cfg.batch_size) == (
        "X", "Y", "N", 3, 64, 16)
    assert cfg.model_args == {"width": 16}
    assert cli.config_from_args(parse("tune", "--no-evaluate")).evaluate is False
    assert cli.config_from_args(parse("tune")).evaluate is True
    # restoring a search (unpickling Tune's state) is opt-in: --resume, off by default
    assert cli.config_from_args(parse("tune", "--resume")).resume is True
    assert cli.config_from_args(parse("tune")).resume is False
    r = cli.config_from_args(parse("retrain", "--train", "epochs=2", "--train", "lr=0.01",
                                   "--set", "train.seed=4", "--tolerance-macro-f1", "0.05"))
    assert r.train == {"epochs": 2, "lr": 0.01, "seed": 4} and r.tolerance_macro_f1 == 0.05
    a = cli.build_parser().parse_args(["ingest", "SRC", "DEST", "--val-fraction", "0.3", "--seed", "3"])
    assert (a.source, a.dest) == ("SRC", "DEST")
    i = cli.config_from_args(a)
    assert i.val_fraction == 0.3 and i.seed == 3
    # a string flag is a string, whatever YAML would make of it
    assert cli.config_from_args(parse("train", "--name", "123")).name == "123"


def test_precedence_defaults_yaml_set_flags(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("epochs: 5\nlr: 0.01\ngpu: true\n")
    cfg = cli.config_from_args(parse("train", "--config", str(y), "--set", "epochs=6",
                                     "--set", "seed=2", "--epochs", "7"))
    assert (cfg.epochs, cfg.lr, cfg.seed, cfg.gpu) == (7, 0.01, 2, True)  # an absent --gpu keeps YAML's


def test_a_new_flag_field_becomes_a_flag():
    @dataclass
    class Demo:
        plain: int = 1  # not a flag
        some_count: int = flag(3, "how many")
        ratio: float | None = flag(None, "a share")
        on_by_default: bool = flag(True, "do it")
        extra: dict = flag(help="extra keys", default_factory=dict)
        needed: str = field(default="x", metadata={"help": "spelled by hand"})

    p = argparse.ArgumentParser()
    cli.add_config_flags(p, Demo)
    a = p.parse_args(["--some-count", "4", "--ratio", "0.5", "--no-on-by-default",
                      "--extra", "a=1", "--needed", "y"])
    assert cli.given(a, Demo) == {"some_count": 4, "ratio": 0.5, "on_by_default": False,
                                  "extra": {"a": 1}, "needed": "y"}
    assert not hasattr(a, "plain")
    assert "how many (default 3)" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--plain", "2"])

    @dataclass
    class Clash:
        config: str = flag("", "a name the command line owns")

    with pytest.raises(TypeError, match="taken"):
        cli.add_config_flags(argparse.ArgumentParser(), Clash)


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_help_shows_the_dataclass_defaults(cmd, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside a help line
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    cls = COMMANDS[cmd]
    shown = 0
    for f in flag_fields(cls) + (flag_fields(TrackingConfig) if cmd in TRACKED else []):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"{f.metadata['help']} (default {cli._shown(default)})" in out, f.name
        shown += 1
    assert shown >= 1
    one = {"ingest": "(default 0.1)", "train": "(default 40)", "tune": "(default configs/tune-cpu.yaml)",
           "retrain": "(default 10.0)", "evaluate": "(default 64)", "serve": "(default 8000)",
           "ensemble": "(default glioma_recall)", "predict": "(default jsonl)"}[cmd]
    assert one in out


def test_calibrate_and_predict_keep_their_flags(capsys, monkeypatch):
    cfg = cli.config_from_args(cli.build_parser().parse_args(["predict", "x.jpg", "--model", "m"]))
    assert (cfg.format, cfg.batch_size, cfg.abstain_below, cfg.output) == ("jsonl", 32, None, "")
    assert cli.build_parser().parse_args(["calibrate", "--model", "m"]).batch_size == 64
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    assert "images per batch (default 32)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["predict", "x.jpg", "--model", "m", "--abstain-below", "2"])
    assert e.value.code == 2


def test_predict_runtime_is_evaluates_flag(capsys, monkeypatch):
    """One source: predict's --runtime is evaluate's (help, default, choices)."""
    def runtime(*argv):
        return cli.config_from_args(cli.build_parser().parse_args(["predict", "x.jpg", "--model", "m",
                                                                  *argv])).runtime

    assert runtime() == "torch" and runtime("--runtime", "onnx") == "onnx"
    (same,) = [f for f in flag_fields(PredictConfig) if f.name == "runtime"]
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["predict", "x.jpg", "--model", "m", "--runtime", "tflite"])
    assert e.value.code == 2
    (field,) = [f for f in flag_fields(EvaluateConfig) if f.name == "runtime"]
    assert field.metadata["choices"] == RUNTIMES == ("torch", "torchscript", "onnx")
    assert same.metadata == field.metadata and same.default == field.default
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    assert f"{field.metadata['help']} (default torch)" in capsys.readouterr().out


def test_evaluate_config_is_what_evaluate_takes(tmp_path):
    from brainmri.evaluation.evaluate import evaluate
    from brainmri.evaluation.predict import run

    assert list(inspect.signature(evaluate).parameters) == ["cfg"]
    assert list(inspect.signature(run).parameters) == ["paths", "cfg", "stream"]
    a = parse("evaluate", "--model", "m", "--data", "d", "--out", "o", "--split", "val",
              "--abstain-below", "0.6", "--gpu", "--concurrency", "2")
    assert to_dict(cli.config_from_args(a)) == {
        "model": "m", "data": "d", "out": "o", "split": "val", "abstain_below": 0.6,
        "batch_size": 64, "gpu": True, "concurrency": 2, "runtime": "torch", "near_dup_distance": 4,
        "n_mistakes": 12, "cam_per_class": 2}
    # evaluate takes a config file and --set like the other commands; flags win over both
    (tmp_path / "e.yaml").write_text("model: m\ndata: d\nout: o\nbatch_size: 16\nsplit: val\n")
    a = parse("evaluate", "--config", str(tmp_path / "e.yaml"), "--set", "batch_size=8", "--split", "train")
    cfg = cli.config_from_args(a)
    assert (cfg.model, cfg.batch_size, cfg.split) == ("m", 8, "train")


@pytest.mark.parametrize("argv,match", [
    (["--batch-size", "0"], "batch_size"), (["--concurrency", "0"], "concurrency"),
    (["--near-dup-distance", "65"], "near_dup_distance"),
    (["--runtime", "onnx", "--gpu"], "ONNX Runtime's CPU provider")])
def test_evaluate_validation(argv, match, capsys):
    a = parse("evaluate", "--model", "m", "--data", "d", "--out", "o", *argv)
    with pytest.raises(ConfigError, match=match):
        cli.config_from_args(a)
    assert cli.main(["evaluate", "--model", "m", "--data", "d", "--out", "o", *argv]) == 2
    assert match in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parse("evaluate", "--model", "m", "--data", "d", "--out", "o", "--abstain-below", "1.5")
    assert e.value.code == 2
    # --out is required: from the flags or from a config file, said in one line
    assert cli.main(["evaluate", "--model", "m", "--data", "d"]) == 2
    assert "missing required config key(s) out (on the command line: --out)" in capsys.readouterr().err


def test_retrain_config_lives_in_config():
    from brainmri.ops import retrain

    assert retrain.RetrainConfig is RetrainConfig
    with pytest.raises(ConfigError, match="invalid dataset name"):
        RetrainConfig(dataset="../x").validate()
    with pytest.raises(ConfigError, match=r"train\.epocs"):
        cli.config_from_args(parse("retrain", "--train", "epocs=3"))


def test_serve_flags_and_validation(capsys):
    cfg = cli.config_from_args(parse("serve", "--store", "s3://b/lake", "--port", "9000", "--poll-s", "2",
                                     "--abstain-below", "0.6", "--set", "replicas=2"))
    assert (cfg.store, cfg.port, cfg.poll_s, cfg.abstain_below, cfg.replicas) == (
        "s3://b/lake", 9000, 2.0, 0.6, 2)
    bad = ((["--port", "0", "--model", "m"], "port"), (["--poll-s", "-1", "--model", "m"], "poll_s"),
           ([], "exactly one of --store"), (["--model", "m", "--dataset", "../x"], "dataset name"))
    for argv, match in bad:
        with pytest.raises(ConfigError, match=match):
            cli.config_from_args(parse("serve", *argv))
        assert cli.main(["serve", *argv]) == 2  # one line, no Ray started
        assert match in capsys.readouterr().err


def test_python_m_brainmri_help():
    r = subprocess.run([sys.executable, "-m", "brainmri", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for cmd in ("ingest", "train", "tune", "retrain", "evaluate", "calibrate", "predict", "serve"):
        assert cmd in r.stdout


def test_a_list_flag_before_the_positionals_says_how_to_write_it(tmp_path, capsys):
    """`--classes a b SRC DEST`: argparse gives SRC and DEST to --classes; the one-line error
    says so, and both ways out parse (positionals first, or the list ended with --)."""
    src, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["ingest", "--classes", "glioma", "notumor", src, dest])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("brainmri ingest: error: the following arguments are required: source, dest")
    assert "(--classes took every value after it: give the positional arguments first" in err
    for argv in (["ingest", src, dest, "--classes", "glioma", "notumor"],
                 ["ingest", "--classes", "glioma", "notumor", "--", src, dest]):
        a = cli.build_parser().parse_args(argv)
        assert (a.source, a.dest, a.classes) == (src, dest, ["glioma", "notumor"])
    with pytest.raises(SystemExit):  # no list flag given: argparse's message alone
        cli.build_parser().parse_args(["ingest", src])
    assert "took every value" not in capsys.readouterr().err
