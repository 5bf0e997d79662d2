"""The data-parallel training step on one GPU, without Ray: throughput, where the step's
time goes, peak memory, and that validation through the collectives matches a plain one.

It drives the project's own pieces (`brainmri.training.engine.train_one_epoch` / `evaluate` /
`all_reduce_sum`, `ShardBatches`, `transforms.preprocess_many`, the model registry) under a real
one-rank process group: NCCL on CUDA (so any CPU tensor that reached a collective would
fail here as it would on a cluster), gloo with `--device cpu` (what CI runs, a few steps).
It needs only PyTorch, torchvision, NumPy, Pillow and PyYAML, so it runs on a bare GPU
machine. Input: real scans in class folders (Kaggle layout), preprocessed here.

    python -m benchmarks.gpu                                  # all four models on cuda
    python -m benchmarks.gpu --device cpu --models brainnet --steps 3 --size brainnet=64

Per model it prints training images/s (bf16 autocast + channels-last on CUDA), the share of a
step's time that the host-to-device copy and the augmentation alone take (each timed in
isolation over the same batches, so it is an upper bound where the copy overlaps compute),
peak GPU memory, and whether validation metrics equal a plain single-forward evaluation.
With `--teacher-members K` it also times the step taught by an ensemble of K copies of the
network (distillation, `engine.Teacher`: the teacher in bf16 on the device as well).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from brainmri.config import CLASSES, RECIPE_SHAPES
from brainmri.core.metrics import from_confusion
from brainmri.data.transforms import augment, normalise, preprocess_many, to_unit
from brainmri.models.zoo import count_params, create_model
from brainmri.training import engine
from brainmri.training.engine import ShardBatches, Stopwatch, evaluate, to_device, train_one_epoch

if __package__:  # python -m benchmarks.gpu, the documented form
    from .harness import data_root, read_scans
else:  # python benchmarks/gpu.py (tests/training/test_engine.py runs it so): benchmarks/ is on sys.path
    from harness import data_root, read_scans

SIZES = {"brainnet": 160, "resnet50": 224, "efficientnet_b0": 224, "convnext_tiny": 224}


def init_group(device: torch.device) -> str:
    """A real one-rank process group, as Ray Train creates per worker (NCCL on CUDA)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return backend


def timed(clock: Stopwatch, fn) -> float:
    t0 = clock.now()
    fn()
    return clock.now() - t0


