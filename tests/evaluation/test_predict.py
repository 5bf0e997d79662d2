"""`brainmri predict` and `brainmri calibrate` with a tiny model fitted here on real scans
(plain PyTorch, seconds): one row per input in order, error rows that do not stop the
others, exit statuses, calibration tied to the weights, local files, folders and S3 URIs."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from brainmri.cli import main
from brainmri.core.storage import open_location
from brainmri.data.images import decode_grey
from brainmri.data.transforms import preprocess, to_model_input
from brainmri.evaluation.calibration import load_calibration
from brainmri.evaluation.inference import REFER, open_model, softmax
from brainmri.evaluation.predict import Predictor
from brainmri.models.checkpoints import build_model, dump_state, load_model_state

from support.data import CLASSES, REPO, SHARED_DATA
from support.dicom import bad_dicoms, make_dicom
from support.tiny import SIZE, kaggle_folder, small_lake, train_inprocess

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    lake, version = small_lake(root, per_class=8)
    folder, good, _ = kaggle_folder(root / "folder", per_class=2)
    return {"uri": train_inprocess(lake, version), "folder": folder, "good": good, "root": root}


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def direct_probs(model_uri: str, path, temperature: float = 1.0) -> np.ndarray:
    """The reference: the network applied by hand to one file."""
    net = build_model(load_model_state(model_uri))
    x = torch.from_numpy(preprocess(open(path, "rb").read(), SIZE))[None]
    with torch.no_grad():
        return softmax(net(to_model_input(x)).numpy(), temperature)[0]


def test_files_folders_and_failures_in_input_order(model, capsys):
    folder = model["folder"]
    good = sorted((folder / CLASSES[0]).glob("*.jpg"))
    paths = [str(good[0]), str(folder / "nope.jpg"), str(folder / CLASSES[1]), str(good[1])]
    assert main(["predict", *paths, "--model", model["uri"]]) == 1  # some failed
    rows = jsonl(capsys.readouterr().out)
    menin = sorted(p.name for p in (folder / CLASSES[1]).iterdir())
    assert [r["path"].split("/")[-1] for r in rows] == [good[0].name, "nope.jpg", *menin, good[1].name]
    by_name = {r["path"].split("/")[-1]: r for r in rows}
    assert by_name["nope.jpg"] == {"path": paths[1], "ok": False, "error": "not_found",
                                   "detail": "no such file, folder or object"}
    assert by_name["empty.jpg"]["error"] == "empty_file" and not by_name["empty.jpg"]["ok"]
    assert by_name["notes.jpg"]["error"] == "not_an_image"
    for r in rows:
        if r["ok"]:
            p = r["probabilities"]
            assert sum(p.values()) == pytest.approx(1.0) and list(p) == list(CLASSES)
            assert r["class"] == max(p, key=p.get) and r["confidence"] == pytest.approx(max(p.values()))
            assert r["abstained"] is False and r["advice"] == ""
    ref = direct_probs(model["uri"], good[0])
    assert [by_name[good[0].name]["probabilities"][c] for c in CLASSES] == pytest.approx(ref, abs=1e-6)
    # only good files: exit 0
    assert main(["predict", str(good[0]), str(good[1]), "--model", model["uri"]]) == 0


def test_csv_output_file_and_abstention(model, tmp_path):
    out = tmp_path / "preds.csv"
    folder = model["folder"]
    rc = main(["predict", str(folder), "--model", model["uri"], "--format", "csv",
               "--output", str(out), "--abstain-below", "1.0"])
    assert rc == 1  # the folder holds bad files
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == ["path", "ok", "class", "confidence", *[f"prob_{c}" for c in CLASSES],
                             "abstained", "advice", "error", "detail", "frame"]
    ok = [r for r in rows if r["ok"] == "True"]
    assert len(ok) == model["good"]
    # every prediction is below 1.0: all flagged for a radiologist, none hidden
    assert all(r["abstained"] == "True" and r["advice"] == REFER for r in ok)
    bad = {r["path"].split("/")[-1]: r["error"] for r in rows if r["ok"] == "False"}
    # hidden files inside a folder are skipped, like ingest; readme.txt is no image
    assert bad == {"empty.jpg": "empty_file", "notes.jpg": "not_an_image",
                   "truncated.jpg": "corrupt_or_truncated", "readme.txt": "not_an_image"}
    rows0 = Predictor(model["uri"], abstain_below=0.0).predict(
        [("x.jpg", (folder / CLASSES[0]).glob("*.jpg").__next__().read_bytes())])
    assert rows0[0].ok and not rows0[0].abstained


def test_calibrate_writes_calibration_json_and_predict_uses_it(model, capsys):
    assert main(["calibrate", "--model", model["uri"]]) == 0
    assert "T = " in capsys.readouterr().out
    ref = open_model(model["uri"])
    cal = load_calibration(ref)
    assert cal and cal["model_sha256"] == ref.sha256 and cal["fitted_on"]["split"] == "val"
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    img = sorted((model["folder"] / CLASSES[2]).glob("*.jpg"))[0]
    rows = list(Predictor(model["uri"]).predict_paths([str(img)]))
    expected = direct_probs(model["uri"], img, cal["temperature"])
    assert [rows[0].probabilities[c] for c in CLASSES] == pytest.approx(expected, abs=1e-6)
    # a calibration written for other weights is ignored, not applied
    stale = dict(cal, model_sha256="0" * 64, temperature=50.0)
    ref.calibration_file.write_json(stale)
    assert load_calibration(ref) is None and Predictor(model["uri"]).temperature == 1.0
    ref.calibration_file.write_json(cal)


def test_usage_and_configuration_errors_exit_2(model, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "x.jpg", "--model", model["uri"], "--abstain-below", "1.5"])
    assert e.value.code == 2
    assert main(["predict", "x.jpg", "--model", str(tmp_path / "no-model")]) == 2
    assert "error: no model or checkpoint" in capsys.readouterr().err
    not_a_model = tmp_path / "junk.pt"
    not_a_model.write_bytes(b"not a checkpoint")
    assert main(["predict", "x.jpg", "--model", str(not_a_model)]) == 2
    assert "is not a brainmri model" in capsys.readouterr().err


def test_s3_objects_and_prefixes(model, s3_bucket, capsys):
    img = sorted((model["folder"] / CLASSES[3]).glob("*.jpg"))[0]
    base = open_location(f"s3://{s3_bucket}/scans")
    (base / "a" / img.name).write_bytes(img.read_bytes())
    (base / "a" / "broken.jpg").write_bytes(img.read_bytes()[:500])
    rc = main(["predict", f"{base.uri}/a/{img.name}", f"{base.uri}/a", f"{base.uri}/missing.jpg",
               "--model", model["uri"]])
    rows = jsonl(capsys.readouterr().out)
    assert rc == 1
    # the prefix lists "Tr-..." before "broken.jpg" (byte order, as S3 does)
    assert [(r["path"].split("/")[-1], r["ok"]) for r in rows] == [
        (img.name, True), (img.name, True), ("broken.jpg", False), ("missing.jpg", False)]
    assert rows[2]["error"] == "corrupt_or_truncated" and rows[3]["error"] == "not_found"
    assert rows[0]["probabilities"] == pytest.approx(rows[1]["probabilities"])


def test_the_installed_command_exits_1_when_a_file_fails(model):
    img = sorted((model["folder"] / CLASSES[0]).glob("*.jpg"))[0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "brainmri.cli", "predict", str(img),
                        str(model["folder"] / CLASSES[1] / "empty.jpg"), "--model", model["uri"]],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 1, r.stderr
    rows = jsonl(r.stdout)
    assert [x["ok"] for x in rows] == [True, False] and "Traceback" not in r.stderr


def test_dicom_files_give_one_row_per_frame(model, tmp_path, capsys):
    """A multi-frame DICOM (no extension, patient-named folder) gives a row per frame with
    the probabilities of its pictures; a video DICOM gets its reason; the rest still run."""
    jpegs = sorted((model["folder"] / CLASSES[0]).glob("*.jpg"))[:2]
    gs = [np.asarray(Image.fromarray(decode_grey(p.read_bytes())).resize((256, 256))) for p in jpegs]
    multi = tmp_path / "QUIXOTEFAKE^Dulcinea" / "IM0001"
    multi.parent.mkdir()
    multi.write_bytes(make_dicom(gs, "mono1_12bit_window", JPEG2000Lossless))
    video = tmp_path / "video.dcm"
    video.write_bytes(bad_dicoms(gs[0])["video.dcm"][0])
    rc = main(["predict", str(multi), str(video), str(jpegs[0]), "--model", model["uri"]])
    rows = jsonl(capsys.readouterr().out)
    assert rc == 1
    assert [(r["path"], r.get("frame"), r["ok"]) for r in rows] == [
        (str(multi), 0, True), (str(multi), 1, True), (str(video), None, False), (str(jpegs[0]), None, True)]
    assert rows[2]["error"] == "dicom_encapsulated_video"
    temperature = Predictor(model["uri"]).temperature  # calibrated by an earlier test, or 1
    for k, g in enumerate(gs):  # the same probabilities as the picture saved losslessly
        png = tmp_path / f"frame{k}.png"
        Image.fromarray(g).save(png)
        ref = direct_probs(model["uri"], png, temperature)
        assert [rows[k]["probabilities"][c] for c in CLASSES] == pytest.approx(ref, abs=1e-6)


# -- exported runtimes ---------------------------------------------------------------------------
@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_exported_runtimes_give_the_classes_torch_gives(model, runtime, capsys):
    """The same real scans (20 not seen in training, plus the folder with bad files) through
    `--runtime` and through eager torch: the same rows, classes and probabilities."""
    scans = [str(f) for c in CLASSES for f in sorted((SHARED_DATA / "Training" / c).iterdir())[300:305]]
    paths = [*scans, str(model["folder"])]
    assert main(["predict", *paths, "--model", model["uri"]]) == 1  # the folder holds bad files
    eager = jsonl(capsys.readouterr().out)
    assert main(["predict", *paths, "--model", model["uri"], "--runtime", runtime]) == 1
    rows = jsonl(capsys.readouterr().out)
    assert [(r["path"], r["ok"], r.get("class"), r.get("error")) for r in rows] == \
        [(r["path"], r["ok"], r.get("class"), r.get("error")) for r in eager]
    assert sum(r["ok"] for r in rows) == 20 + model["good"]
    for r, e in zip(rows, eager, strict=True):
        if r["ok"]:
            assert [r["probabilities"][c] for c in CLASSES] == pytest.approx(
                [e["probabilities"][c] for c in CLASSES], abs=1e-4)


def test_export_runtimes_refuse_checkpoints_and_tampered_files(model, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(dump_state(load_model_state(model["uri"])))
    img = str(sorted((model["folder"] / CLASSES[0]).glob("*.jpg"))[0])
    assert main(["predict", img, "--model", str(ckpt), "--runtime", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "needs a published model version" in err and err.count("\n") == 1
    onnx_file = open_location(model["uri"]) / "model.onnx"
    good = onnx_file.read_bytes()
    try:
        onnx_file.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
        assert main(["predict", img, "--model", model["uri"], "--runtime", "onnx"]) == 2
        err = capsys.readouterr().err
        assert "model.onnx does not have the sha256 recorded for it" in err and err.count("\n") == 1
        assert main(["predict", img, "--model", model["uri"]]) == 0  # model.pt is untouched
    finally:
        onnx_file.write_bytes(good)
