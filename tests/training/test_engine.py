"""The worker loops without Ray: collectives only on the group's device, evaluation that a
rank with no rows cannot hang, empty shards, and the GPU benchmark's CPU mode."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brainmri.data.transforms import augment
from brainmri.models.zoo import create_model
from brainmri.training import engine
from brainmri.training.engine import Recipe, ShardBatches, all_reduce_sum, evaluate, train_one_epoch

from support.data import REPO, SHARED_DATA

K, SIZE = 4, 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, SIZE, SIZE), dtype=torch.uint8, generator=g),
            torch.randint(0, K, (n,), generator=g))


def _model():
    torch.manual_seed(0)
    return create_model("brainnet", K, 1, image_size=SIZE, width=8)


@pytest.fixture
def gloo_group():
    """A real one-rank gloo process group in this process."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_collective_refuses_a_tensor_off_the_groups_device(gloo_group):
    assert engine.group_device() == torch.device("cpu")
    t = torch.ones(3, dtype=torch.float64)
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(RuntimeError, match="collective on a tensor on meta.*gloo.*needs cpu"):
        all_reduce_sum(torch.ones(3, device="meta"))


def test_no_group_means_no_collective():
    assert engine.group_device() is None
    t = torch.ones(2)
    assert all_reduce_sum(t) is t


def test_every_collective_in_the_loops_goes_through_the_device_check(gloo_group, monkeypatch):
    """train_one_epoch and evaluate call collectives only via all_reduce_sum, with tensors on
    the loop's device: a spy on the raw collective sees only tensors on that device."""
    seen = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (seen.append(t.device), real(t, *a, **k))[1])
    x, y = _data(24)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batches = ShardBatches.from_tensors(x, y, 8, True, True, 0)
    dev = torch.device("cpu")
    tr = train_one_epoch(model, batches.epoch(0), Recipe(torch.nn.CrossEntropyLoss(), opt, sched, 1.0,
                                                         torch.Generator().manual_seed(0)), dev)
    assert tr[2].item() == 24 and tr.device == dev
    evaluate(model, ShardBatches.from_tensors(x, y, 8, False, False, 0).epoch(0), K, dev)
    assert engine.agree_any(False, dev) is False
    assert seen == [dev, dev, dev]  # one per loop, one for the stop vote: never per step


def test_evaluate_refuses_the_ddp_wrapper(gloo_group):
    ddp = torch.nn.parallel.DistributedDataParallel(_model())
    with pytest.raises(TypeError, match="unwrapped module"):
        evaluate(ddp, [], K, torch.device("cpu"))


def test_validation_scores_the_network_as_served_with_its_flips():
    """With tta, evaluate's confusion matrix and loss are those of the published network
    (models.decision's InferenceNet: the mean of the image's and its mirror's logits), not of
    the bare network; without, the bare network's."""
    from brainmri.data.transforms import to_model_input
    from brainmri.models.decision import wrap

    x, y = _data(24, seed=3)
    torch.manual_seed(3)  # a linear map of the pixels: far from mirror-symmetric
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, K)).eval()
    with torch.no_grad():
        bare = net(to_model_input(x))
        served = wrap(net, {"tta": True})(to_model_input(x))
    assert not torch.equal(bare.argmax(1), served.argmax(1))
    ce = torch.nn.CrossEntropyLoss(reduction="sum")
    for tta, logits in [(False, bare), (True, served)]:
        cm, loss = evaluate(net, ShardBatches.from_tensors(x, y, 5, False, False, 0).epoch(0), K,
                            torch.device("cpu"), tta=tta)
        want = torch.bincount(y * K + logits.argmax(1), minlength=K * K).view(K, K)
        assert cm.long().tolist() == want.tolist()
        assert loss.item() == pytest.approx(ce(logits, y).item(), rel=1e-5)


