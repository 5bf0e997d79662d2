"""evaluation.figures: Grad-CAM of one network and of an ensemble (every member's map)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmri.data.transforms import to_model_input
from brainmri.evaluation.figures import gradcam_overlays, target_layers
from brainmri.models.zoo import create_model

SIZE = 48


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("brainnet", 4, 1, image_size=SIZE, width=8).eval()


class _LogSoftmax(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.log_softmax(self.net(x), dim=1)


def _maps(model, layers, x_u8, targets):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=layers) as cam:
        return cam(input_tensor=to_model_input(torch.from_numpy(x_u8)),
                   targets=[ClassifierOutputTarget(t) for t in targets])


def test_an_ensembles_map_averages_every_members_own():
    from pytorch_grad_cam.utils.image import scale_cam_image

    a, b = _net(0), _net(1)
    member = {"model": "brainnet", "model_args": {"width": 8}}
    ens = create_model("ensemble", 4, 1, image_size=SIZE, members=[member] * 2)
    ens.members[0].load_state_dict(a.state_dict())
    ens.members[1].load_state_dict(b.state_dict())
    ens.eval()
    assert target_layers(ens) == [target_layers(ens.members[0])[0], target_layers(ens.members[1])[0]]

    x = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    targets = [0, 2, 3]
    got = _maps(ens, target_layers(ens), x, targets)
    # each member's map for its own log-probability of the class (what the ensemble's output
    # passes its gradient through), each scaled to [0, 1], then their mean scaled again; a
    # member's activations paired with another's gradients would not give this
    own = [_maps(_LogSoftmax(m), [target_layers(m)[0]], x, targets) for m in (a, b)]
    assert np.allclose(got, scale_cam_image(np.mean(own, axis=0)), atol=5e-3)  # float32 round-off: 1.5e-3
    assert not np.allclose(got, own[1], atol=1e-2)  # not the last member's alone, as before
    overlays = gradcam_overlays(ens, x, targets)
    assert len(overlays) == 3 and overlays[0].shape == (SIZE, SIZE, 3) and overlays[0].dtype == np.uint8


def test_a_network_without_convolutions_is_refused():
    with pytest.raises(ValueError, match="no Conv2d"):
        target_layers(torch.nn.Linear(4, 4))
