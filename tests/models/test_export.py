"""Exports beside model.pt: TorchScript and ONNX written before metadata.json (which records
their sha256), loadable without this package, equal to the eager network on real scans."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from brainmri.config import RUNTIMES
from brainmri.core.storage import StorageError, open_location
from brainmri.data.transforms import preprocess_many, to_model_input
from brainmri.evaluation.inference import load_network, open_model
from brainmri.models import export
from brainmri.models.checkpoints import build_model, make_checkpoint, publish_model
from brainmri.models.export import EXPORT_FILES, PROBE_BATCH, TRACE_BATCH, export_model
from brainmri.models.zoo import create_model

from support.data import CLASSES, SHARED_DATA

pytestmark = pytest.mark.usefixtures("one_thread")


def publish(tmp_path: Path, name: str, size: int, steps: int = 0, **args) -> Path:
    """Publish a seeded `name`, first fitted for `steps` full-batch steps on real scans (so
    weights, batch-norm statistics and logits move well away from their initial values)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_chans=1, image_size=size, **args)
    if steps:
        x_u8, y = real_scans(size)
        x = to_model_input(torch.from_numpy(x_u8))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model.train()(x), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
    ckpt = make_checkpoint(model.eval().state_dict(), epoch=0, best=0.5, bad_epochs=0, history=[],
                           resumes=[], config={"model": name, "image_size": size, "model_args": args},
                           classes=list(CLASSES), dataset={"uri": "x"}, params=1)
    return Path(publish_model(open_location(str(tmp_path)), name, ckpt, {}).path)


def real_scans(size: int, per_class: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, size, size], labels): the project's own preprocessing of real scans."""
    src = SHARED_DATA / "Training"
    if not src.is_dir():
        pytest.skip(f"shared data not found at {src}")
    files = [(f, i) for i, c in enumerate(CLASSES) for f in sorted((src / c).iterdir())[:per_class]]
    return (preprocess_many([f.read_bytes() for f, _ in files], size),
            np.array([i for _, i in files], dtype=np.int64))


def plain_input(x_u8: np.ndarray, meta: dict) -> np.ndarray:
    """The input as a user without this package builds it, from metadata.json alone."""
    pre = meta["interface"]["preprocess"]
    return ((x_u8.astype(np.float32) / 255 - pre["mean"]) / pre["std"])[:, None]


def test_runtimes_and_export_files_agree():
    assert set(RUNTIMES) == {"torch", *EXPORT_FILES}


