"""Evaluation: metrics against hand-computed values, then whole reports from a model trained
here with Ray Train on real scans, on a dataset split and on Kaggle-layout folders (local and
S3) that hold bad files."""

from __future__ import annotations

import hashlib
import io
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from brainmri.cli import build_parser, config_from_args
from brainmri.config import ConfigError, EvaluateConfig, TrainConfig
from brainmri.core.storage import StorageError, open_location
from brainmri.data.datasets import resolve_dataset, split_files
from brainmri.data.transforms import to_model_input
from brainmri.evaluation import leakage, scoring
from brainmri.evaluation.calibration import ece, fit_temperature, fit_temperature_from_logits, reliability
from brainmri.evaluation.evaluate import COMPLETE, evaluate
from brainmri.evaluation.inference import (
    LogitsActor,
    actor_resources,
    inference_device,
    load_network,
    softmax,
)
from brainmri.evaluation.predict import Predictor
from brainmri.evaluation.sources import _classify_keys, open_source
from brainmri.models.checkpoints import dump_state
from brainmri.models.export import EXPORT_FILES, OnnxNetwork, export_model
from brainmri.models.zoo import create_model
from brainmri.training.train import run_training

from support.tiny import kaggle_folder, small_lake

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES3 = ["a", "b", "c"]
CLASSES4 = ("glioma", "meningioma", "notumor", "pituitary")


# -- metrics, by hand ------------------------------------------------------------------------
def test_classification_metrics_hand_checked():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    m = scoring.classification(y, probs, CLASSES3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recalls 2/3, 1/2, 1; precisions 1, 1/2, 1/2
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 / 1.5]
    assert [m[f"f1_{c}"] for c in CLASSES3] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["weighted_f1"] == pytest.approx((3 * f1[0] + 2 * f1[1] + 1 * f1[2]) / 6)
    assert [m["precision_b"], m["recall_b"], m["f1_b"], m["support_b"]] == pytest.approx([0.5, 0.5, 0.5, 2])
    assert m["log_loss"] == pytest.approx(-(4 * math.log(0.8) + 2 * math.log(0.1)) / 6)
    # class c: positives score 0.8 (1 image); negatives 0.8 (1 image, the b->c error) and 0.1
    assert m["roc_auc_ovr"]["per_class"]["c"] == pytest.approx((4 * 1 + 1 * 0.5) / 5)


def test_ece_brier_and_log_loss_on_a_tiny_hand_computed_case():
    # (top-class confidence, correct?) per image; 15 bins of width 1/15, none on an edge:
    # 0.90 and 0.92 share bin (0.867, 0.933]; 0.85, 0.70 and 0.55 each have their own.
    probs = np.array([[0.90, 0.10], [0.15, 0.85], [0.30, 0.70], [0.55, 0.45], [0.92, 0.08]])
    y = np.array([0, 0, 1, 1, 0])
    # bins: {0.90, 0.92} acc 1 conf 0.91 -> 2/5*0.09; 0.85 wrong; 0.70 right; 0.55 wrong
    expected_ece = (2 * 0.09 + 0.85 + 0.30 + 0.55) / 5
    assert ece(probs, y) == pytest.approx(expected_ece)
    r = reliability(probs, y)
    assert sum(r["count"]) == 5 and r["count"][13] == 2 and r["confidence"][13] == pytest.approx(0.91)
    # multi-class Brier: sum over classes of squared error, averaged over images
    per_image = [0.1**2 * 2, 0.85**2 * 2, 0.3**2 * 2, 0.55**2 * 2, 0.08**2 * 2]
    assert scoring.brier(y, probs) == pytest.approx(np.mean(per_image))
    m = scoring.classification(y, probs, ["x", "y"])
    assert m["brier"] == pytest.approx(np.mean(per_image))
    assert m["ece"] == pytest.approx(expected_ece)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.15, 0.7, 0.45, 0.92])))
    # a perfectly calibrated, perfectly confident model
    assert ece(np.eye(2)[[0, 1, 1]], np.array([0, 1, 1])) == 0.0


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 4))
    true_t = 2.0
    p = softmax(logits, true_t)
    labels = (p.cumsum(1) < rng.random((len(p), 1))).sum(1)  # one draw from each row's p
    t = fit_temperature_from_logits(logits, labels)
    assert t == pytest.approx(true_t, rel=0.1)
    assert ece(softmax(logits, t), labels) < ece(softmax(logits), labels)
    assert (softmax(logits, t).argmax(1) == logits.argmax(1)).all()  # accuracy unchanged


