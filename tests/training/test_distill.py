"""training.distill and engine.Teacher (`--teacher MODEL`): the loss pulls the network
towards the teacher's probabilities on the batch it trains on; a teacher that could have
seen this version's held-out images, or that takes other input or classes, is refused
before Ray starts; workers load exactly the file the driver checked. Real scans, teachers
fitted in this process (seconds, no Ray); the Ray run is in test_train.py."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from brainmri.config import ConfigError, EnsembleConfig, TrainConfig
from brainmri.core.storage import open_location
from brainmri.data.datasets import manifest_hash, resolve_dataset
from brainmri.data.transforms import to_model_input
from brainmri.models.checkpoints import build_model, load_model_state
from brainmri.models.zoo import create_model
from brainmri.training.distill import load_teacher, teacher_record
from brainmri.training.engine import Recipe, ShardBatches, Teacher, train_one_epoch
from brainmri.training.ensemble import combine

from support.data import CLASSES
from support.tiny import MODEL_ARGS, SIZE, small_lake, train_inprocess

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("brainnet", 4, 1, image_size=32, width=8)


class _Scale(torch.nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(p, q) for p, q in pairs)


def _fit(teacher: Teacher | None, labels: torch.Tensor, x: torch.Tensor, steps: int = 3) -> torch.nn.Module:
    """The same network, the same batches, the same augmentation draws: only the loss differs."""
    model = _net(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    batches = ShardBatches.from_tensors(x, labels, 16, shuffle=False, drop_last=True, seed=0)
    for epoch in range(steps):
        recipe = Recipe(torch.nn.CrossEntropyLoss(), opt, sched, 0.5, torch.Generator().manual_seed(epoch),
                        teacher=teacher)
        train_one_epoch(model, batches.epoch(epoch), recipe, torch.device("cpu"))
    return model


def test_the_teacher_term_is_hintons_kl_and_replaces_the_labels_at_weight_one():
    t = Teacher(_net(1), weight=1.0, temperature=2.0)
    s = torch.randn(8, 4)
    assert t.loss(s, s).item() == pytest.approx(0.0, abs=1e-6)
    q = torch.randn(8, 4)
    kl = (torch.softmax(q / 2, 1) * (torch.log_softmax(q / 2, 1) - torch.log_softmax(s / 2, 1))).sum(1).mean()
    assert t.loss(s, q).item() == pytest.approx(4 * kl.item(), rel=1e-5)  # T^2 keeps the scale
    assert not any(p.requires_grad for p in t.net.parameters()) and not t.net.training

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    wrong = (y + 1) % 4
    pure = [_fit(Teacher(_net(1), 1.0, 1.0), labels, x) for labels in (y, wrong)]
    assert _same(*pure)  # the labels play no part
    half = [_fit(Teacher(_net(1), 0.5, 1.0), labels, x) for labels in (y, wrong)]
    assert not _same(*half)
    assert not _same(_fit(None, y, x), half[0])  # and the teacher does

    # and it teaches: the student ends closer to an opinionated teacher than where it started
    # (two untrained networks both say ~uniform: sharpen one)
    teacher = Teacher(torch.nn.Sequential(_net(1), _Scale(30.0)), 1.0, 1.0)
    xin = to_model_input(x)
    before = teacher.loss(_net(0).eval()(xin), teacher(xin)).item()
    after = teacher.loss(_fit(teacher, y, x, steps=10).eval()(xin), teacher(xin)).item()
    assert after < 0.5 * before


@pytest.fixture(scope="module")
def lakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    lake, version_uri = small_lake(root / "a", per_class=12)
    other, other_uri = small_lake(root / "b", per_class=8)  # another version: other rows
    return lake, version_uri, train_inprocess(lake, version_uri, steps=10, seed=0), other_uri


def _cfg(teacher: str, **kw) -> TrainConfig:
    return TrainConfig(teacher=teacher, **{"image_size": SIZE, "model_args": dict(MODEL_ARGS), **kw})


def test_a_teacher_of_the_same_version_is_recorded_and_workers_load_exactly_it(lakes, tmp_path):
    lake, version_uri, teacher, _ = lakes
    _, manifest = resolve_dataset(version_uri)
    rec = teacher_record(_cfg(teacher, distill_weight=0.7), list(CLASSES), manifest_hash(manifest))
    blob = (open_location(teacher) / "model.pt").read_bytes()
    assert rec["sha256"] == hashlib.sha256(blob).hexdigest() and rec["uri"].endswith("model.pt")
    assert rec["members"] == 1 and rec["weight"] == 0.7 and rec["temperature"] == 1.0
    assert rec["dataset_version"] == manifest["version"]

    # a worker's teacher is the bare network: no flips, no decision bias
    net = load_teacher(rec, torch.device("cpu"))
    x = torch.randn(3, 1, SIZE, SIZE)
    assert torch.allclose(net(x), build_model(load_model_state(teacher), bare=True)(x), atol=1e-5)
    # an ensemble teaches as one network: its members' mean probabilities
    second = train_inprocess(lake, version_uri, steps=10, seed=1)
    ens = combine([teacher, second], EnsembleConfig(out=str(tmp_path), name="ens", decision_rule="argmax"))
    rec2 = teacher_record(_cfg(ens.model_uri), list(CLASSES), manifest_hash(manifest))
    assert rec2["members"] == 2 and rec2["model"] == "ensemble"
    with pytest.raises(ConfigError, match="changed since the run started"):
        load_teacher({**rec, "sha256": "0" * 64}, torch.device("cpu"))


def test_teachers_that_could_mislead_are_refused_in_one_line(lakes):
    _, version_uri, teacher, other_uri = lakes
    _, manifest = resolve_dataset(version_uri)
    _, other = resolve_dataset(other_uri)
    with pytest.raises(ConfigError, match="trained on dataset version .* validation or test"):
        teacher_record(_cfg(teacher), list(CLASSES), manifest_hash(other))
    with pytest.raises(ConfigError, match="takes another input \\(64 px"):
        teacher_record(_cfg(teacher, image_size=96), list(CLASSES), manifest_hash(manifest))
    with pytest.raises(ConfigError, match="same classes in the same order"):
        teacher_record(_cfg(teacher), list(reversed(CLASSES)), manifest_hash(manifest))
    with pytest.raises(Exception, match="no model or checkpoint"):
        teacher_record(_cfg(teacher + "-gone"), list(CLASSES), manifest_hash(manifest))
    with pytest.raises(ConfigError, match="distill_weight must be in \\(0, 1\\]"):
        TrainConfig(distill_weight=0.0).validate()


def test_retrain_refuses_a_teacher_before_it_ingests_anything(lakes, tmp_path):
    """With --incoming, a challenger trains on the version this run ingests, which no teacher
    has seen: refused before the ingest (training.distill would refuse it only after)."""
    from brainmri.config import RetrainConfig
    from brainmri.ops.retrain import retrain

    from support.tiny import kaggle_folder

    lake, _, teacher, _ = lakes
    incoming, _, _ = kaggle_folder(tmp_path / "incoming")
    versions = sorted(p.name for p in (lake / "datasets" / "brain-tumor-mri").iterdir())
    cfg = RetrainConfig(store=str(lake), champion=teacher, wait_lock_s=0, incoming=str(incoming),
                        train={"teacher": teacher})
    with pytest.raises(ConfigError, match="distils from teacher .* ingests from --incoming.* teacher="):
        retrain(cfg)
    assert sorted(p.name for p in (lake / "datasets" / "brain-tumor-mri").iterdir()) == versions
    pointer = lake / "retrain" / "brain-tumor-mri" / "champion.json"  # may hold the lease's fence only
    assert not pointer.exists() or not json.loads(pointer.read_text()).get("model")


def test_a_rerun_is_taught_as_the_run_started(tmp_path):
    from brainmri.training.train import check_same_teacher

    run = open_location(str(tmp_path / "run"))
    rec = {"uri": "/store/models/ens/v1/model.pt", "sha256": "a" * 64}
    check_same_teacher(run, rec, "x")  # a new run: nothing to compare
    (run / "config.json").write_json({"config": {}})
    check_same_teacher(run, None, "")  # a run from before the record: not checked
    (run / "config.json").write_json({"config": {}, "teacher": rec})
    check_same_teacher(run, dict(rec), rec["uri"])
    with pytest.raises(ConfigError, match="was distilled from .*aaaaaaaaaaaa.*another file"):
        check_same_teacher(run, {**rec, "sha256": "b" * 64}, "models/ens")
    with pytest.raises(ConfigError, match="names no teacher"):
        check_same_teacher(run, None, "")
    (run / "config.json").write_json({"config": {}, "teacher": None})
    with pytest.raises(ConfigError, match="was taught by no teacher"):
        check_same_teacher(run, rec, "models/ens")


def test_tune_pins_the_teacher_file_and_its_trials_accept_it(lakes, tmp_path):
    """Each trial names the model.pt the search checked, not "latest" again; a .pt file is a
    teacher like a version folder."""
    from brainmri.config import TuneConfig
    from brainmri.ops.tune import build_trials
    from brainmri.training.train import prepare

    lake, version_uri, teacher, _ = lakes
    base = {"teacher": str(lake / "models" / "brainnet"), "image_size": SIZE, "model_args": dict(MODEL_ARGS),
            "batch_size": 4, "num_workers": 1}
    settings = TuneConfig(data=version_uri, out=str(tmp_path), name="s")
    (trial,) = build_trials(base, [{"lr": 0.01}], settings)
    pinned = trial["train"]["teacher"]
    assert pinned.endswith("/model.pt") and pinned.startswith(str(lake / "models" / "brainnet"))
    assert prepare(TrainConfig(**trial["train"])).teacher["uri"] == pinned
