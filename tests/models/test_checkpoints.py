"""What a model URI resolves to: a version folder is that version; models/<name> is its
champion, else its newest released version, never an unpromoted candidate."""

from __future__ import annotations

import time

import pytest

from brainmri.core.storage import StorageError, open_location
from brainmri.models.checkpoints import (
    CHAMPION_FILE,
    load_model_state,
    make_checkpoint,
    model_file,
    publish_model,
)
from brainmri.models.zoo import create_model


def publish(out, stage):
    model = create_model("brainnet", num_classes=4, in_chans=1, image_size=32, width=8)
    ckpt = make_checkpoint(model.state_dict(), epoch=0, best=0.5, bad_epochs=0, history=[], resumes=[],
                           config={"model": "brainnet", "image_size": 32, "model_args": {"width": 8}},
                           classes=["a", "b", "c", "d"], dataset={"uri": "x"}, params=1)
    v = publish_model(out, "brainnet", ckpt, {"val_macro_f1": 0.5}, stage=stage)
    time.sleep(1.01 - time.time() % 1)  # versions are named by the second: the next one is a newer name
    return v


def test_models_folder_resolves_to_champion_else_newest_released(tmp_path):
    out = open_location(str(tmp_path))
    root = out / "models" / "brainnet"
    cand = publish(out, "candidate")
    with pytest.raises(StorageError, match="only candidate versions .*none promoted"):
        model_file(root.uri)
    released = publish(out, "released")
    newer_cand = publish(out, "candidate")
    assert model_file(root.uri).uri == (released / "model.pt").uri  # not the newer candidate
    assert model_file(newer_cand.uri).uri == (newer_cand / "model.pt").uri  # named: served
    assert load_model_state(newer_cand.uri)["config"]["model"] == "brainnet"
    (root / CHAMPION_FILE).write_json({"version": cand.name})  # retrain promoted the old one
    assert model_file(root.uri).uri == (cand / "model.pt").uri
    (root / CHAMPION_FILE).write_json({"version": "20990101-000000-deadbeef"})
    with pytest.raises(StorageError, match="names version .* incomplete"):
        model_file(root.uri)
    with pytest.raises(ValueError, match="stage"):
        publish_model(out, "brainnet", {}, {}, stage="beta")


def test_training_state_stays_in_the_checkpoint_not_in_the_published_model(tmp_path):
    """An fp16 run's gradient scaler (like the optimiser) round-trips through a checkpoint
    loaded with weights_only, and is dropped from the published model.pt."""
    import torch

    from brainmri.models.checkpoints import dump_state, load_model_state, load_state

    model = create_model("brainnet", num_classes=4, in_chans=1, image_size=32, width=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ckpt = make_checkpoint(model.state_dict(), epoch=0, best=0.5, bad_epochs=0, history=[], resumes=[],
                           config={"model": "brainnet", "image_size": 32, "model_args": {"width": 8}},
                           classes=["a", "b", "c", "d"], dataset={"uri": "x"}, params=1,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    ckpt["scaler"] = scaler.state_dict()
    again = torch.amp.GradScaler("cpu")
    again.load_state_dict(load_state(dump_state(ckpt))["scaler"])
    assert again.get_scale() == 1024.0
    v = publish_model(open_location(str(tmp_path)), "brainnet", ckpt, {"val_macro_f1": 0.5})
    assert not {"scaler", "optimizer"} & set(load_model_state(v.uri))
