"""open_model refuses published weights whose bytes differ from the sha256 in metadata.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainmri.core.storage import StorageError, open_location
from brainmri.evaluation.inference import open_model
from brainmri.models.checkpoints import dump_state, publish_model

from support.data import CLASSES


def _state(seed: float) -> dict:
    return {"model": {"w": seed}, "config": {"model": "brainnet"}, "classes": list(CLASSES),
            "epoch": 1}


@pytest.mark.filterwarnings("ignore:publishing without")  # no network to export in _state
def test_open_model_checks_weights_against_metadata_sha256(tmp_path):
    version = publish_model(open_location(str(tmp_path)), "m", _state(1.0), {"val_f1": 0.5})
    ref = open_model(version.uri)  # untampered: opens
    assert ref.sha256 == ref.metadata["sha256"] and ref.state["model"] == {"w": 1.0}
    weights = Path(version.path) / "model.pt"
    weights.write_bytes(dump_state(_state(2.0)))  # a valid checkpoint, but not the published one
    with pytest.raises(StorageError, match=r"model\.pt has sha256 .*metadata\.json records") as e:
        open_model(version.uri)
    assert "\n" not in str(e.value)
    data = bytearray(dump_state(_state(1.0)))
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="the weights changed after publishing"):
        open_model(version.uri)