def test_risk_coverage_and_abstention_by_hand():
    conf = np.array([0.9, 0.8, 0.6, 0.4])
    correct = np.array([True, False, True, False])
    rc = scoring.risk_coverage(conf, correct)
    assert rc["coverage"] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rc["risk"] == pytest.approx([0, 0.5, 1 / 3, 0.5])
    assert rc["aurc"] == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    a = scoring.at_threshold(conf, correct, 0.7)
    assert (a["covered"], a["referred"], a["coverage"], a["accuracy_covered"]) == (2, 2, 0.5, 0.5)
    assert scoring.at_threshold(conf, correct, 0.95)["accuracy_covered"] is None


def test_auc_undefined_for_an_absent_class_and_hamming_distances():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    auc = scoring.roc_auc_ovr(np.array([0, 1, 0]), probs, CLASSES3)
    assert auc["per_class"]["c"] is None and auc["per_class"]["a"] == 1.0
    assert auc["macro"] == pytest.approx(1.0)
    ref = np.array([0b0, 0b1111, -1], dtype=np.int64).view(np.uint64)
    q = np.array([0b1, 0b1111, 0b11110000, -2], dtype=np.int64)
    assert leakage.nearest_distance(q, ref, 4).tolist() == [1, 0, 4, 1]
    assert leakage.nearest_distance(q, ref, 3).tolist() == [1, 0, 65, 1]  # beyond the cap: 65


