"""Models by name: `create_model(name, num_classes, in_chans, pretrained=None, **shape)`.

- `seed_cnn`: a faithful stand-in for the published Keras baseline (conv/pool stack, dense
  head, dropout, no batch norm). Kept to measure ourselves against.
- `brainnet`: the compact from-scratch CNN designed for CPU training (residual stages, BN,
  SiLU, global pooling). Its shape (depth, width, kernel, stem stride) is what Tune searches.
- torchvision families (resnet*, efficientnet_*, mobilenet_v3_*, convnext_*), with the first
  convolution rebuilt for 1-channel input (pretrained RGB filters are summed, which is what
  a greyscale image replicated to RGB would see).
- `ensemble`: several of the above as one network that averages their class probabilities
  (`members`: [{model, model_args}, ...]); `training.ensemble` builds one from published
  models, so evaluate, predict, serving and the exports see a single network.

Pretrained weights are optional: a storage URI of a state dict (loaded with
weights_only=True), or "torchvision" for torchvision's own weights when its cache (or the
internet) has them. Nothing here downloads anything unless asked to.
"""

from __future__ import annotations

import inspect
import io
import json
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


class UnknownModel(ConfigError):
    pass


def check_model_name(name: str) -> None:
    if name not in _REGISTRY:
        raise UnknownModel(f"unknown model {name!r}; registered: {', '.join(list_models())}")


def model_defaults(name: str) -> dict:
    """The shape arguments a factory takes, with their defaults (what model_args may name)."""
    check_model_name(name)
    sig = inspect.signature(_REGISTRY[name]).parameters
    return {k: p.default for k, p in sig.items()  # as written (tuples): full_shape makes them JSON
            if k not in ("num_classes", "in_chans", "image_size", "pretrained")
            and p.default is not inspect.Parameter.empty}


def full_shape(name: str, model_args: dict) -> dict:
    """What recorded model_args mean: themselves, with the factory's defaults for what they
    leave out (a JSON-shaped copy: tuples become lists, nothing shared with the caller)."""
    return json.loads(json.dumps({**model_defaults(name), **model_args}))


def create_model(name: str, num_classes: int, in_chans: int = 1, pretrained: str | None = None,
                 image_size: int = 128, **kwargs) -> nn.Module:
    check_model_name(name)
    model = _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                            pretrained=pretrained, **kwargs)
    if pretrained and pretrained != "torchvision":
        from ..core.storage import open_location

        state = torch.load(io.BytesIO(open_location(pretrained).read_bytes()),
                           map_location="cpu", weights_only=True)
        state = state.get("model", state)
        own = model.state_dict()
        head = _head_prefix(model)
        # a new classifier head (another class count) is expected; any other mismatch is not
        bad = [k for k, v in state.items()
               if k in own and own[k].shape != v.shape and not k.startswith(head)]
        state = {k: v for k, v in state.items() if k not in own or own[k].shape == v.shape}
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad += [k for k in list(missing) + list(unexpected) if not k.startswith(head)]
        if bad:
            raise ValueError(f"pretrained weights {pretrained} do not fit {name}: {bad[:5]}")
    return model


def _head_prefix(model: nn.Module) -> str:
    return getattr(model, "head_prefix", "fc")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the published baseline -----------------------------------------------------------------
@register("seed_cnn")
def seed_cnn(num_classes: int, in_chans: int, image_size: int, pretrained=None,
             widths=(32, 64, 128, 128), dense: int = 512, dropout: float = 0.5) -> nn.Module:
    layers, c = [], in_chans
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = w
    side = image_size // 2 ** len(widths)
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, dense),
                          nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dense, num_classes))
    model.head_prefix = str(len(model) - 1)
    return model


# -- the compact CPU model --------------------------------------------------------------------
class ConvBNAct(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=True):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.SiLU(inplace=True) if act else nn.Identity())


class ResBlock(nn.Module):
    """Basic residual block; the shortcut is a strided 1x1 conv when the shape changes."""

    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.body = nn.Sequential(ConvBNAct(cin, cout, k, stride), ConvBNAct(cout, cout, k, act=False))
        self.short = (nn.Identity() if cin == cout and stride == 1
                      else ConvBNAct(cin, cout, 1, stride, act=False))
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.short(x))


