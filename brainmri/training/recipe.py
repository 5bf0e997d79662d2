"""A TrainConfig turned into the objects that train a network (`engine.Recipe`).

One place for a Ray worker (training.train), the sweep and the benchmarks that train the
recipe without Ray (benchmarks/sweep.py, benchmarks/train.py): what they measure is what
the workers train.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..config import TrainConfig
from .engine import EMA, Mixer, Recipe, Teacher, device_precision, lr_lambda


def configure_optimizer(cfg: TrainConfig, raw: nn.Module, steps_per_epoch: int):
    """AdamW with weight decay on weights only (not biases or norms), warm-up + cosine."""
    decay = [p for p in raw.parameters() if p.ndim > 1]
    no_decay = [p for p in raw.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.warmup_epochs, cfg.epochs, steps_per_epoch))
    return optimizer, scheduler


def class_weighted_loss(cfg: TrainConfig, train_counts: list[int], device) -> nn.Module:
    """Cross-entropy with inverse-frequency class weights (glioma is the smallest class)."""
    counts = np.asarray(train_counts, dtype=np.float64)
    k = len(counts)
    weight = (counts.sum() / (k * np.maximum(counts, 1))) if cfg.class_weighting else np.ones(k)
    return nn.CrossEntropyLoss(weight=torch.tensor(weight, dtype=torch.float32).to(device),
                               label_smoothing=cfg.label_smoothing)


def optimizer_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimiser steps an epoch of `batches_per_epoch` batches makes (accumulation groups)."""
    return max(1, batches_per_epoch // cfg.accum_steps)


def train_sizes(cfg: TrainConfig) -> tuple[int, ...]:
    """The side each epoch trains at: with progressive resizing (cfg.start_image_size), equal
    stages from start_image_size up to image_size in steps of 16 px, the last stage at
    image_size (as EfficientNetV2's progressive learning, without its regularisation ramp);
    () when off. A function of the epoch alone, so a resumed run trains the same sizes."""
    start, full = cfg.start_image_size, cfg.image_size
    if not start or start >= full:
        return ()
    stages = [*range(start, full, 16), full]
    n = min(len(stages), cfg.epochs)  # fewer epochs than stages: every stage gets one, ends kept
    picked = [stages[round(k * (len(stages) - 1) / (n - 1))] for k in range(n)] if n > 1 else [full]
    return tuple(picked[e * n // cfg.epochs] for e in range(cfg.epochs))


def build_recipe(cfg: TrainConfig, raw: nn.Module, train_counts: list[int], device: torch.device,
                 batches_per_epoch: int, rank: int = 0, teacher: Teacher | None = None,
                 channels_last: bool = True) -> Recipe:
    """The recipe of `cfg` for `raw` (the unwrapped module) on `device`, whose shard gives
    `batches_per_epoch` batches. Random draws differ by rank (augmentation, mixing) from seeds
    fixed by cfg.seed; `teacher`: training.distill's; precision: cfg.precision resolved for the
    device (engine.choose_precision).
    Channels-last on every device by default: cuDNN's and oneDNN's convolutions both prefer it
    (CPU: brainnet's training step at 160 px ~1.3x on one thread, python -m benchmarks.train --only layout)."""
    optimizer, scheduler = configure_optimizer(cfg, raw, optimizer_steps(cfg, batches_per_epoch))
    precision = device_precision(cfg.precision, device)
    return Recipe(
        criterion=class_weighted_loss(cfg, train_counts, device),
        optimizer=optimizer, scheduler=scheduler, aug_strength=cfg.aug_strength,
        # augmentation runs where the batch is, and differs by rank
        generator=torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank),
        ema=EMA(raw, cfg.ema_decay) if cfg.ema_decay > 0 else None,
        mixer=Mixer(cfg.mix_prob, cfg.mix_alpha, cfg.cutmix_share, cfg.seed * 1000 + rank)
        if cfg.mix_prob > 0 else None,
        teacher=teacher, precision=precision,
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
        grad_clip=cfg.grad_clip, accum_steps=cfg.accum_steps, channels_last=channels_last, tta=cfg.tta,
        sizes=train_sizes(cfg))