def test_intervals_resample_near_copies_together():
    """Ten copies of each image are one observation each: resampling copies as clusters
    gives the interval of the images alone; resampling them one by one narrows it falsely."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    pred = np.where(rng.random(len(y)) < 0.85, y, (y + 1) % 4)
    alone = scoring.intervals(y, pred, list(CLASSES4))
    yy, pp = np.repeat(y, 10), np.repeat(pred, 10)
    clusters = np.repeat(np.arange(len(y)), 10)
    grouped = scoring.intervals(yy, pp, list(CLASSES4), clusters)
    naive = scoring.intervals(yy, pp, list(CLASSES4))
    acc = float((pred == y).mean())
    assert alone["accuracy"][0] < acc < alone["accuracy"][1]
    assert grouped["accuracy"] == pytest.approx(alone["accuracy"], abs=1e-9)  # the same draws
    width = {k: r["accuracy"][1] - r["accuracy"][0] for k, r in [("g", grouped), ("n", naive)]}
    assert width["n"] < 0.5 * width["g"]
    assert (grouped["clusters"], grouped["images"], naive["clusters"]) == (120, 1200, 1200)
    assert scoring.intervals(y, pred, list(CLASSES4)) == alone  # seeded
    for c in CLASSES4:
        lo, hi = alone[f"recall_{c}"]
        assert 0 <= lo <= hi <= 1
    # a class the images lack has no recall interval; no images, no intervals
    assert scoring.intervals(y[y < 3], pred[y < 3], list(CLASSES4))["recall_pituitary"] is None
    assert scoring.intervals(y[:0], pred[:0], list(CLASSES4)) == {}


def test_near_copy_clusters_join_hashes_within_the_distance_transitively():
    h = np.array([0b0, 0b1, 0b11, 0b1111_0000_0000, 0b1111_0000_0001, 0xFFFF_FFFF], dtype=np.int64)
    ids = scoring.near_copy_clusters(h, 1)
    assert ids[0] == ids[1] == ids[2]  # 0-1 and 1-2 are one bit apart; 0-2 two, joined through 1
    assert ids[3] == ids[4] != ids[0] and len(set(ids.tolist())) == 3
    assert len(set(scoring.near_copy_clusters(h, 0).tolist())) == 6


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="abstain"):
        evaluate(EvaluateConfig(model="unused", data="unused", out=str(tmp_path), abstain_below=1.5))
    with pytest.raises(ConfigError, match="concurrency"):
        evaluate(EvaluateConfig(model="unused", data="unused", out=str(tmp_path), concurrency=0))
    with pytest.raises(StorageError, match="no dataset version or image folder"):
        open_source(str(tmp_path / "missing"), list(CLASSES4))
    (tmp_path / "lake" / "datasets").mkdir(parents=True)
    with pytest.raises(StorageError, match="no files in class folders"):
        open_source(str(tmp_path / "lake"), list(CLASSES4))


def test_folder_source_rejects_a_non_utf8_file_name(tmp_path):
    (tmp_path / "glioma").mkdir()
    (tmp_path / "glioma" / "ok.jpg").write_bytes(b"x")
    fd = os.open(os.fsencode(tmp_path / "glioma") + b"/scan_\xff.jpg", os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    src = open_source(str(tmp_path), list(CLASSES4))
    assert src.files == [("glioma/ok.jpg", 0)]
    assert src.walk_rejects == [("glioma/scan_\\xff.jpg", "undecodable_file_name",
                                 "file name is not valid UTF-8; rename it")]


# -- where inference runs -------------------------------------------------------------------
def test_inference_pool_asks_ray_for_a_gpu_per_actor_only_with_gpu():
    assert actor_resources(False) == {"num_cpus": 1, "num_gpus": 0}  # as before: CPU actors
    assert actor_resources(True) == {"num_cpus": 1, "num_gpus": 1}
    def gpu(*argv):
        return config_from_args(build_parser().parse_args(["evaluate", "--model", "m", "--data", "d",
                                                           "--out", "o", *argv])).gpu

    assert gpu("--gpu") is True and gpu() is False


@pytest.fixture
def tiny_weights(tmp_path):
    """A random brainnet (32 px) saved as a checkpoint file: (path, sha256, network, images)."""
    torch.manual_seed(0)
    model = create_model("brainnet", 4, 1, image_size=32, width=8).eval()
    state = {"model": model.state_dict(), "classes": list(CLASSES4),
             "config": {"model": "brainnet", "image_size": 32, "model_args": {"width": 8}}}
    blob = dump_state(state)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(blob)
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    return str(path), hashlib.sha256(blob).hexdigest(), model, x


def test_cpu_inference_is_plain_fp32_as_before(tiny_weights):
    path, sha, model, x = tiny_weights
    assert inference_device(False) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
            inference_device(True)
    actor = LogitsActor(path, sha, num_classes=4, gpu=False)
    assert actor.device.type == "cpu" and next(actor.model.parameters()).device.type == "cpu"
    reason = np.array(["", "", "corrupt_or_truncated", "", "", ""], dtype=object)
    out = actor({"x": x, "reason": reason, "path": np.arange(6)})
    with torch.no_grad():  # what forward_logits computed before the GPU path existed
        expected = model(to_model_input(torch.from_numpy(x))).float().numpy()
    ok = reason == ""
    assert np.array_equal(out["logits"][ok], expected[ok])  # bit for bit
    assert np.isnan(out["logits"][~ok]).all() and "x" not in out and list(out["path"]) == list(range(6))


@pytest.mark.parametrize("runtime", ["torchscript", "onnx"])
def test_inference_actors_run_the_export_of_their_runtime(tiny_weights, tmp_path, runtime):
    path, sha, model, x = tiny_weights
    state = {"config": {"image_size": 32}, "classes": list(CLASSES4)}
    files, records = export_model(state, model)
    (tmp_path / EXPORT_FILES[runtime]).write_bytes(files[EXPORT_FILES[runtime]])
    uri, sha = str(tmp_path / EXPORT_FILES[runtime]), records[runtime]["sha256"]
    actor = LogitsActor(uri, sha, num_classes=4, gpu=False, runtime=runtime)
    assert isinstance(actor.model, OnnxNetwork if runtime == "onnx" else torch.jit.ScriptModule)
    out = actor({"x": x, "reason": np.full(len(x), "", dtype=object)})
    with torch.no_grad():
        expected = model(to_model_input(torch.from_numpy(x))).numpy()
    assert np.abs(out["logits"] - expected).max() <= 1e-4
    with pytest.raises(StorageError, match="sha256 recorded"):
        LogitsActor(uri, "0" * 64, num_classes=4, gpu=False, runtime=runtime)
    if runtime == "onnx":
        with pytest.raises(ConfigError, match="CPU provider"):
            load_network(uri, sha, "cuda", runtime)


def test_export_runtimes_are_refused_before_any_work(tiny_weights, tmp_path):
    path = tiny_weights[0]  # a checkpoint: no exports beside it
    with pytest.raises(StorageError, match="needs a published model version"):
        evaluate(EvaluateConfig(model=path, data="unused", out=str(tmp_path), runtime="onnx"))
    with pytest.raises(ConfigError, match="CPU provider"):
        evaluate(EvaluateConfig(model=path, data="unused", out=str(tmp_path), runtime="onnx", gpu=True))
    assert not (tmp_path / "reports").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_inference_agrees_with_cpu(tiny_weights):
    path, sha, model, x = tiny_weights
    gpu = LogitsActor(path, sha, num_classes=4, gpu=True)
    p = next(gpu.model.parameters())
    assert p.device.type == "cuda"
    assert any(q.dim() == 4 and q.is_contiguous(memory_format=torch.channels_last)
               for q in gpu.model.parameters())
    batch = {"x": x, "reason": np.full(len(x), "", dtype=object)}
    on_gpu = gpu(batch)["logits"]
    on_cpu = LogitsActor(path, sha, num_classes=4, gpu=False)(batch)["logits"]
    assert on_gpu.dtype == np.float32
    assert np.allclose(on_gpu, on_cpu, rtol=1e-2, atol=1e-2 * np.abs(on_cpu).max())  # fp32 (TF32 convs)


def test_object_keys_follow_ingest_placement_rules():
    keys = ["glioma/a.jpg", "Training/Notumor/b.png", ".hidden/c.jpg", "pituitary/Thumbs.db",
            "other/d.jpg", "e.jpg"]
    files, rejects = _classify_keys(keys, list(CLASSES4))
    assert files == [("Training/Notumor/b.png", 2), ("glioma/a.jpg", 0)]
    assert {r[0]: r[1] for r in rejects} == {
        ".hidden/c.jpg": "hidden_or_system_file", "pituitary/Thumbs.db": "hidden_or_system_file",
        "other/d.jpg": "outside_known_class_folder", "e.jpg": "outside_known_class_folder"}


# -- whole reports ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, s3_server, ray_local):
    """A tiny brainnet trained with Ray Train on ~80 real scans. s3_server is requested
    before ray_local so that Ray's workers inherit the S3 endpoint variables."""
    root = tmp_path_factory.mktemp("evaluate")
    lake, version = small_lake(root, per_class=20)
    cfg = TrainConfig(data=version, out=str(lake), name="t-eval", num_workers=1, epochs=2,
                      image_size=64, batch_size=16, model_args={"width": 8}, patience=0,
                      warmup_epochs=0.5, threads_per_worker=1)
    res = run_training(cfg)
    assert res.model_uri
    return {"root": root, "lake": lake, "version": version, "model": res.model_uri}


