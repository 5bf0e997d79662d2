"""Preprocessing, kept in two kinds (as MONAI does):

- deterministic (`preprocess`, defined torch-free in `preprocess.py`, re-exported here):
  decode -> greyscale -> fit into a square (aspect kept, zero padding) -> robust intensity
  normalisation. Training, evaluation and prediction all use it, so a model sees the same
  thing everywhere. Percentile normalisation makes the input independent of each export's
  brightness, contrast window and bit depth.
- random (`augment`): batched on torch tensors in the train worker: affine (rotation,
  scale, shift, flip), intensity (gamma, contrast, brightness), blur or noise. Strength 0
  turns it off; Tune searches the strength. Evaluation never calls it.

The train/eval input contract (one entry point per step, as torchvision's classification
presets name theirs):

- every split (train, val, test, evaluation, prediction): `preprocess_many` (or
  `preprocess` for one image) -- decode -> grey -> fit square -> percentile normalise, uint8
  [N, S, S]. The only loop over encoded images; `preprocess_batch` wraps it for Ray Data.
- training only: `augment`, on float [0, 1] batches (`to_unit`) in the train worker, after
  `resize` when the recipe trains early epochs smaller (progressive resizing).
- everywhere: `to_model_input` (or `normalise` after `augment`) -- the fixed MEAN/STD
  normalisation to float [N, 1, S, S] right before the network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .preprocess import (  # noqa: F401  (re-exported: the whole input contract in one place)
    HI_PCT,
    LO_PCT,
    fit_square,
    normalise_intensity,
    preprocess,
    preprocess_batch,
    preprocess_many,
)

# Fixed normalisation after percentile scaling to [0, 1] (dataset statistics would tie the
# model to this export; after per-image scaling these are close to any export's).
MEAN, STD = 0.2, 0.25


def to_unit(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W] -> float [B,1,H,W] in [0, 1]."""
    return x_u8.float().div_(255.0).unsqueeze(1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def to_model_input(x_u8: torch.Tensor) -> torch.Tensor:
    """The deterministic path: uint8 [B,H,W] -> normalised float [B,1,H,W]."""
    return normalise(to_unit(x_u8))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """float [B,1,H,W] -> [B,1,size,size], antialiased (a plain bilinear step down from 160 to
    80 px would alias: every other pixel dropped). Identity at the batch's own size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def augment(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random, batched; x is float [B,1,H,W] in [0,1] (before to_model_input's normalisation).

    Runs on x's device: on a GPU worker the batch arrives there as uint8 and is augmented
    there, so `generator` (if given) must live on the same device."""
    if strength <= 0:
        return x
    b, dev = x.shape[0], x.device
    g = generator

    def u(lo, hi):
        return torch.rand(b, generator=g, device=dev) * (hi - lo) + lo

    s = strength
    # geometry: rotation +-15deg*s, scale 1 +- 0.15*s, shift +-8%*s, horizontal flip
    ang = u(-15, 15) * s * math.pi / 180
    scale = 1 + u(-0.15, 0.15) * s
    flip = torch.where(torch.rand(b, generator=g, device=dev) < 0.5, -1.0, 1.0)
    tx, ty = u(-0.08, 0.08) * s * 2, u(-0.08, 0.08) * s * 2
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # intensity: gamma, contrast, brightness (other scanners / exports)
    gamma = torch.exp(u(-0.35, 0.35) * s).view(b, 1, 1, 1)
    x = x.clamp(0, 1).pow(gamma)
    contrast = (1 + u(-0.25, 0.25) * s).view(b, 1, 1, 1)
    bright = (u(-0.1, 0.1) * s).view(b, 1, 1, 1)
    mean = x.mean((2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + bright
    # blur (lower resolution exports) or noise, each on a random third of the batch
    pick = torch.rand(b, generator=g, device=dev)
    blur_idx = (pick < 0.33 * min(s, 1)).nonzero().flatten()
    if len(blur_idx):
        k = torch.tensor([1, 4, 6, 4, 1], dtype=x.dtype, device=dev)
        k = (k[:, None] * k[None, :]) / 256
        x[blur_idx] = F.conv2d(x[blur_idx], k.view(1, 1, 5, 5), padding=2)
    noise_idx = ((pick > 0.67) & (pick < 0.67 + 0.33 * min(s, 1))).nonzero().flatten()
    if len(noise_idx):
        x[noise_idx] += torch.randn(x[noise_idx].shape, generator=g, device=dev) * 0.03 * s
    return x.clamp(0, 1)