class BrainNet(nn.Module):
    head_prefix = "head"

    def __init__(self, num_classes, in_chans=1, width=32, depth=(1, 1, 2, 1), kernel=3,
                 stem_stride=2, dropout=0.2):
        super().__init__()
        # stem_stride 1/2/4: that many stride-2 3x3 convs (a 3x3 kernel with stride 4 would
        # skip pixels); 4 is the cheap CPU setting, 2 keeps more detail for larger budgets.
        n_down = {1: 0, 2: 1, 4: 2}[stem_stride]
        stem, c = [], in_chans
        for i in range(max(n_down, 1)):
            w = width if i == n_down - 1 or n_down == 0 else width // 2
            stem.append(ConvBNAct(c, w, 3, 2 if n_down else 1))
            c = w
        self.stem = nn.Sequential(*stem)
        stages = []
        for i, d in enumerate(depth):
            w = width * 2 ** i
            for j in range(d):
                stages.append(ResBlock(c, w, kernel, 2 if (j == 0 and i > 0) else 1))
                c = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.stages(self.stem(x))))


@register("brainnet")
def brainnet(num_classes: int, in_chans: int, image_size: int, pretrained=None, width: int = 32,
             depth: list[int] | tuple = (1, 1, 2, 1), kernel: int = 3, stem_stride: int = 4,
             dropout: float = 0.2) -> nn.Module:
    if kernel not in (3, 5, 7) or stem_stride not in (1, 2, 4) or width < 4 or not depth:
        raise ValueError("brainnet: kernel in {3,5,7}, stem_stride in {1,2,4}, width >= 4, depth non-empty")
    return BrainNet(num_classes, in_chans, width, tuple(depth), kernel, stem_stride, dropout)


# -- several networks as one -------------------------------------------------------------------
class Ensemble(nn.Module):
    """The members' softmax probabilities averaged; returns their log, so every consumer that
    treats the output as logits (softmax, argmax, a logit bias, temperature) sees the mean
    probabilities. Averaging probabilities rather than logits keeps one over-confident member
    from out-voting the others."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        logp = torch.stack([F.log_softmax(m(x).float(), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


@register("ensemble")
def ensemble(num_classes: int, in_chans: int, image_size: int, pretrained=None,
             members: list[dict] | tuple = ()) -> nn.Module:
    if len(members) < 2:
        raise ValueError("ensemble: members must list at least two networks ({model, model_args})")
    nets = []
    for m in members:
        if not isinstance(m, dict) or m.get("model") in (None, "ensemble"):
            raise ValueError(f"ensemble: each member is {{model, model_args}} of another model, got {m!r}")
        nets.append(create_model(m["model"], num_classes, in_chans, image_size=image_size,
                                 **m.get("model_args", {})))
    return Ensemble(nets)


# -- torchvision families ---------------------------------------------------------------------
def _tv(builder: str, weights_enum: str, first: str, head: str):
    def make(num_classes, in_chans, image_size, pretrained=None, **kwargs):
        import torchvision.models as tvm

        weights = getattr(tvm, weights_enum).DEFAULT if pretrained == "torchvision" else None
        m = getattr(tvm, builder)(weights=weights, **kwargs)
        # rebuild the first conv for in_chans, keeping pretrained filters (summed over RGB)
        parent, attr = _resolve(m, first)
        old: nn.Conv2d = getattr(parent, attr)
        new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
        with torch.no_grad():
            new.weight.copy_(old.weight.sum(1, keepdim=True).repeat(1, in_chans, 1, 1) / in_chans)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, attr, new)
        parent, attr = _resolve(m, head)
        old_head: nn.Linear = getattr(parent, attr)
        setattr(parent, attr, nn.Linear(old_head.in_features, num_classes))
        m.head_prefix = head
        return m
    return make


def _resolve(m: nn.Module, dotted: str):
    *path, last = dotted.split(".")
    for p in path:
        m = m[int(p)] if p.isdigit() else getattr(m, p)
    return m, last


for _name, _enum, _first, _head in [
    ("resnet18", "ResNet18_Weights", "conv1", "fc"),
    ("resnet34", "ResNet34_Weights", "conv1", "fc"),
    ("resnet50", "ResNet50_Weights", "conv1", "fc"),
    ("efficientnet_b0", "EfficientNet_B0_Weights", "features.0.0", "classifier.1"),
    ("efficientnet_b2", "EfficientNet_B2_Weights", "features.0.0", "classifier.1"),
    ("mobilenet_v3_small", "MobileNet_V3_Small_Weights", "features.0.0", "classifier.3"),
    ("mobilenet_v3_large", "MobileNet_V3_Large_Weights", "features.0.0", "classifier.3"),
    ("convnext_tiny", "ConvNeXt_Tiny_Weights", "features.0.0", "classifier.2"),
]:
    register(_name)(_tv(_name, _enum, _first, _head))