def read_report(uri: str) -> tuple[dict, str, "pq.Table"]:
    loc = open_location(uri)
    assert (loc / COMPLETE).exists()
    html = (loc / "report.html").read_bytes().decode()
    table = pq.read_table(io.BytesIO((loc / "predictions.parquet").read_bytes()))
    return (loc / "metrics.json").read_json(), html, table


def check_html(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert html.count("data:image/png;base64,") >= 7  # 6 evaluation figures + training history


def test_report_on_the_dataset_test_split(trained, tmp_path):
    out = tmp_path / "out"
    res = evaluate(EvaluateConfig(model=trained["model"], data=trained["version"], out=str(out),
                                  abstain_below=0.5))
    m, html, table = read_report(res.report_uri)
    manifest = open_location(trained["version"]) / "manifest.json"
    n_test = manifest.read_json()["rows"]["test"]
    model_dir = trained["model"].rstrip("/").split("/")[-1]
    assert res.report_uri.endswith(f"/reports/brainnet-{model_dir}/brain-tumor-mri-"
                                   f"{m['data']['version']}-test")
    assert m["counts"]["evaluated"] == n_test == table.num_rows and m["counts"]["rejected"] == 0
    allm = m["metrics"]["all"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "recall_glioma",
                "confusion_matrix", "roc_auc_ovr", "log_loss", "brier", "ece", "ece_uncalibrated"):
        assert key in allm
    assert np.sum(allm["confusion_matrix"]) == n_test
    # how far the figures could move: resampled by near-copy clusters of the test rows
    ci = allm["interval"]
    assert ci["images"] == n_test and 1 <= ci["clusters"] <= n_test and ci["level"] == 0.95
    assert ci["accuracy"][0] <= allm["accuracy"] <= ci["accuracy"][1]
    assert "95%: " in html and "recall, 95% interval" in html
    # predictions.parquet agrees with metrics.json
    t = table.to_pydict()
    right = np.array(t["predicted_label"]) == np.array(t["true_label"])
    assert np.mean(right) == pytest.approx(allm["accuracy"])
    probs = np.stack([t[f"prob_{c}"] for c in m["model"]["classes"]], 1)
    assert np.allclose(probs.sum(1), 1) and np.allclose(probs.max(1), t["confidence"])
    assert t["abstained"] == [c < 0.5 for c in t["confidence"]]
    assert {a for a in t["advice"]} <= {"", "refer to a radiologist"}
    assert m["selective"]["chosen"]["referred"] == sum(t["abstained"])
    # calibration fitted on the val split (no calibration.json yet), ECE before and after
    assert m["calibration"]["source"].startswith("fitted now on the val split")
    assert m["calibration"]["temperature"] > 0 and m["calibration"]["fit"]["n"] > 0
    # leakage: compared with train and val, metrics twice
    leak = m["leakage"]
    assert leak["available"] and leak["compared_with_splits"] == ["train", "val"]
    assert leak["exact_duplicates"] == 0  # ingest never lets identical bytes straddle splits
    clean = m["metrics"]["without_training_duplicates"]
    assert clean["n"] == n_test - leak["removed"]
    check_html(html)
    for section in ("Leakage check", "Calibration", "Abstention", "Grad-CAM", "Training history",
                    "Most confident mistakes", m["data"]["version"], "Model card", "Not a diagnostic device",
                    "Known weaknesses"):
        assert section in html
    # the card travels in the model's metadata: the data it saw, its weakest classes first
    card = m["model"]["card"]
    train_rows = (open_location(trained["version"]) / "manifest.json").read_json()["rows"]
    assert card["training_data"]["rows"] == train_rows and "refer" in " ".join(card["not_for"])
    recalls = [w["recall"] for w in card["known_weaknesses"]]
    assert recalls == sorted(recalls) and len(recalls) == 4
    assert not (open_location(trained["model"]) / "calibration.json").exists()  # evaluate saved none


def test_calibrate_then_report_on_a_local_folder_with_bad_files(trained, tmp_path):
    rec = fit_temperature(trained["model"])
    cal_file = open_location(trained["model"]) / "calibration.json"
    assert cal_file.exists() and cal_file.read_json()["temperature"] == rec["temperature"]
    folder, good, expected = kaggle_folder(tmp_path / "folder")
    res = evaluate(EvaluateConfig(model=trained["model"], data=str(folder), out=str(tmp_path / "out")))
    m, html, table = read_report(res.report_uri)
    assert res.report_uri.split("/")[-1].startswith("folder-")
    assert m["counts"]["evaluated"] == good == table.num_rows
    assert m["counts"]["rejected_by_reason"] == expected
    assert m["calibration"]["source"] == f"from {cal_file.uri}"
    assert m["calibration"]["temperature"] == pytest.approx(rec["temperature"])
    rejects = (open_location(res.report_uri) / "rejects.csv").read_bytes().decode()
    assert "meningioma/empty.jpg,empty_file" in rejects and "readme.txt,outside_known_class" in rejects
    check_html(html)
    # the Ray pipeline and in-process prediction agree image by image
    pred = Predictor(trained["model"])
    rows = list(pred.predict_paths([str(folder / p) for p in table.column("path").to_pylist()]))
    ray_probs = np.stack([table.column(f"prob_{c}").to_numpy() for c in pred.ref.classes], 1)
    local_probs = np.array([[r.probabilities[c] for c in pred.ref.classes] for r in rows])
    assert np.allclose(ray_probs, local_probs, atol=1e-5)


def test_report_on_an_s3_folder_written_to_s3(trained, s3_bucket, tmp_path):
    folder, good, expected = kaggle_folder(tmp_path / "folder", per_class=2, offset=300)
    src = open_location(f"s3://{s3_bucket}/incoming")
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            (src / str(f.relative_to(folder))).write_bytes(f.read_bytes())
    res = evaluate(EvaluateConfig(model=trained["model"], data=src.uri, out=f"s3://{s3_bucket}/lake",
                                  abstain_below=0.9))
    assert res.report_uri.startswith(f"s3://{s3_bucket}/lake/reports/")
    m, html, table = read_report(res.report_uri)
    assert m["counts"]["evaluated"] == good == table.num_rows
    assert m["counts"]["rejected_by_reason"] == expected
    assert m["data"]["uri"] == src.uri
    assert m["selective"]["chosen"]["threshold"] == 0.9
    assert sum(table.column("abstained").to_pylist()) == m["selective"]["chosen"]["referred"]
    check_html(html)


def test_report_on_a_dicom_folder_keeps_no_patient_data(trained, tmp_path, monkeypatch):
    """A folder of DICOM in patient-named folders: a row per slice, bad files counted, and
    no planted patient data in any file of the report (predictions, rejects, metrics, HTML,
    figures); the salt's pseudonyms map back to the files."""
    from PIL import Image

    from brainmri.data.images import decode_grey
    from brainmri.data.walk import pseudonym

    from support.data import SHARED_DATA
    from support.dicom import bad_dicoms, make_dicom, phi_values

    monkeypatch.setenv("BRAINMRI_DICOM_SALT", "evaluate-test-salt-91c2")
    folder, export = tmp_path / "folder", "QUIXOTEFAKE^Dulcinea_PID-77310593"
    for c in CLASSES4:
        scans = sorted((SHARED_DATA / "Training" / c).iterdir())[400:402]
        gs = [np.asarray(Image.fromarray(decode_grey(f.read_bytes())).resize((128, 128))) for f in scans]
        (folder / c / export).mkdir(parents=True)
        (folder / c / export / "IM0001").write_bytes(make_dicom(gs, "mono1_12bit_window"))
    (folder / CLASSES4[0] / export / "video.dcm").write_bytes(bad_dicoms(gs[0])["video.dcm"][0])
    res = evaluate(EvaluateConfig(model=trained["model"], data=str(folder), out=str(tmp_path / "out")))
    m, html, table = read_report(res.report_uri)
    assert m["counts"]["evaluated"] == table.num_rows == 8
    assert m["counts"]["rejected_by_reason"] == {"dicom_encapsulated_video": 1}
    salt = b"evaluate-test-salt-91c2"
    assert sorted(table.column("path").to_pylist()) == sorted(
        pseudonym(f"{c}/{export}/IM0001", list(CLASSES4), salt, k) for c in CLASSES4 for k in (0, 1))
    for f in open_location(res.report_uri).files():
        text = f.read_bytes().decode("latin-1")
        assert not any(v in text for v in phi_values()), f.uri


def test_report_with_the_onnx_runtime_equals_eager(trained, tmp_path):
    """evaluate --runtime onnx: the actors run model.onnx on ONNX Runtime; every test image
    gets the class the eager network gives it, so the accuracy is the same."""
    res = evaluate(EvaluateConfig(model=trained["model"], data=trained["version"], out=str(tmp_path / "out"),
                                  runtime="onnx"))
    m, html, table = read_report(res.report_uri)
    assert res.report_uri.endswith("-test-onnx")  # beside the eager report, never over it
    meta = (open_location(trained["model"]) / "metadata.json").read_json()
    assert m["model"]["runtime"] == {"runtime": "onnx", "file": f"{trained['model']}/model.onnx",
                                     "sha256": meta["exports"]["onnx"]["sha256"]}
    assert m["settings"]["runtime"] == "onnx" and "model.onnx (sha256" in html
    version, manifest = resolve_dataset(trained["version"])
    rows = pa.concat_tables([pq.read_table(f, columns=["path", "image", "label"])
                             for f in split_files(version, manifest, "test")])
    eager = Predictor(trained["model"]).predict(list(zip(rows.column("path").to_pylist(),
                                                         rows.column("image").to_pylist(), strict=True)))
    by_path = dict(zip(table.column("path").to_pylist(), table.column("predicted_label").to_pylist(),
                       strict=True))
    assert {r.path: r.label for r in eager} == by_path and len(by_path) == rows.num_rows
    classes = m["model"]["classes"]
    labels = rows.column("label").to_pylist()
    eager_acc = np.mean([r.label == classes[y] for r, y in zip(eager, labels, strict=True)])
    assert m["metrics"]["all"]["accuracy"] == pytest.approx(eager_acc)