def _rank(rank: int, world: int, port: int, rows: list[int], out):
    """A real gloo rank: wraps the model in DDP (as Ray's prepare_model does), evaluates its
    own rows through the plain module and puts the summed stats in `out`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = _data(11)
    ddp = torch.nn.parallel.DistributedDataParallel(_model())
    mine = torch.as_tensor(rows, dtype=torch.int64)
    src = ShardBatches.from_tensors(x[mine], y[mine], 4, False, False, 0)
    for epoch in range(2):  # the second epoch comes from the (possibly empty) cache
        cm, loss = evaluate(ddp.module, src.epoch(epoch), K, torch.device("cpu"))
    out.put((rank, cm.tolist(), loss.item()))
    dist.destroy_process_group()


@pytest.mark.parametrize("split", [
    [list(range(11)), []],               # one rank has no rows at all
    [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10]],  # uneven remainders of a batch of 4
    [[0, 1, 2, 3], [], [4, 5, 6, 7, 8, 9, 10]],
], ids=["2-ranks-one-empty", "3-ranks-uneven", "3-ranks-one-empty"])
def test_ranks_with_uneven_or_no_rows_agree_with_a_single_process(split):
    # fresh processes (no fork of this one's torch threads), forked from one server that
    # imported torch once rather than each importing it again as spawn's do
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "brainmri.training.engine"])
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, len(split), port, split[r], q)) for r in range(len(split))]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    x, y = _data(11)
    cm1, loss1 = evaluate(_model(), ShardBatches.from_tensors(x, y, 11, False, False, 0).epoch(0),
                          K, torch.device("cpu"))
    for _, cm, loss in results:
        assert cm == cm1.tolist() and sum(map(sum, cm)) == 11
        assert loss == pytest.approx(loss1.item(), rel=1e-6)


def test_empty_shard_is_cached_as_empty_and_never_streams_again():
    class OnceOnly:
        calls = 0

        def iter_torch_batches(self, **kw):
            OnceOnly.calls += 1
            return iter(())

    src = ShardBatches(OnceOnly(), {"batch_size": 4}, cache=True, shuffle=False, drop_last=False, seed=0)
    assert list(src.epoch(0)) == [] and list(src.epoch(1)) == [] and list(src.epoch(2)) == []
    assert OnceOnly.calls == 1  # a streaming split is a collective: asking again alone would hang


def test_augment_runs_on_the_batch_device_with_its_generator():
    x = torch.rand(6, 1, SIZE, SIZE)
    a = augment(x.clone(), 1.0, torch.Generator().manual_seed(3))
    b = augment(x.clone(), 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.device == x.device and not torch.equal(a, x)
    if torch.cuda.is_available():  # on a GPU machine: the same function, generator on the GPU
        xc = x.cuda()
        assert augment(xc, 1.0, torch.Generator(device="cuda").manual_seed(3)).is_cuda


def test_gpu_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/gpu.py --device cpu: a few steps of the real loops under a gloo group, so
    the GPU check cannot rot where no GPU is."""
    if not (SHARED_DATA / "Training").is_dir():
        pytest.skip("shared data not found")
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--models", "brainnet",
                        "--per-class", "6", "--steps", "3", "--warmup", "1", "--batch-size", "8",
                        "--size", "brainnet=64", "--teacher-members", "2",
                        "--json", str(tmp_path / "gpu.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = json.loads((tmp_path / "gpu.json").read_text())
    (row,) = res["models"]
    assert row["model"] == "brainnet" and row["backend"] == "gloo" and row["images_per_s"] > 0
    assert row["val_match"] is True and 0 <= row["copy_share"] <= 1 and 0 <= row["augment_share"] <= 1
    assert np.isfinite(row["train_loss"])
    assert row["resident_images_per_s"] > 0 and row["host_path_ratio"] > 0 and row["compile"] is False
    assert row["teacher_members"] == 2 and row["taught_step_ms"] > 0 and np.isfinite(row["taught_train_loss"])


def test_channels_last_keeps_single_input_channel_weights_contiguous():
    m = engine.to_channels_last(_model())
    four_d = [(p.shape[1], p.is_contiguous(), p.is_contiguous(memory_format=torch.channels_last))
              for p in m.parameters() if p.dim() == 4]
    assert any(c == 1 for c, _, _ in four_d) and any(c > 1 for c, _, _ in four_d)
    for c, contiguous, cl in four_d:
        assert contiguous if c == 1 else cl  # the first conv stays as its gradient will be


def test_weight_average_follows_the_steps_with_a_warming_decay():
    from brainmri.training.engine import EMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.99)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(8, 3))  # moves the BatchNorm running stats and its counter
    ema.update(net)
    d = min(0.99, 2 / 11)  # the first update's decay: warm-up, not 0.99
    assert torch.allclose(ema.module[0].weight, d * start["0.weight"] + (1 - d) * net[0].weight)
    assert torch.allclose(ema.module[1].running_mean,
                          d * start["1.running_mean"] + (1 - d) * net[1].running_mean)
    assert ema.module[1].num_batches_tracked == net[1].num_batches_tracked  # copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters())
    # a training epoch updates it once per step
    x, y = torch.randint(0, 255, (10, 8, 8), dtype=torch.uint8), torch.randint(0, 2, (10,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    ema2 = EMA(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    src = ShardBatches.from_tensors(x, y, 4, True, True, 0)
    train_one_epoch(model, src.epoch(0), Recipe(torch.nn.CrossEntropyLoss(), opt, sched, 0.0, torch.Generator(),
                                                ema=ema2), torch.device("cpu"))
    assert ema2.updates == 2


def test_mixer_blends_or_pastes_a_partner_and_weights_its_label_by_what_it_kept():
    from brainmri.training.engine import Mixer

    g = torch.Generator().manual_seed(0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 16, 16).contiguous()
    y = torch.arange(4)
    assert Mixer(0.0, 0.4, 0.5, 0)(x, y, g)[2] == 1.0  # prob 0: never mixed
    assert Mixer(1.0, 0.4, 0.5, 0)(x[:1], y[:1], g)[2] == 1.0  # one image has no partner
    # MixUp: every pixel is lam * own + (1 - lam) * partner's; the partner label follows
    xm, y2, lam = Mixer(1.0, 0.4, 0.0, 1)(x, y, g)
    assert 0.5 <= lam < 1.0 and sorted(y2.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(xm[:, 0, 0, 0], lam * y.float() + (1 - lam) * y2.float())
    # CutMix: a box of the partner's pixels; lam is the share of the image that stayed
    for seed in range(20):
        xc, y2, lam = Mixer(1.0, 1.0, 1.0, seed)(x, y, g)
        kept = (xc[:, 0] == x[:, 0]).float().mean((1, 2))
        moved = y2 != y
        assert torch.allclose(kept[moved], torch.full_like(kept[moved], lam))
        assert 0.5 <= lam <= 1.0
    assert torch.equal(x[:, 0, 0, 0], torch.arange(4.0))  # the input batch is not modified
    # the same seed makes the same draws
    a, b = Mixer(0.5, 0.4, 0.5, 7), Mixer(0.5, 0.4, 0.5, 7)
    assert [a(x, y, torch.Generator().manual_seed(1))[2] for _ in range(10)] == \
           [b(x, y, torch.Generator().manual_seed(1))[2] for _ in range(10)]


def test_a_mixed_epoch_weights_the_loss_of_both_labels():
    from brainmri.training.engine import Mixer

    torch.manual_seed(0)
    x, y = torch.randint(0, 255, (8, 8, 8), dtype=torch.uint8), torch.tensor([0, 1] * 4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    seen = []

    class Spy(torch.nn.CrossEntropyLoss):
        def forward(self, out, target):
            seen.append(target.clone())
            return super().forward(out, target)

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    src = ShardBatches.from_tensors(x, y, 8, False, True, 0)
    sums = train_one_epoch(model, src.epoch(0), Recipe(Spy(), opt, sched, 0.0, torch.Generator().manual_seed(0),
                                                       mixer=Mixer(1.0, 0.4, 0.0, 3)), torch.device("cpu"))
    assert len(seen) == 2 and torch.equal(seen[0], y) and not torch.equal(seen[1], y)
    assert sums[2] == 8


def test_wait_counts_the_time_spent_getting_batches_not_using_them():
    """`ShardBatches.wait`: a slow feed shows up there (train_feed_wait_seconds), a slow
    consumer does not; it restarts every epoch, and the stream still passes every row."""
    import time

    class SlowStream:
        def iter_torch_batches(self, **kw):
            for i in range(3):
                time.sleep(0.05)
                yield {"x": torch.zeros(2, 4, 4, dtype=torch.uint8), "label": torch.full((2,), i)}

    src = ShardBatches(SlowStream(), {"batch_size": 2}, cache=False, shuffle=False, drop_last=False, seed=0)
    for epoch in range(2):
        labels = []
        for b in src.epoch(epoch):
            time.sleep(0.3)  # the consumer's own time: 0.9 s an epoch, none of it waiting
            labels += b["label"].tolist()
        assert labels == [0, 0, 1, 1, 2, 2]
        assert 0.15 <= src.wait < 0.6


def test_fit_is_the_epoch_loop_stopping_early_and_resuming_where_it_left_off():
    """engine.fit: every epoch reported to on_epoch with its confusion matrix, history rows
    without it, patience ends the run, and a FitState picks up at its next epoch."""
    from brainmri.training.engine import FitState, fit

    x, y = _data(24)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing learns: macro-F1 never improves
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    recipe = Recipe(torch.nn.CrossEntropyLoss(), opt, sched, 0.0, torch.Generator().manual_seed(0))
    train = ShardBatches.from_tensors(x, y, 8, True, True, 0)
    val = ShardBatches.from_tensors(x, y, 8, False, False, 0)
    seen = []

    def on_epoch(epoch, metrics, state, stop):
        seen.append((epoch, stop, len(metrics["val_confusion"]), len(state.history)))

    dev = torch.device("cpu")
    run = fit(model, recipe, train, val, [str(k) for k in range(K)], dev, epochs=10, patience=2,
              on_epoch=on_epoch)
    assert [s[0] for s in seen] == [0, 1, 2] and [s[1] for s in seen] == [False, False, True]
    assert all(s[2] == K for s in seen) and [s[3] for s in seen] == [1, 2, 3]
    assert run.start == 3 and run.bad == 2 and "val_confusion" not in run.history[0]
    assert run.history[0]["train_images"] == 24 and run.history[-1]["best_val_macro_f1"] == run.best

    seen.clear()
    again = fit(model, recipe, train, val, [str(k) for k in range(K)], dev, epochs=5,
                state=FitState(start=3, best=run.best, history=list(run.history)), on_epoch=on_epoch)
    assert [s[0] for s in seen] == [3, 4] and len(again.history) == 5


def test_progressive_resizing_trains_each_epoch_at_its_stage_and_validates_at_full_size():
    """cfg.start_image_size: equal stages of 16 px up to image_size, the last at image_size;
    fit trains each epoch at its stage's side (the history says which) and validates at the
    batches' own side; a resumed run picks the same sizes up."""
    from brainmri.config import ConfigError, TrainConfig
    from brainmri.training.engine import FitState, fit
    from brainmri.training.recipe import train_sizes

    sizes = train_sizes(TrainConfig(image_size=160, start_image_size=80, epochs=40))
    assert sorted(set(sizes)) == [80, 96, 112, 128, 144, 160] and list(sizes) == sorted(sizes)
    assert sizes.count(160) >= 6 and sizes[-1] == 160 and len(sizes) == 40
    assert train_sizes(TrainConfig(image_size=160, start_image_size=150, epochs=3)) == (150, 150, 160)
    # fewer epochs than stages: the first and the last are kept
    assert train_sizes(TrainConfig(image_size=160, start_image_size=80, epochs=3)) == (80, 112, 160)
    assert train_sizes(TrainConfig(image_size=160, start_image_size=80, epochs=1)) == (160,)
    assert train_sizes(TrainConfig(start_image_size=0)) == ()
    assert train_sizes(TrainConfig(start_image_size=160)) == ()
    assert train_sizes(TrainConfig(image_size=64, start_image_size=80)) == ()  # a small run: off
    with pytest.raises(ConfigError, match="start_image_size"):
        TrainConfig(start_image_size=16).validate()

    x, y = _data(16)
    model = _model()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    recipe = Recipe(torch.nn.CrossEntropyLoss(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                    0.5, torch.Generator().manual_seed(0), sizes=(SIZE // 2, SIZE // 2 + 8, SIZE))
    train = ShardBatches.from_tensors(x, y, 8, True, True, 0)
    val = ShardBatches.from_tensors(x, y, 8, False, False, 0)
    run = fit(model, recipe, train, val, [str(k) for k in range(K)], torch.device("cpu"), epochs=2)
    trained = [s for t, s in seen if t]
    assert trained == [SIZE // 2] * 2 + [SIZE // 2 + 8] * 2 and {s for t, s in seen if not t} == {SIZE}
    assert [h["train_image_size"] for h in run.history] == [SIZE // 2, SIZE // 2 + 8]
    seen.clear()
    fit(model, recipe, train, val, [str(k) for k in range(K)], torch.device("cpu"), epochs=3,
        state=FitState(start=2, best=run.best, history=list(run.history)))
    assert {s for t, s in seen if t} == {SIZE}

    # patience counts only epochs at the final side: nothing learns (lr 0), yet the two small
    # epochs do not stop the run
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    still = Recipe(torch.nn.CrossEntropyLoss(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                   0.0, torch.Generator().manual_seed(0), sizes=(SIZE // 2,) * 3 + (SIZE,) * 3)
    stuck = fit(model, still, train, val, [str(k) for k in range(K)], torch.device("cpu"), epochs=6,
                patience=2)
    assert len(stuck.history) == 5 and stuck.bad == 2  # without the rule: 3 (epochs 1, 2 counted)


@pytest.mark.parametrize("requested,device,bf16,want", [
    ("auto", "cuda", True, "bf16"),  # A100, A10G, L4, H100
    ("auto", "cuda", False, "fp16"),  # T4, V100: no native bf16, fp16 with a gradient scaler
    ("auto", "cpu", False, "fp32"),
    ("fp32", "cuda", True, "fp32"), ("fp16", "cuda", True, "fp16"), ("bf16", "cpu", False, "bf16"),
])
def test_precision_is_chosen_by_what_the_device_can_do(requested, device, bf16, want):
    assert engine.choose_precision(requested, device, bf16) == want


def test_bf16_is_refused_on_a_gpu_without_it():
    with pytest.raises(ValueError, match="native bf16 .*use fp16"):
        engine.choose_precision("bf16", "cuda", False)


def _linear_recipe(model, lr=0.1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Recipe(torch.nn.CrossEntropyLoss(), opt, sched, 0.0, torch.Generator().manual_seed(0), **kw)


def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, K))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_the_cpu_has_trains(precision):
    """fp16 goes through a GradScaler (the recipe makes one for it), bf16 and fp16 autocast."""
    from brainmri.config import TrainConfig
    from brainmri.training.recipe import build_recipe

    x, y = _data(16)
    model = _linear()
    before = [p.detach().clone() for p in model.parameters()]
    recipe = build_recipe(TrainConfig(precision=precision, ema_decay=0.0, mix_prob=0.0), model, [4] * K,
                          torch.device("cpu"), 2, channels_last=False)
    assert recipe.precision == precision and (recipe.scaler is not None) == (precision == "fp16")
    sums = train_one_epoch(model, ShardBatches.from_tensors(x, y, 8, False, True, 0).epoch(0), recipe,
                           torch.device("cpu"))
    assert sums[2] == 16 and torch.isfinite(sums[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    cm, _ = evaluate(model, ShardBatches.from_tensors(x, y, 8, False, False, 0).epoch(0), K,
                     torch.device("cpu"), precision=precision)
    assert cm.sum() == 16


def test_accumulating_k_batches_is_one_step_of_a_k_times_larger_batch():
    """For a network without batch statistics: 2 accumulated batches of 4 = 1 batch of 8
    (the same rows, no augmentation), and a last lone batch is not stepped."""
    x, y = _data(16)
    big, small = _linear(), _linear()
    train_one_epoch(big, ShardBatches.from_tensors(x, y, 8, False, True, 0).epoch(0), _linear_recipe(big),
                    torch.device("cpu"))
    acc = _linear_recipe(small, accum_steps=2)
    train_one_epoch(small, ShardBatches.from_tensors(x, y, 4, False, True, 0).epoch(0), acc, torch.device("cpu"))
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert acc.scheduler.last_epoch == 2  # optimiser steps, not batches
    # 3 batches with k = 2: one step, the third batch's gradients dropped
    lone = _linear()
    r = _linear_recipe(lone, accum_steps=2)
    train_one_epoch(lone, ShardBatches.from_tensors(x[:12], y[:12], 4, False, True, 0).epoch(0), r,
                    torch.device("cpu"))
    assert r.scheduler.last_epoch == 1 and all(p.grad is None for p in lone.parameters())


def test_ddp_all_reduces_only_on_the_stepping_batch(gloo_group):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    x, y = _data(16)
    calls = []

    def counting(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    for k, want in ((1, 4), (2, 2)):  # 4 batches: every one all-reduces, or only the 2nd and 4th
        calls.clear()
        ddp = torch.nn.parallel.DistributedDataParallel(_linear())
        ddp.register_comm_hook(None, counting)
        train_one_epoch(ddp, ShardBatches.from_tensors(x, y, 4, False, True, 0).epoch(0),
                        _linear_recipe(ddp, accum_steps=k), torch.device("cpu"))
        assert len(calls) == want, k


def test_gradients_are_clipped_to_their_global_norm(monkeypatch):
    x, y = _data(8)
    model = _linear()
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, n: (seen.append(n), real(p, n))[1])
    train_one_epoch(model, ShardBatches.from_tensors(x, y, 8, False, True, 0).epoch(0),
                    _linear_recipe(model, grad_clip=0.5), torch.device("cpu"))
    assert seen == [0.5]
    train_one_epoch(model, ShardBatches.from_tensors(x, y, 8, False, True, 0).epoch(1),
                    _linear_recipe(model), torch.device("cpu"))
    assert seen == [0.5]  # 0 = off


def _slow(items, pause_after: int, pause_s: float):
    for i, x in enumerate(items):
        if i == pause_after:
            time.sleep(pause_s)
        yield x


def test_within_passes_every_batch_in_order_and_ends():
    assert list(engine.within(iter(range(50)), 5.0)) == list(range(50))
    assert list(engine.within(iter([]), 5.0)) == []
    assert list(engine.within(iter(range(3)), 0)) == [0, 1, 2]  # no deadline: the iterator itself


def test_within_fails_a_batch_later_than_its_deadline():
    got = []
    t0 = time.monotonic()
    with pytest.raises(engine.FeedStalled, match=r"no batch from the test feed in 0.5 s"):
        for x in engine.within(_slow(range(10), 3, 30.0), 0.5, "the test feed"):
            got.append(x)
    assert got == [0, 1, 2] and time.monotonic() - t0 < 5  # failed at the deadline, not after the wait


def test_within_raises_the_feeds_own_error():
    def broken():
        yield 1
        raise OSError("shard unreadable")

    with pytest.raises(OSError, match="shard unreadable"):
        list(engine.within(broken(), 5.0))
