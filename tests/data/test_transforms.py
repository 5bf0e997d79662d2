import io

import numpy as np
import torch
from PIL import Image

from brainmri.data.transforms import augment, fit_square, preprocess, resize, to_model_input, to_unit


def _jpeg(arr: np.ndarray, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _phantom(h=300, w=220, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    brain = ((yy - h / 2) / (h * 0.4)) ** 2 + ((xx - w / 2) / (w * 0.4)) ** 2 < 1
    img = np.where(brain, 120 + rng.normal(0, 10, (h, w)), 0)
    img[h // 3:h // 3 + 30, w // 2:w // 2 + 30] = 230  # a bright lesion
    return np.clip(img, 0, 255).astype(np.uint8)


def test_fit_square_keeps_aspect_and_pads():
    out = fit_square(np.full((200, 100), 255, np.uint8), 64)
    assert out.shape == (64, 64)
    assert out[:, :15].max() == 0 and out[:, -15:].max() == 0 and out[:, 20:44].min() == 255


def test_preprocess_is_deterministic_and_robust_to_brightness_contrast_and_size():
    base = _phantom()
    a = preprocess(_jpeg(base), 96)
    assert np.array_equal(a, preprocess(_jpeg(base), 96))
    # another export: darker, lower contrast, different size and 16-bit PNG
    dim = (base.astype(np.float32) * 0.45 + 5).astype(np.uint8)
    b = preprocess(_jpeg(np.asarray(Image.fromarray(dim).resize((440, 600)))), 96)
    buf = io.BytesIO()
    Image.fromarray((base.astype(np.uint16) * 16)).save(buf, "PNG")
    c = preprocess(buf.getvalue(), 96)
    for other in (b, c):
        assert np.abs(a.astype(int) - other.astype(int)).mean() < 12  # same picture after normalising


def test_augment_is_random_but_strength_zero_is_identity():
    x = to_unit(torch.from_numpy(np.stack([preprocess(_jpeg(_phantom(seed=i)), 64) for i in range(4)])))
    assert torch.equal(augment(x, 0.0), x)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a1, a2 = augment(x.clone(), 1.0, g1), augment(x.clone(), 1.0, g2)
    assert a1.shape == x.shape and not torch.allclose(a1, a2)
    assert a1.min() >= 0 and a1.max() <= 1
    assert to_model_input(torch.zeros(2, 8, 8, dtype=torch.uint8)).shape == (2, 1, 8, 8)


def test_resize_is_antialiased_and_the_identity_at_the_batch_size():
    """Progressive resizing's step down: a 1-pixel checkerboard averages to grey instead of
    aliasing to one of its colours, a constant stays constant, the own size is untouched."""
    i = torch.arange(96)
    x = ((i.view(96, 1) + i.view(1, 96)) % 2).float().expand(2, 1, 96, 96).clone()
    third = resize(x, 32)  # plain bilinear lands on single pixels here: all 0 or all 1
    assert third.shape == (2, 1, 32, 32) and (third - 0.5).abs().max() < 0.2
    assert torch.allclose(resize(torch.full((1, 1, 40, 40), 0.3), 24), torch.full((1, 1, 24, 24), 0.3))
    assert resize(x, 96) is x
