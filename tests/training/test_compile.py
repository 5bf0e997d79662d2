"""`--compile`: the training step through torch.compile gives the eager step's parameters, and
the plain module (validation, checkpoints) shares them, so no state dict changes its keys."""

from __future__ import annotations

import pytest
import torch

from brainmri.models.zoo import create_model
from brainmri.training.engine import compiled


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_steps_match_eager_steps_and_share_the_modules_parameters():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 4, (8,))

    def trained(compile_it: bool):
        torch.manual_seed(1)
        raw = create_model("brainnet", 4, 1, image_size=32, width=8, dropout=0.0)  # no RNG: comparable
        model = compiled(raw, compile_it)
        opt = torch.optim.SGD(raw.parameters(), lr=0.1)
        raw.train()
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return raw, model

    eager, _ = trained(False)
    raw, model = trained(True)
    assert model is not raw and type(model).__name__ == "OptimizedModule"
    assert list(raw.state_dict()) == list(eager.state_dict())  # no `_orig_mod.` prefix
    for (name, a), b in zip(eager.state_dict().items(), raw.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-3), name
    assert compiled(raw, False) is raw