def bench_model(name: str, size: int, xs: torch.Tensor, ys: torch.Tensor, args, device) -> dict:
    cuda = device.type == "cuda"
    n_val = max(len(CLASSES), len(ys) // 5)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ys), generator=g)
    val_idx, train_idx = order[:n_val], order[n_val:]
    torch.manual_seed(0)
    raw = create_model(name, len(CLASSES), 1, image_size=size, **RECIPE_SHAPES.get(name, {}))
    params = count_params(raw)
    raw = raw.to(device)
    if cuda:
        raw = engine.to_channels_last(raw)
    model = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if cuda else None)
    model = engine.compiled(model, args.compile)  # as brainmri train --compile does
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.lr_lambda(0.1, 1, args.warmup + args.steps))
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    gen = torch.Generator(device=device).manual_seed(0)
    src = ShardBatches.from_tensors(xs[train_idx], ys[train_idx], args.batch_size, True, True, 0, pin=cuda)

    def batches(k: int):
        """k batches, wrapping round the sample's epochs (it is small on purpose)."""
        return itertools.islice(itertools.chain.from_iterable(src.epoch(e) for e in itertools.count()), k)

    def step(k, teacher=None, source=batches):
        recipe = engine.Recipe(crit, opt, sched, args.aug_strength, gen, teacher=teacher,
                               precision=engine.device_precision("auto", device), channels_last=cuda)
        return train_one_epoch(model, source(k), recipe, device)

    # the same loop on data already on the device (one real batch, reused): the step's own
    # rate, what the host side (gather, pin, copy) is measured against
    resident = {k: v.to(device) for k, v in next(iter(batches(1))).items()}

    def synthetic(k: int):
        return itertools.repeat(resident, k)

    clock = Stopwatch(device)
    step(args.warmup)  # cuDNN autotuning, allocator growth, lazy inits
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_step = timed(clock, lambda: step(args.steps))
    t_resident = timed(clock, lambda: step(args.steps, source=synthetic))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")

    def copy_only():
        for b in batches(args.steps):
            to_device(b, device)

    def copy_and_augment():
        for b in batches(args.steps):
            x, _ = to_device(b, device)
            normalise(augment(to_unit(x), args.aug_strength, gen))

    taught = {}
    if args.teacher_members:  # distillation (--teacher): an ensemble of copies taught on the batch
        members = [{"model": name, "model_args": RECIPE_SHAPES.get(name, {})}] * args.teacher_members
        net = create_model("ensemble", len(CLASSES), 1, image_size=size, members=members).to(device)
        teacher = engine.Teacher(engine.to_channels_last(net) if cuda else net, 0.5, 1.0)
        step(args.warmup, teacher)
        t_taught = timed(clock, lambda: step(args.steps, teacher))
        out = step(1, teacher).cpu()
        taught = {"teacher_members": args.teacher_members, "taught_step_ms": 1e3 * t_taught / args.steps,
                  "taught_train_loss": float(out[0] / max(1.0, out[2]))}
        del teacher, net

    t_copy = timed(clock, copy_only)
    t_aug = timed(clock, copy_and_augment) - t_copy
    last = step(1).cpu()  # one more step to report a finite training loss

    # validation: through the engine (its own batches, the collective) vs one plain forward
    def val_batches():
        return ShardBatches.from_tensors(xs[val_idx], ys[val_idx], args.batch_size, False, False, 0,
                                         pin=cuda).epoch(0)

    cm, vloss = evaluate(raw, val_batches(), len(CLASSES), device, channels_last=cuda)
    cm_amp, _ = evaluate(raw, val_batches(), len(CLASSES), device,
                         precision=engine.device_precision("auto", device), channels_last=cuda)
    with torch.no_grad():
        raw.eval()
        x = normalise(to_unit(xs[val_idx].to(device)))
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = raw(x).float()
        plain_pred = logits.argmax(1).cpu()
        plain_loss = nn.functional.cross_entropy(logits, ys[val_idx].to(device), reduction="sum").item()
    plain_cm = torch.bincount(ys[val_idx] * len(CLASSES) + plain_pred, minlength=len(CLASSES) ** 2)
    plain_cm = plain_cm.view(len(CLASSES), len(CLASSES)).double()
    engine_m = from_confusion(cm.numpy(), list(CLASSES))
    plain_m = from_confusion(plain_cm.numpy(), list(CLASSES))
    steps_imgs = args.steps * args.batch_size
    if cuda:
        torch.cuda.empty_cache()
    return {
        "model": name, "image_size": size, "params": params, "batch_size": args.batch_size,
        "backend": dist.get_backend(), "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if cuda else "cpu", "bf16_channels_last": cuda,
        "steps": args.steps, "images_per_s": steps_imgs / t_step, "step_ms": 1e3 * t_step / args.steps,
        "compile": args.compile, "resident_images_per_s": steps_imgs / t_resident,
        "host_path_ratio": t_resident / t_step,  # 1.0: the host side costs the step nothing
        "copy_share": min(1.0, t_copy / t_step), "augment_share": max(0.0, min(1.0, t_aug / t_step)),
        "peak_gpu_gib": peak, "train_loss": float(last[0] / max(1.0, last[2])),
        "val_rows": int(len(val_idx)), "val_accuracy": engine_m["accuracy"],
        "val_accuracy_plain": plain_m["accuracy"], "val_accuracy_bf16": from_confusion(
            cm_amp.numpy(), list(CLASSES))["accuracy"],
        "val_match": bool(torch.equal(cm, plain_cm)),
        "val_loss_diff": abs(vloss.item() - plain_loss) / max(1e-12, abs(plain_loss)),
        **taught,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    ap.add_argument("--data", type=Path, default=None,
                    help=f"class folders of real scans, or their parent (default: {data_root()})")
    ap.add_argument("--per-class", type=int, default=100, help="scans per class in the sample")
    ap.add_argument("--models", default=",".join(SIZES), help="comma-separated registry names")
    ap.add_argument("--size", action="append", default=[], metavar="MODEL=PX",
                    help="input size per model (default: brainnet=160, others 224)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50, help="timed training steps per model")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the DDP model (as brainmri train --compile)")
    ap.add_argument("--aug-strength", type=float, default=1.0)
    ap.add_argument("--teacher-members", type=int, default=0,
                    help="also time the steps taught by an ensemble of this many copies (distillation)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.teacher_members < 0 or args.teacher_members == 1:
        ap.error("--teacher-members: an ensemble needs at least 2 (0 = no teacher)")
    sizes = dict(SIZES, **{k: int(v) for k, v in (s.split("=", 1) for s in args.size)})
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device here; use --device cpu")
        device = torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    backend = init_group(device)

    # the guard at the single place collectives are called: a tensor off the group's device
    # is refused with one sentence (under NCCL a CPU tensor would otherwise fail deep inside)
    off = torch.device("meta") if device.type == "cpu" else torch.device("cpu")
    try:
        engine.all_reduce_sum(torch.ones(1, device=off))
        print(f"collective guard: a {off.type} tensor was NOT refused under {backend}")
        guard = False
    except RuntimeError as e:
        print(f"collective guard: {e}")
        guard = True

    t0 = time.time()
    data, labels = read_scans(args.per_class, root=args.data)  # the first per_class of each class
    labels = np.asarray(labels, dtype=np.int64)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    by_size = {}
    for s in sorted({sizes.get(m, 224) for m in models}):
        by_size[s] = torch.from_numpy(preprocess_many(data, s))
    ys = torch.from_numpy(labels)
    print(f"sample: {len(data)} real scans ({sum(map(len, data)) / 1e6:.1f} MB encoded), "
          f"preprocessed at {sorted(by_size)} px in {time.time() - t0:.1f} s; backend {backend} on {device}"
          + (f" ({torch.cuda.get_device_name(device)}, torch {torch.__version__})"
             if device.type == "cuda" else ""))

    rows = []
    for m in models:
        rows.append(bench_model(m, sizes.get(m, 224), by_size[sizes.get(m, 224)], ys, args, device))
        r = rows[-1]
        print(f"  {m}: {r['images_per_s']:.0f} img/s ({r['host_path_ratio']:.2f}x of the same loop on "
              f"device-resident data, {r['resident_images_per_s']:.0f} img/s)" + (
            f"; taught by an ensemble of {r['teacher_members']}: {r['taught_step_ms']:.1f} ms a step "
            f"against {r['step_ms']:.1f}" if "teacher_members" in r else ""), flush=True)
    dist.destroy_process_group()

    hdr = f"{'model':<16}{'px':>5}{'params':>8}{'img/s':>9}{'ms/step':>9}{'copy':>7}{'augment':>9}" \
          f"{'peak GiB':>10}{'val acc':>9}{'= plain':>9}"
    print(f"\nbatch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up; "
          f"{'bf16 autocast + channels-last' if device.type == 'cuda' else 'fp32'}"
          f"{'; torch.compile' if args.compile else ''}; {backend}")
    print(hdr)
    for r in rows:
        print(f"{r['model']:<16}{r['image_size']:>5}{r['params'] / 1e6:>7.1f}M{r['images_per_s']:>9.0f}"
              f"{r['step_ms']:>9.1f}{r['copy_share']:>7.1%}{r['augment_share']:>9.1%}"
              f"{r['peak_gpu_gib']:>10.2f}{r['val_accuracy']:>9.3f}{str(r['val_match']):>9}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "backend": backend, "guard": guard,
                                         "torch": torch.__version__, "models": rows}, indent=1))
    return 0 if guard and all(r["val_match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
