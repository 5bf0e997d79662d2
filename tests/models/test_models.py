import io

import pytest
import torch

from brainmri.config import ConfigError
from brainmri.models.zoo import count_params, create_model, list_models

SHAPE = {"ensemble": {"members": [{"model": "brainnet", "model_args": {"width": 8}},
                                  {"model": "seed_cnn", "model_args": {"widths": [8, 8], "dense": 16}}]}}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_for_one_channel(name):
    m = create_model(name, num_classes=4, in_chans=1, image_size=64, **SHAPE.get(name, {})).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 4)
    assert count_params(m) > 1000


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        create_model("nope", 4)


def test_seed_cnn_is_the_plain_keras_stack():
    m = create_model("seed_cnn", 4, image_size=128)
    kinds = {type(x).__name__ for x in m.modules()}
    assert "BatchNorm2d" not in kinds and {"Conv2d", "MaxPool2d", "Linear", "Dropout"} <= kinds


def test_brainnet_shape_arguments_change_the_network():
    small = create_model("brainnet", 4, width=16, depth=[1, 1, 1, 1])
    big = create_model("brainnet", 4, width=32, depth=[2, 2, 2, 2], kernel=5, stem_stride=2)
    assert count_params(big) > 4 * count_params(small)
    with pytest.raises(ValueError):
        create_model("brainnet", 4, kernel=4)


def test_pretrained_weights_from_a_uri_load_and_ignore_the_head(tmp_path):
    src = create_model("brainnet", 3, width=16)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    (tmp_path / "w.pt").write_bytes(buf.getvalue())
    m = create_model("brainnet", 4, width=16, pretrained=str(tmp_path / "w.pt"))
    assert torch.equal(m.stem[0][0].weight, src.stem[0][0].weight)
    assert m.head[-1].out_features == 4
    with pytest.raises(ValueError, match="do not fit"):
        create_model("brainnet", 4, width=32, pretrained=str(tmp_path / "w.pt"))


def test_an_ensemble_returns_the_log_of_its_members_mean_probabilities():
    torch.manual_seed(0)
    m = create_model("ensemble", 4, image_size=64, **SHAPE["ensemble"]).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(net(x), 1) for net in m.members]).mean(0)
        out = m(x)
    assert torch.allclose(out.exp(), mean, atol=1e-6) and torch.allclose(out.exp().sum(1), torch.ones(3))
    assert count_params(m) == sum(count_params(net) for net in m.members)
    with pytest.raises(ValueError, match="at least two"):
        create_model("ensemble", 4, members=SHAPE["ensemble"]["members"][:1])
    with pytest.raises(ValueError, match="another model"):
        create_model("ensemble", 4, members=[{"model": "ensemble"}, {"model": "brainnet"}])
