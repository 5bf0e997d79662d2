"""Every shipped config loads: each configs/*.yaml recipe is a valid TrainConfig naming a
registered model, and each configs/tune-*.yaml space passes tune's own loader."""

from __future__ import annotations

import pytest

from brainmri.config import TrainConfig, load_config

from support.data import REPO

CONFIGS = REPO / "configs"
SPACES = sorted(CONFIGS.glob("tune-*.yaml"))
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if p not in SPACES)


def test_there_are_shipped_configs():
    assert RECIPES and SPACES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_names_a_registered_model(path):
    from brainmri.models import list_models

    cfg = load_config(TrainConfig, path)
    assert cfg.model in list_models(), f"{path.name}: model {cfg.model!r} is not registered"


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_tune_space_passes_the_space_loader(path):
    from brainmri.models import list_models
    from brainmri.ops.tune import load_space

    before = path.read_bytes()
    base, space = load_space(str(path))  # validates keys, domains and model names
    assert space and isinstance(base, dict)
    model = base.get("model", space.get("model"))
    names = [model] if isinstance(model, str) else list(model or [])
    assert set(names) <= set(list_models())
    assert path.read_bytes() == before  # read-only


def test_the_cpu_recipe_is_the_trainconfig_defaults_spelled_out():
    """configs/cpu.yaml documents the defaults: a key there that differs from TrainConfig's
    default would make `brainmri train` and `--config configs/cpu.yaml` two recipes."""
    import yaml

    from brainmri.models.zoo import model_defaults

    spelled = yaml.safe_load((CONFIGS / "cpu.yaml").read_text())
    defaults = TrainConfig()
    shape = spelled.pop("model_args")  # the default {} means the recipe's shape (RECIPE_SHAPES)
    assert defaults.model_args == {} and defaults.shape() == shape
    assert set(shape) == set(model_defaults(defaults.model)) - {"dropout"}  # every shape argument
    assert {k: getattr(defaults, k) for k in spelled} == spelled
