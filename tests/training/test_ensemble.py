"""training.ensemble (`brainmri ensemble`): published models become one published model that
averages their probabilities, scored and given its decision rule on the members' validation
rows; members that differ in what the ensemble relies on are refused before anything is
written. Real scans, members fitted in this process (seconds, no Ray)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from brainmri.config import ConfigError, EnsembleConfig, TrainConfig, from_dict
from brainmri.core.storage import open_location
from brainmri.data.datasets import resolve_dataset, split_arrays
from brainmri.data.transforms import to_model_input
from brainmri.evaluation.inference import open_model
from brainmri.models.checkpoints import build_model, load_model_state
from brainmri.training.ensemble import combine

from support.tiny import publish_untrained, small_lake, train_inprocess

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    lake, version_uri = small_lake(root, per_class=12)
    uris = [train_inprocess(lake, version_uri, steps=20, seed=s) for s in (0, 1, 2)]
    return lake, version_uri, uris


def test_published_ensemble_averages_its_members_and_says_what_they_are(members, tmp_path):
    lake, version_uri, uris = members
    res = combine(uris, EnsembleConfig(out=str(tmp_path), name="ens", decision_rule="argmax"))
    meta = json.loads((open_location(res.model_uri) / "metadata.json").read_bytes())
    assert meta["name"] == "ens" and meta["config"]["model"] == "ensemble"
    own = [json.loads((open_location(u) / "metadata.json").read_bytes())["sha256"] for u in uris]
    assert [m["sha256"] for m in meta["ensemble"]["members"]] == own
    assert all("error" not in r for r in meta["exports"].values()), meta["exports"]
    assert meta["inference"]["tta"] is True and meta["inference"]["logit_bias"] is None
    assert "average of 3 trained models" in meta["card"]["performance"]["measured_on"]

    # the served network (its flips included) = the log of the members' mean probabilities
    version, manifest = resolve_dataset(version_uri)
    batches = list(split_arrays(version, manifest, "val", 64, None))
    xin = to_model_input(torch.from_numpy(np.concatenate([b[0] for b in batches])))
    y = np.concatenate([b[1] for b in batches])
    with torch.no_grad():
        bare = [build_model(load_model_state(u), bare=True) for u in uris]
        mean = torch.stack([torch.softmax(b(xin), 1) for b in bare]).mean(0)
        mean_f = torch.stack([torch.softmax(b(torch.flip(xin, dims=[3])), 1) for b in bare]).mean(0)
        served = build_model(load_model_state(res.model_uri))(xin)
    assert torch.allclose(served, (mean.log() + mean_f.log()) / 2, atol=1e-5)

    # its validation score is that network's on every validation row, with the members' own
    n_val = sum(manifest["counts"]["val"].values())
    assert res.metrics["val_n"] == n_val == len(y) == meta["metrics"]["val_n"]
    assert res.metrics["val_accuracy"] == pytest.approx(float((served.argmax(1).numpy() == y).mean()))
    assert [m["best_val_macro_f1"] for m in res.members] == [load_model_state(u)["best"] for u in uris]
    assert open_model(res.model_uri).image_size == 64  # evaluate/predict/serve open it as any model

    # predict answers the same from model.pt and from each export (members' mean probabilities)
    from brainmri.evaluation.predict import Predictor

    scans = [(p.name, p.read_bytes()) for p in sorted((lake.parent / "src").rglob("*.jpg"))[:4]]
    answers = {rt: Predictor(res.model_uri, runtime=rt).predict(scans)
               for rt in ("torch", "torchscript", "onnx")}
    for rt, rows in answers.items():
        for a, b in zip(answers["torch"], rows, strict=True):
            assert a.ok and b.ok and a.label == b.label, rt
            assert all(abs(a.probabilities[c] - b.probabilities[c]) < 1e-3 for c in a.probabilities), rt


def test_the_decision_rule_is_chosen_again_for_the_ensemble(members, tmp_path, capsys):
    _, _, uris = members
    res = combine(uris[:2], EnsembleConfig(out=str(tmp_path), name="ens"))
    state = load_model_state(res.model_uri)
    rule = state["inference"]["decision"]
    assert rule["rule"].startswith("logit bias on glioma") and rule["n"] == res.metrics["val_n"]
    assert rule["held_out"]["halves"] == "duplicate groups" and isinstance(rule["adopted"], bool)
    assert (state["inference"]["logit_bias"] is not None) == (rule["adopted"] and rule["fitted"]["bias"] > 0)
    assert "decision rule" in capsys.readouterr().out
    assert from_dict(TrainConfig, state["config"]).decision_rule == "glioma_recall"


def test_members_that_differ_are_refused_before_anything_is_written(members, tmp_path):
    _, _, uris = members
    cfg = EnsembleConfig(out=str(tmp_path), name="ens")
    other = publish_untrained(tmp_path / "other", seed=5)  # no dataset version: another dataset
    cases = [([uris[0]], "at least two models"),
             ([uris[0], uris[0]], "listed twice"),
             ([uris[0], other], "must share their dataset version")]
    first = combine(uris[:2], EnsembleConfig(out=str(tmp_path / "nested"), name="ens",
                                             decision_rule="argmax"))
    cases.append(([first.model_uri, uris[2]], "ensemble already"))
    for given, match in cases:
        with pytest.raises(ConfigError, match=match):
            combine(given, cfg)
    assert not (tmp_path / "models" / "ens").exists()


def _altered(uri: str, dest, change) -> str:
    """A copy of a member's model.pt with `change(state)` applied, as a .pt file."""
    state = load_model_state(uri)
    change(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    dest.write_bytes(buf.getvalue())
    return str(dest)


def _size96(state):
    state["config"] = {**state["config"], "image_size": 96}
    state["preprocess"] = {**state["preprocess"], "image_size": 96}


@pytest.mark.parametrize("change, match", [
    (_size96, r"share their input \(preprocess\)"),
    (lambda s: s.update(inference={**s["inference"], "tta": False}), r"share their test-time flips"),
    (lambda s: s.update(config={**s["config"], "limit_val": 5}), r"share their validation rows"),
    (lambda s: s.update(config={**s["config"], "decision_max_f1_drop": 0.02}), "decision_max_f1_drop"),
    (lambda s: s.update(history=[]), "same weights"),  # another file, the same network
])
def test_members_that_differ_in_what_the_ensemble_relies_on_are_refused(members, tmp_path, change, match):
    _, _, uris = members
    other = _altered(uris[1], tmp_path / "other.pt", change)
    first = uris[1] if match == "same weights" else uris[0]
    with pytest.raises(ConfigError, match=match):
        combine([first, other], EnsembleConfig(out=str(tmp_path), name="ens"))
    assert not (tmp_path / "models").exists()


def test_retrain_asks_for_a_recipe_when_the_champion_is_an_ensemble(members, tmp_path):
    from brainmri.config import RetrainConfig
    from brainmri.ops.retrain import retrain

    lake, _, uris = members
    ens = combine(uris[:2], EnsembleConfig(out=str(tmp_path), name="ens", decision_rule="argmax"))
    cfg = RetrainConfig(store=str(lake), champion=ens.model_uri, wait_lock_s=0)
    with pytest.raises(ConfigError, match="is an ensemble.*give --recipe"):
        retrain(cfg)
    pointer = lake / "retrain" / "brain-tumor-mri" / "champion.json"  # may hold the lease's fence only
    assert not pointer.exists() or not json.loads(pointer.read_text()).get("model")


def test_ensemble_config_refuses_bad_names_and_rules():
    with pytest.raises(ConfigError, match="invalid model name"):
        EnsembleConfig(name="../x").validate()
    with pytest.raises(ConfigError, match="decision_rule"):
        EnsembleConfig(decision_rule="vote").validate()
