"""brainmri.config: YAML + overrides -> validated dataclasses, unknown keys refused."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from brainmri.config import (
    CLASSES,
    ConfigError,
    IngestConfig,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)


def test_defaults_validate_and_round_trip():
    cfg = load_config(IngestConfig)
    assert cfg == IngestConfig()
    assert cfg.classes == list(CLASSES)
    assert from_dict(IngestConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data,key", [({"bogus": 1}, "bogus"), ({"seed": 1, "sed": 2}, "sed")])
def test_unknown_key_named(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(IngestConfig, data)
    msg = str(e.value)
    assert f"unknown config key(s) {key}" in msg
    assert "known:" in msg and "seed" in msg


def test_unknown_override_key_named():
    with pytest.raises(ConfigError, match="val_fracton"):
        load_config(IngestConfig, overrides=["val_fracton=0.2"])


@dataclass
class Inner:
    x: int = 1


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)


def test_nested_unknown_key_has_prefix():
    assert from_dict(Outer, {"inner": {"x": 5}}).inner.x == 5
    assert load_config(Outer, overrides=["inner.x=7"]).inner.x == 7
    with pytest.raises(ConfigError, match=r"inner\.y"):
        load_config(Outer, overrides=["inner.y=7"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict(Outer, {"inner": 3})


def test_parse_overrides():
    assert parse_overrides(["a=1", "b=0.5", "c=[x, y]", "d.e=true", "f=hello world", "g="]) == {
        "a": 1, "b": 0.5, "c": ["x", "y"], "d": {"e": True}, "f": "hello world", "g": ""}
    assert parse_overrides(["a=x=y"]) == {"a": "x=y"}  # split on the first '=' only
    assert parse_overrides([]) == {} and parse_overrides(None) == {}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["seed"])


def test_overrides_parse_into_typed_fields():
    cfg = load_config(IngestConfig, overrides=[
        "seed=3", "val_fraction=0.25", "classes=[a, b, c]", "name=mri-v2", "test_fraction=0"])
    assert cfg.seed == 3 and isinstance(cfg.seed, int)
    assert cfg.val_fraction == 0.25
    assert cfg.classes == ["a", "b", "c"]
    assert cfg.name == "mri-v2"
    assert cfg.test_fraction == 0.0 and isinstance(cfg.test_fraction, float)  # int -> float


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "ingest.yaml"
    p.write_text("seed: 5\nval_fraction: 0.2\nclasses: [x, y]\n")
    cfg = load_config(IngestConfig, p)
    assert (cfg.seed, cfg.val_fraction, cfg.classes) == (5, 0.2, ["x", "y"])
    cfg = load_config(IngestConfig, p, ["seed=6"])
    assert (cfg.seed, cfg.val_fraction) == (6, 0.2)  # override wins, file keeps the rest
    assert load_config(IngestConfig, p, {"seed": 7}).seed == 7
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(IngestConfig, empty) == IngestConfig()


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(IngestConfig, tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(IngestConfig, p)
    p.write_text("bogus_key: 1\n")
    with pytest.raises(ConfigError, match="bogus_key"):
        load_config(IngestConfig, p)


@pytest.mark.parametrize("override,msg", [
    ("seed=abc", "seed: expected an integer"),
    ("seed=1.5", "seed: expected an integer"),
    ("seed=true", "seed: expected an integer"),
    ("seed=", "seed: expected an integer"),
    ("name=5", "name: expected a string"),
    ("classes=glioma", "classes: expected a list"),
    ("classes=[1, 2]", "classes: expected a string"),
    ("val_fraction=abc", "val_fraction: expected a number"),
    ("val_fraction=true", "val_fraction: expected a number"),
    ("near_dup_similarity=[1]", "near_dup_similarity: expected a number"),
])
def test_type_errors(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(IngestConfig, overrides=[override])
    assert msg in str(e.value)


@pytest.mark.parametrize("override,msg", [
    ("classes=[]", "classes must be a non-empty list"),
    ("classes=[a, a]", "distinct"),
    ("val_fraction=1.0", "val_fraction must be in [0, 1)"),
    ("val_fraction=-0.1", "val_fraction must be in [0, 1)"),
    ("test_fraction=1", "test_fraction must be in [0, 1)"),
    ("phash_distance=65", "phash_distance must be in [0, 64]"),
    ("phash_distance=-1", "phash_distance must be in [0, 64]"),
    ("shard_mb=0", "must be positive"),
    ("row_group_rows=0", "must be positive"),
    ("min_side=0", "must be positive"),
    ("near_dup_similarity=0", "near_dup_similarity must be in (0, 1]"),
    ("near_dup_similarity=1.5", "near_dup_similarity must be in (0, 1]"),
    ("max_pixels=0", "max_pixels must be positive"),
    ("workers=-1", "workers must be in [0, 256]"),
    ("workers=100000", "workers must be in [0, 256]"),
    ("seed=-1", "seed must be >= 0"),
])
def test_validate_errors(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(IngestConfig, overrides=[override])
    assert msg in str(e.value)


def test_fractions_sum_below_one():
    with pytest.raises(ConfigError, match=r"val_fraction \+ test_fraction must be < 1"):
        load_config(IngestConfig, overrides=["val_fraction=0.5", "test_fraction=0.5"])
    cfg = load_config(IngestConfig, overrides=["val_fraction=0.5", "test_fraction=0.49"])
    assert cfg.val_fraction + cfg.test_fraction < 1
    bad = IngestConfig(val_fraction=0.6, test_fraction=0.6)  # direct construction: validate()
    with pytest.raises(ConfigError):
        bad.validate()