def test_publish_writes_both_exports_before_metadata_with_their_sha256(tmp_path):
    version = publish(tmp_path, "brainnet", 32, width=8)
    meta = json.loads((version / "metadata.json").read_text())
    for kind, file in EXPORT_FILES.items():
        rec = meta["exports"][kind]
        assert rec["file"] == file and "error" not in rec
        data = (version / file).read_bytes()
        assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["bytes"] == len(data)
        # metadata.json marks the version complete: nothing may be written after it
        assert (version / file).stat().st_mtime_ns <= (version / "metadata.json").stat().st_mtime_ns
    assert meta["interface"]["input"]["shape"] == ["batch", 1, 32, 32]
    assert meta["interface"]["classes"] == list(CLASSES)
    assert meta["interface"]["preprocess"] == meta["preprocess"]
    # the contract travels inside each file too, for whoever gets the file alone
    sess = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(sess.get_modelmeta().custom_metadata_map["brainmri"]) == meta["interface"]
    extra = {"brainmri.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14: torch.jit.* is deprecated
        torch.jit.load(str(version / "model.torchscript.pt"), _extra_files=extra)
    assert json.loads(extra["brainmri.json"]) == meta["interface"]
    # the batch axis is free in both: batch sizes other than the traced one run
    x = np.random.default_rng(0).normal(size=(5, 1, 32, 32)).astype(np.float32)
    assert sess.run(["logits"], {"input": x})[0].shape == (5, 4)
    assert sess.run(["logits"], {"input": x[:1]})[0].shape == (1, 4)


@pytest.mark.parametrize("name,size", [("brainnet", 160), ("seed_cnn", 128), ("resnet18", 64)])
def test_exports_equal_eager_on_real_scans(tmp_path, name, size):
    """Eager vs TorchScript within 1e-4 and vs ONNX Runtime within 1e-3 (max |logit diff|) on
    16 real scans, after 3 training steps on them; each export loaded the way a user without
    this package would."""
    version = publish(tmp_path, name, size, steps=3)
    meta = json.loads((version / "metadata.json").read_text())
    x_u8, _ = real_scans(size)
    eager_net = build_model(torch.load(version / "model.pt", weights_only=True))
    with torch.no_grad():
        eager = eager_net(to_model_input(torch.from_numpy(x_u8))).numpy()
    x = plain_input(x_u8, meta)
    assert np.array_equal(x, to_model_input(torch.from_numpy(x_u8)).numpy())  # contract = code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(version / "model.torchscript.pt")).eval()
    with torch.no_grad():
        scripted = ts(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx = sess.run(["logits"], {"input": x})[0]
    d_ts, d_onnx = float(np.abs(scripted - eager).max()), float(np.abs(onnx - eager).max())
    print(f"\n{name} {size}px, {len(x)} real scans, |logit| <= {np.abs(eager).max():.3g}: "
          f"max |dlogit| torchscript {d_ts:.3g}, onnx {d_onnx:.3g}")
    assert d_ts <= 1e-4 and d_onnx <= 1e-3
    assert (scripted.argmax(1) == eager.argmax(1)).all() and (onnx.argmax(1) == eager.argmax(1)).all()


def test_a_network_that_cannot_be_rebuilt_is_published_without_exports(tmp_path):
    state = {"model": {"w": 1.0}, "config": {"model": "brainnet"}, "classes": list(CLASSES), "epoch": 1}
    with pytest.warns(UserWarning, match="without the torchscript, onnx export"):
        version = publish_model(open_location(str(tmp_path)), "m", state, {})
    meta = (version / "metadata.json").read_json()
    assert all("network not rebuilt" in meta["exports"][k]["error"] for k in EXPORT_FILES)
    assert not (version / "model.onnx").exists() and (version / "model.pt").exists()
    ref = open_model(version.uri)  # the model itself is served as before
    with pytest.raises(StorageError, match=r"has no onnx export \(network not rebuilt"):
        ref.runtime_file("onnx")


class BatchDependent(torch.nn.Module):
    """A network whose forward branches on the batch size: a trace freezes the branch taken
    for the traced batch, so its exports are wrong at any other."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(1, 4)

    def forward(self, x):
        y = self.fc(x.mean((2, 3)))
        return y if x.shape[0] == TRACE_BATCH else y + 1.0


def test_an_export_that_disagrees_with_eager_is_left_out():
    state = {"config": {"model": "x", "image_size": 32}, "classes": list(CLASSES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the very problem tested
        files, records = export_model(state, BatchDependent().eval())
    assert files == {}
    for kind in EXPORT_FILES:
        assert records[kind]["error"].startswith("export disagrees with the eager network")


def test_a_wrong_shaped_export_costs_only_its_own_format(tmp_path, monkeypatch):
    """An ONNX export whose output lost a class (a shape that does not broadcast against the
    eager logits) is left out with its own reason; the TorchScript export is still published,
    with its sha256, rather than both being recorded as "network not rebuilt"."""
    runner = export._runner

    def lost_a_class(kind, blob):
        run = runner(kind, blob)
        return (lambda x: run(x)[:, :-1]) if kind == "onnx" else run

    monkeypatch.setattr(export, "_runner", lost_a_class)
    with pytest.warns(UserWarning, match="without the onnx export"):
        version = publish(tmp_path, "brainnet", 32, width=8)
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["exports"]["onnx"] == {"error": f"export disagrees with the eager network: shape "
                                                f"({PROBE_BATCH}, 3) vs ({PROBE_BATCH}, 4)"}
    assert not (version / EXPORT_FILES["onnx"]).exists()
    ts = meta["exports"]["torchscript"]
    data = (version / EXPORT_FILES["torchscript"]).read_bytes()
    assert "error" not in ts and ts["file"] == EXPORT_FILES["torchscript"]
    assert ts["sha256"] == hashlib.sha256(data).hexdigest() and ts["bytes"] == len(data)


def test_a_tampered_export_is_refused_when_loaded(tmp_path):
    version = publish(tmp_path, "brainnet", 32, width=8)
    ref = open_model(str(version))
    for kind, file in EXPORT_FILES.items():
        uri, sha = ref.runtime_file(kind)
        assert uri.endswith("/" + file)
        load_network(uri, sha, runtime=kind)  # untampered: loads
        data = bytearray((version / file).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (version / file).write_bytes(bytes(data))
        with pytest.raises(StorageError, match="does not have the sha256 recorded") as e:
            load_network(uri, sha, runtime=kind)
        assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small", "convnext_tiny"])
def test_every_torchvision_family_exports(name):
    """One network of each other zoo family (resnet is above): both exports are made and
    agree with eager (export_model's own check, at another batch size than traced)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_chans=1, image_size=64).eval()
    files, records = export_model({"config": {"image_size": 64}, "classes": list(CLASSES)}, model)
    assert set(files) == set(EXPORT_FILES.values()), records
    assert all(r["max_abs_diff"] <= r["tolerance"] for r in records.values())
