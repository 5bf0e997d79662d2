"""The training and evaluation loops a data-parallel worker runs, free of Ray.

`brainmri.train` drives them inside Ray Train workers; `benchmarks/gpu.py` drives the same
functions on a bare GPU machine with only PyTorch. Three rules keep data parallelism safe at
any worker count and on any backend:

- **One place for collectives** (`all_reduce_sum`). Every tensor that crosses ranks goes
  through it, and it refuses a tensor that is not on the process group's device: NCCL
  rejects CPU tensors, and a mismatch found there is a crash at the end of an epoch on the
  first GPU run, after a retry or two.
- **No collective inside an evaluation forward.** `evaluate` runs the unwrapped module (a
  DDP forward broadcasts buffers, a collective, and a rank with no validation rows would
  never join it). Ranks evaluate their own rows, zero rows included, and meet exactly once
  per epoch to sum the confusion matrix.
- **The device does the work, and syncs once per epoch.** Batches travel to the device as
  uint8 (4x fewer bytes than float), are augmented there, and running sums stay on the
  device; nothing calls `.item()` inside the step loop.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..core import metrics as M
from ..core.metrics import SELECTION_METRIC as METRIC
from ..data.transforms import augment, normalise, resize, to_unit
from ..models.decision import InferenceNet


# -- collectives ------------------------------------------------------------------------------
def group_device() -> torch.device | None:
    """The device the default process group's collectives need, or None without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend()).lower()
    # "nccl" or "cuda:nccl": CUDA tensors only ("cpu:gloo,cuda:nccl" would take both, and
    # is not what Ray creates, so it is held to the CUDA rule too)
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` across ranks in place (a no-op in a single process). The only collective
    brainmri's own code calls."""
    want = group_device()
    if want is None:
        return t
    if t.device.type != want.type or (want.type == "cuda" and t.device.index != want.index):
        raise RuntimeError(f"collective on a tensor on {t.device}, but the process group "
                           f"({dist.get_backend()}) needs {want}")
    dist.all_reduce(t)
    return t


def agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (one rank leaving a loop alone would
    leave the others waiting in their next collective)."""
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def to_channels_last(model: nn.Module) -> nn.Module:
    """channels-last for the GPU's convolutions. A weight with one input channel (the first
    conv of a greyscale model) has the same bytes either way but different strides, and its
    gradient comes back contiguous: DDP would then copy it into its bucket every step (and
    warn "Grad strides do not match bucket view strides"), so such weights stay contiguous."""
    model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] == 1:
            p.data = p.data.contiguous()
    return model


def compiled(model: nn.Module, on: bool) -> nn.Module:
    """The model the training steps run: torch.compile'd when asked, else as given. Compile the
    DDP wrapper, not its module, so DDP's graph breaks fall at its gradient buckets and the
    all-reduce still overlaps the backward. It shares its parameters with the plain module,
    which validation, EMA and checkpoints keep using (no `_orig_mod.` in any state dict)."""
    return torch.compile(model) if on else model


# -- schedule ---------------------------------------------------------------------------------
def lr_lambda(warmup_epochs: float, epochs: int, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to zero at the last step."""
    warm = max(1, int(warmup_epochs * steps_per_epoch))
    total = max(warm + 1, epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))
    return f


# -- weight averaging -------------------------------------------------------------------------
class EMA:
    """An exponential moving average of a model's weights (and buffers), updated after every
    optimizer step, as timm's ModelEmaV2 does. Small medical datasets give noisy late epochs;
    the average is a better network than any single step's. Every rank holds the same copy
    (DDP keeps the weights equal), so it needs no collective. The decay warms up
    ((1 + n) / (10 + n)): the first, random weights must not dominate the average."""

    def __init__(self, model: nn.Module, decay: float, updates: int = 0):
        self.module = copy.deepcopy(getattr(model, "module", model)).eval().requires_grad_(False)
        self.decay, self.updates = decay, updates
        self._pairs: list | None = None  # (average, live) tensors, paired once: not per step

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._pairs is None:  # the tensors stay the same objects (load_state_dict copies in place)
            live = getattr(model, "module", model).state_dict()
            self._pairs = [(avg, live[name]) for name, avg in self.module.state_dict().items()]
        for avg, cur in self._pairs:
            if avg.dtype.is_floating_point:
                avg.lerp_(cur, 1.0 - d)
            else:  # counters (BatchNorm's num_batches_tracked)
                avg.copy_(cur)


# -- mixing -----------------------------------------------------------------------------------
class Mixer:
    """MixUp / CutMix of a training batch with a shuffled copy of itself (timm's Mixup, cut
    down). With probability `prob` a batch is mixed: CutMix (a box of the partner image pasted
    in, the weight = the area kept) with probability `cutmix_share`, else MixUp (a blend).
    lam ~ Beta(alpha, alpha), folded to >= 0.5 so the first label stays the dominant one (it
    is the one the running train accuracy counts). The loss is lam * L(y) + (1 - lam) * L(y').

    The per-batch draws (whether, which, lam, the box) are host scalars from a seeded NumPy
    generator: no device sync, identical on CPU and GPU; only the partner permutation is
    drawn on the batch's device, from the augmentation generator."""

    def __init__(self, prob: float, alpha: float, cutmix_share: float, seed: int):
        self.prob, self.alpha, self.cutmix_share = prob, alpha, cutmix_share
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """-> (mixed x, partner labels, lam); lam = 1.0 (and x untouched) when not mixed."""
        if x.shape[0] < 2 or self.rng.random() >= self.prob:
            return x, y, 1.0
        lam = float(self.rng.beta(self.alpha, self.alpha))
        lam = max(lam, 1.0 - lam)
        perm = torch.randperm(x.shape[0], device=x.device, generator=generator)
        if self.rng.random() < self.cutmix_share:  # CutMix: a box with area (1 - lam)
            h, w = x.shape[-2:]
            r = math.sqrt(1.0 - lam)
            bh, bw = int(h * r), int(w * r)
            cy, cx = int(self.rng.integers(0, h)), int(self.rng.integers(0, w))
            y0, y1 = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
            x0, x1 = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the box clipped at the border
        else:
            x = x.mul(lam).add_(x[perm], alpha=1.0 - lam)
        return x, y[perm], lam


# -- distillation -----------------------------------------------------------------------------
class Teacher:
    """A frozen network whose class probabilities the trained one is pulled towards, on the
    very batch it trains on (augmented and mixed: the teacher sees what the student sees).
    `training.distill` loads it; here only the loss. The term is Hinton's: KL(teacher_T ||
    student_T) * T^2, so its gradient scale does not change with the temperature T."""

    def __init__(self, net: nn.Module, weight: float, temperature: float):
        self.net, self.weight, self.temperature = net.eval().requires_grad_(False), weight, temperature

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        target = torch.log_softmax(teacher.float() / t, dim=1)
        return nn.functional.kl_div(torch.log_softmax(student.float() / t, dim=1), target,
                                    reduction="batchmean", log_target=True) * (t * t)


# -- batches ----------------------------------------------------------------------------------
class FeedStalled(RuntimeError):
    """No batch came from the feed within its deadline: the worker fails (Ray Train then
    restarts the group or the run ends in one line) instead of waiting for ever."""


def within(batches, seconds: float, what: str = "the feed"):
    """`batches` (an iterator), each item due within `seconds` of the previous one (0: no
    deadline); FeedStalled when one is not. Ray Data schedules its read and decode tasks
    on CPUs the workers do not hold: when a lost host leaves none (the replacement group took
    the last ones), they wait for a CPU, and the workers for them, with nothing said. The
    iterator runs in a thread of its own, one batch ahead, so that the wait can end."""
    if not seconds:
        yield from batches
        return
    q: queue.Queue = queue.Queue(maxsize=1)
    done = threading.Event()

    def put(item) -> bool:  # False once the consumer has gone (the thread then ends)
        while not done.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    def pump():
        try:
            for b in batches:
                if not put(("batch", b)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", e))

    threading.Thread(target=pump, name="feed", daemon=True).start()
    try:
        while True:
            try:
                kind, item = q.get(timeout=seconds)
            except queue.Empty:
                raise FeedStalled(f"no batch from {what} in {seconds:g} s (Ray Data's tasks may be "
                                  "waiting for a CPU that no host has free: see feed_timeout_s)") from None
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        done.set()


class ShardBatches:
    """A worker's batches, epoch after epoch, as {'x': uint8 [B,H,W], 'label': int64 [B]}.

    The first epoch streams the Ray Data shard. With `cache`, the deterministic preprocessed
    uint8 arrays are kept (image_size^2 bytes an image: 113 MB for all 4.4k training images
    at 160 px) and later epochs reshuffle them in memory instead of decoding JPEGs again;
    random augmentation still happens per batch, after the cache. For datasets too large for
    worker memory, turn `cache` off and every epoch streams. A shard may be empty (a rank
    that got no validation rows): it yields nothing, and is cached as empty, so it never
    asks the (collective) streaming split for an epoch the other ranks do not."""

    def __init__(self, it, loader_kw: dict, cache: bool, shuffle: bool, drop_last: bool,
                 seed: int, pin: bool = False, stall_s: float = 0.0):
        self.it, self.kw, self.cache, self.shuffle, self.drop_last = it, loader_kw, cache, shuffle, drop_last
        self.seed, self.pin, self.x, self.y = seed, pin, None, None
        self.stall_s = stall_s  # a streamed batch's deadline (`within`); 0: none
        self.wait = 0.0  # seconds the last epoch's consumer waited for its batches (feed stalls)

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                     drop_last: bool, seed: int, pin: bool = False) -> "ShardBatches":
        """Already-preprocessed rows held in memory (benchmarks, tests)."""
        s = cls(None, {"batch_size": batch_size}, True, shuffle, drop_last, seed, pin)
        s.x, s.y = x, y
        return s

    def epoch(self, epoch: int):
        """The epoch's batches; `wait` counts the seconds spent getting them (not using them)."""
        self.wait = 0.0
        t = time.perf_counter()
        for b in self._batches(epoch):
            self.wait += time.perf_counter() - t
            yield b
            t = time.perf_counter()

    def _batches(self, epoch: int):
        bs = self.kw["batch_size"]
        if self.x is None:
            xs, ys = [], []
            extra = dict(local_shuffle_buffer_size=4 * bs, local_shuffle_seed=self.seed + epoch) \
                if self.shuffle else {}
            stream = self.it.iter_torch_batches(**self.kw, drop_last=self.drop_last, **extra)
            for b in within(stream, self.stall_s, "Ray Data's shard of this worker"):
                if self.cache:
                    xs.append(b["x"])
                    ys.append(b["label"])
                yield b
            if self.cache:
                self.x = torch.cat(xs) if xs else torch.zeros((0, 1, 1), dtype=torch.uint8)
                self.y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)
            return
        n = len(self.y)
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        stop = n - (n % bs) if self.drop_last else n
        for i in range(0, stop, bs):
            idx = order[i:i + bs]
            x, y = self.x[idx], self.y[idx]
            # a gathered batch is fresh memory: pin it so the copy to the GPU is asynchronous
            yield {"x": x.pin_memory(), "label": y.pin_memory()} if self.pin else {"x": x, "label": y}


# -- one epoch --------------------------------------------------------------------------------
def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and int64 labels to the device (asynchronous from pinned memory)."""
    return (batch["x"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True))


# -- precision --------------------------------------------------------------------------------
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def choose_precision(requested: str, device_type: str, bf16_supported: bool = False) -> str:
    """The precision a run trains in. `auto`: bf16 on a GPU that has it natively (compute
    capability 8.0 and newer: A100, A10G, L4, H100), fp16 with a gradient scaler on one that
    has not (T4 on g4dn, V100 on p3: the GPUs rented most cheaply), fp32 on a CPU (autocast
    there saves nothing for these networks). An explicit choice is kept, except bf16 on a GPU
    without it (emulated: slower than fp32)."""
    if requested == "auto":
        if device_type != "cuda":
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        raise ValueError("precision bf16 needs a GPU with native bf16 (compute capability 8.0 or newer): "
                         "use fp16 (or auto) on this one")
    if requested not in AUTOCAST:
        raise ValueError(f"precision must be auto or one of {', '.join(AUTOCAST)}, got {requested!r}")
    return requested


def device_precision(requested: str, device: torch.device) -> str:
    """choose_precision for this process's device."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return choose_precision(requested, device.type, bf16)


@dataclass
class Recipe:
    """Everything that trains a network besides its data, built once per worker
    (`training.recipe.build_recipe`): the loss, the optimiser and its schedule, random
    augmentation (its strength and the generator on the batch's device), and the optional
    parts: weight averaging, MixUp/CutMix, a teacher. `precision`: fp32, or bf16/fp16
    autocast (fp16 with `scaler`, a GradScaler, so small gradients do not underflow);
    `grad_clip`: the gradients' global norm is clipped to it (0 = off); `accum_steps`: batches
    whose gradients are summed before one optimiser step (the scheduler and the weight average
    count optimiser steps); `channels_last`: the memory format the batches take; `tta`:
    validation runs the network with the test-time flips it will be served with; `sizes`: the
    side each epoch trains at (progressive resizing, `recipe.train_sizes`; () = the batches'
    own), validation always at the batches' own."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    aug_strength: float
    generator: torch.Generator
    ema: EMA | None = None
    mixer: Mixer | None = None
    teacher: Teacher | None = None
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float = 0.0
    accum_steps: int = 1
    channels_last: bool = False
    tta: bool = False
    sizes: tuple[int, ...] = ()

    def served(self, raw: nn.Module) -> nn.Module:
        """The weights validated, checkpointed and published: the average when there is one."""
        return self.ema.module if self.ema is not None else raw


def _optimizer_step(model: nn.Module, r: Recipe) -> None:
    """One optimiser step from the gradients summed so far, then the schedule and the average."""
    if r.scaler is not None:
        r.scaler.unscale_(r.optimizer)  # clip what the optimiser will see, not the scaled values
    if r.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
    if r.scaler is not None:
        r.scaler.step(r.optimizer)  # skipped when the fp16 gradients overflowed
        r.scaler.update()
    else:
        r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.scheduler.step()
    if r.ema is not None:
        r.ema.update(model)


def train_one_epoch(model: nn.Module, batches, recipe: Recipe, device: torch.device,
                    size: int | None = None) -> torch.Tensor:
    """One pass over `batches`; returns the all-reduced float64 tensor [loss x n, correct, n]
    on `device`. Augmentation runs on the device with the recipe's generator; the mixer, if
    any, mixes batches after augmentation (accuracy then counts the dominant label); the
    teacher, if any, adds its distillation term, weighted against the label loss by its
    `weight`. With accum_steps k, every k batches make one optimiser step, and DDP all-reduces
    only on the k-th backward (`no_sync` before it); a last group of fewer than k batches is
    not stepped (its gradients are dropped, as drop_last drops a partial batch), so every
    rank makes the same steps. `size`: the side to train at (resized before augmentation)."""
    r = recipe
    k = max(1, r.accum_steps)
    dtype = AUTOCAST[r.precision]
    model.train()
    r.optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
    for i, batch in enumerate(batches):
        x, y = to_device(batch, device)
        x = to_unit(x)
        if size is not None:
            x = resize(x, size)
        x = normalise(augment(x, r.aug_strength, r.generator))
        y2, lam = y, 1.0
        if r.mixer is not None:
            x, y2, lam = r.mixer(x, y, r.generator)
        if r.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        stepping = (i + 1) % k == 0
        # DDP decides in the forward whether the backward all-reduces: both inside no_sync
        with nullcontext() if stepping or not hasattr(model, "no_sync") else model.no_sync():
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
                taught = r.teacher(x) if r.teacher is not None else None
            loss = r.criterion(out.float(), y)
            if lam < 1.0:
                loss = lam * loss + (1.0 - lam) * r.criterion(out.float(), y2)
            if taught is not None:
                loss = (1.0 - r.teacher.weight) * loss + r.teacher.weight * r.teacher.loss(out, taught)
            ((r.scaler.scale(loss) if r.scaler is not None else loss) / k).backward()
        if stepping:
            _optimizer_step(model, r)
        # in-place adds of device values and Python scalars: no host-to-device copy, no sync
        n = y.shape[0]
        sums[0] += loss.detach().double() * n
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += n
    r.optimizer.zero_grad(set_to_none=True)  # a partial last group: dropped
    return all_reduce_sum(sums)


@torch.no_grad()
def evaluate(model: nn.Module, batches, num_classes: int, device: torch.device,
             precision: str = "fp32", channels_last: bool = False, tta: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Confusion matrix (rows = true class) and loss sum over this rank's `batches`, summed
    across ranks: the same numbers a single process gets on all the rows. `model` must be
    the plain module, never the DDP wrapper (see the module docstring).

    `tta`: score the network as it will be served, with its test-time flips
    (models.decision.InferenceNet, the one implementation). The best epoch and early
    stopping follow this score; without the flips they would pick the epoch whose unflipped
    predictions happened to land best, and a network with flips is another classifier: on
    two recipe runs 2-3 % of validation images changed class when flipped."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("evaluate() takes the unwrapped module (model.module), not DDP")
    model.eval()
    net = InferenceNet(model, tta=True) if tta else model
    k = num_classes
    stats = torch.zeros(k * k + 1, dtype=torch.float64, device=device)  # confusion, loss sum
    ce = nn.CrossEntropyLoss(reduction="sum")
    for batch in batches:
        x, y = to_device(batch, device)
        x = normalise(to_unit(x))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = AUTOCAST[precision]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = net(x).float()
        stats[-1] += ce(out, y).double()
        stats[:-1] += torch.bincount(y * k + out.argmax(1), minlength=k * k).double()
    all_reduce_sum(stats)
    return stats[:-1].view(k, k).cpu(), stats[-1:].cpu()


class Stopwatch:
    """Wall seconds of a region; on CUDA it synchronises first, so queued kernels count."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


# -- the epoch loop ---------------------------------------------------------------------------
@dataclass
class FitState:
    """What a run carries from epoch to epoch (and across resumes, in the checkpoint)."""

    start: int = 0  # the next epoch to train
    best: float = -1.0  # best validation macro-F1 so far
    bad: int = 0  # epochs since it last improved
    history: list = field(default_factory=list)  # one epoch_metrics row per epoch, no confusion
    resumes: list = field(default_factory=list)  # the epochs the run resumed at


def epoch_metrics(epoch: int, tr: torch.Tensor, cm: torch.Tensor, vloss: torch.Tensor,
                  classes: list[str], lr: float, seconds: float, train_seconds: float,
                  resumes: int, feed_wait: float = 0.0, train_size: int | None = None) -> dict:
    """One epoch's report: train sums [loss*n, correct, n] and the validation confusion
    matrix (both already summed over ranks) in the metrics schema (val_ prefixed).
    `feed_wait`: the seconds of `train_seconds` this rank waited for batches (a starved
    model: more CPUs for Ray Data, or the cache); `train_size`: the side it trained at under
    progressive resizing (None: the image size)."""
    vm = M.from_confusion(cm.numpy(), classes)
    n = max(1.0, tr[2].item())
    return {
        "epoch": epoch, "epochs_done": epoch + 1, "train_loss": tr[0].item() / n,
        "train_accuracy": tr[1].item() / n, "train_images": int(tr[2].item()),
        "val_loss": vloss.item() / max(1, vm["n"]), "lr": lr, "epoch_seconds": seconds,
        "train_seconds": train_seconds, "train_feed_wait_seconds": feed_wait,
        "train_images_per_s": tr[2].item() / max(train_seconds, 1e-9), "train_image_size": train_size,
        **{f"val_{key}": v for key, v in vm.items()},
        "val_confusion": cm.numpy().astype(int).tolist(), "resumes": resumes,
    }


def fit(model: nn.Module, recipe: Recipe, train_src, val_src, classes: list[str], device: torch.device,
        *, epochs: int, patience: int = 0, time_budget_min: float = 0.0, state: FitState | None = None,
        on_epoch=None) -> FitState:
    """The epoch loop every run trains with: a Ray Train worker (training.train), the sweep
    and the benchmarks. Each epoch trains on `train_src` (ShardBatches), validates the
    served weights (`recipe.served`) on `val_src`, and tracks the best validation macro-F1
    for early stopping (`patience` epochs without a gain; 0 = off) and the time budget
    (training minutes across resumes; 0 = off). `model` may be the DDP wrapper; validation
    runs the module inside it. `on_epoch(epoch, metrics, state, stop)` runs after each
    epoch's bookkeeping, on every rank (the worker checkpoints and reports there); `metrics`
    holds the validation confusion matrix, the history row does not."""
    raw = getattr(model, "module", model)
    run = state or FitState()
    clock = Stopwatch(device)
    for epoch in range(run.start, epochs):
        t0 = clock.now()
        size = recipe.sizes[epoch] if epoch < len(recipe.sizes) else None
        tr = train_one_epoch(model, train_src.epoch(epoch), recipe, device, size).cpu()
        t_train = clock.now() - t0
        cm, vloss = evaluate(recipe.served(raw), val_src.epoch(epoch), len(classes), device,
                             precision=recipe.precision, channels_last=recipe.channels_last, tta=recipe.tta)
        metrics = epoch_metrics(epoch, tr, cm, vloss, classes, recipe.scheduler.get_last_lr()[0],
                                clock.now() - t0, t_train, len(run.resumes), getattr(train_src, "wait", 0.0),
                                size)
        improved = metrics[METRIC] > run.best
        # an epoch trained below the final side does not count against patience: validation
        # runs at the full side, where a network trained smaller scores below what it will
        counts = size is None or size == recipe.sizes[-1]
        run.best, run.bad = (metrics[METRIC], 0) if improved else (run.best, run.bad + counts)
        metrics["best_val_macro_f1"] = run.best
        run.history.append({key: v for key, v in metrics.items() if key != "val_confusion"})
        run.start = epoch + 1
        # the time budget counts training seconds across resumes; ranks' clocks differ, so
        # they agree on stopping (one rank leaving early would hang the rest)
        spent = sum(h["epoch_seconds"] for h in run.history) / 60
        over = agree_any(time_budget_min > 0 and spent >= time_budget_min, device)
        stop = (patience > 0 and run.bad >= patience) or over
        if on_epoch is not None:
            on_epoch(epoch, metrics, run, stop)
        if stop:
            break
    return run
