"""brainmri.serving.served without Ray: what a replica serves (retrain's champion, a model
folder), how an HTTP body becomes image bytes (raw or multipart, built by a real client
encoder, real scans byte for byte), the body limit, and answers equal to predict's rows."""

from __future__ import annotations

import asyncio

import pytest
from urllib3.filepost import encode_multipart_formdata

from brainmri.cli import main
from brainmri.config import ConfigError, ServeConfig
from brainmri.core.storage import StorageError, open_location
from brainmri.evaluation.predict import Predictor, row_fields
from brainmri.models.checkpoints import CHAMPION_FILE
from brainmri.serving import served as S

from support.data import CLASSES, SHARED_DATA
from support.tiny import publish_untrained

pytestmark = pytest.mark.usefixtures("one_thread")


def scan(cls: str = "glioma", i: int = 300) -> bytes:
    return sorted((SHARED_DATA / "Training" / cls).iterdir())[i].read_bytes()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    return {"root": root, "a": publish_untrained(root, 1), "b": publish_untrained(root, 2)}


def champion(root, model_uri: str | None, dataset: str = "brain-tumor-mri") -> None:
    rec = {"model": model_uri} if model_uri else {"lease": {"generation": 3}}  # a fence stamp only
    (open_location(str(root)) / "retrain" / dataset / "champion.json").write_json(rec)


def test_multipart_and_raw_bodies_keep_the_scan_bytes():
    data = scan()
    body, ctype = encode_multipart_formdata({"note": "left side", "file": ("C:\\scans\\a b.jpg", data,
                                                                           "image/jpeg")})
    assert S.image_from_body(ctype, body) == ("a b.jpg", data)  # a name, never the client's path
    assert S.image_from_body("image/jpeg", data) == ("", data)
    assert S.image_from_body("", data) == ("", data)
    # a part named file/image without a filename is the image too
    body, ctype = encode_multipart_formdata([("image", data)])
    assert S.image_from_body(ctype, body) == ("", data)


@pytest.mark.parametrize("case", ["no_boundary", "two_files", "no_file", "truncated", "no_blank_line",
                                  "wrong_boundary"])
def test_bad_multipart_is_a_400_with_the_reason(case):
    data = scan()
    body, ctype = encode_multipart_formdata({"file": ("a.jpg", data), "other": ("b.jpg", data)})
    if case == "no_boundary":
        ctype = "multipart/form-data"
    elif case == "no_file":
        body, ctype = encode_multipart_formdata({"note": "no image here"})
    elif case == "two_files":
        pass
    else:
        body, ctype = encode_multipart_formdata({"file": ("a.jpg", data)})
        boundary = ctype.split("boundary=")[1].encode()
        if case == "truncated":
            body = body[: len(body) // 2]
        elif case == "no_blank_line":
            part = b"\r\nContent-Disposition: form-data; name=file\r\n--"
            body = b"--" + boundary + part + boundary + b"--\r\n"
        else:
            ctype = "multipart/form-data; boundary=not-the-one"
    with pytest.raises(S.BadRequest) as e:
        S.image_from_body(ctype, body)
    assert e.value.status == 400 and e.value.error == "bad_multipart" and e.value.detail
    assert e.value.fields() == {"ok": False, "error": "bad_multipart", "detail": e.value.detail}


def test_body_limit_refuses_before_holding_too_much():
    read = []

    async def chunks(n: int, size: int = 1000):
        for _ in range(n):
            read.append(size)
            yield b"x" * size

    async def body(n, declared):
        return await S.read_body(chunks(n), declared, limit=2500)

    assert asyncio.run(body(2, "2000")) == b"x" * 2000
    read.clear()
    with pytest.raises(S.BadRequest) as e:
        asyncio.run(body(5, "5000"))  # declared too large: refused before reading a byte
    assert (e.value.status, e.value.error, read) == (413, "too_large_or_decompression_bomb", [])
    with pytest.raises(S.BadRequest) as e:
        asyncio.run(body(100, None))  # undeclared (chunked): refused at the first chunk past it
    assert e.value.status == 413 and len(read) == 3


def test_replica_settings_are_validated():
    assert S.replica_config({"store": "s3://b/lake", "poll_s": 30}).poll_s == 30.0
    with pytest.raises(ConfigError, match="not replica settings: port"):
        S.replica_config({"store": "x", "port": 80})
    with pytest.raises(ConfigError, match="exactly one of --store"):
        S.replica_config({"store": "x", "model": "y"})
    with pytest.raises(ConfigError, match="exactly one of --store"):
        S.replica_config({})
    cfg = ServeConfig(model="m", abstain_below=0.7, port=9000, replicas=3)
    assert S.replica_args(cfg) == {"store": "", "dataset": "brain-tumor-mri", "model": "m",
                                   "abstain_below": 0.7, "max_batch_size": 16, "batch_wait_ms": 10.0,
                                   "poll_s": 10.0}


def test_resolve_follows_the_champion(store, tmp_path, capsys):
    cfg = ServeConfig(store=str(tmp_path))
    with pytest.raises(StorageError, match="no champion in .*champion.json yet .*--model"):
        S.resolve(cfg)
    champion(tmp_path, None)  # retrain took the lease but promoted nothing
    with pytest.raises(StorageError, match="no champion"):
        S.resolve(cfg)
    assert main(["serve", "--store", str(tmp_path)]) == 2  # one line, before Ray starts
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no champion in" in err
    champion(tmp_path, store["a"])
    weights, rec = S.resolve(cfg)
    assert weights.endswith(store["a"].rsplit("/", 1)[1] + "/model.pt") and rec["model"] == store["a"]
    champion(tmp_path, store["b"])
    assert S.resolve(cfg)[0].startswith(store["b"])
    # --model: a version folder is itself; models/<name> is what its champion.json names
    assert S.resolve(ServeConfig(model=store["a"])) == (store["a"] + "/model.pt", None)
    models = open_location(str(store["root"])) / "models" / "brainnet"
    (models / CHAMPION_FILE).write_json({"version": store["a"].rsplit("/", 1)[1]})
    assert S.resolve(ServeConfig(model=models.uri))[0] == store["a"] + "/model.pt"
    (models / CHAMPION_FILE).write_json({"version": store["b"].rsplit("/", 1)[1]})
    assert S.resolve(ServeConfig(model=models.uri))[0] == store["b"] + "/model.pt"
    assert main(["serve", "--store", str(tmp_path), "--model", store["a"]]) == 2
    assert "exactly one of --store" in capsys.readouterr().err


def test_answers_are_predicts_rows_plus_the_model(store):
    cfg = ServeConfig(model=store["a"], abstain_below=0.5)
    served = S.load(*S.resolve(cfg), cfg)
    pred = Predictor(store["a"], abstain_below=0.5)
    good, bad = ("x.jpg", scan("pituitary")), ("notes.jpg", b"patient notes, not a scan\n" * 20)
    for item, status in ((good, 200), (bad, 422)):
        code, body = S.answer(served.predictor.predict([item])[0], served)
        expected = row_fields(pred.predict([item])[0])
        assert code == status
        assert body == {**expected, "model": served.identity, "calibrated": False}
    assert served.identity["version"] == store["a"].rsplit("/", 1)[1]
    card = served.card()
    assert card["metrics"] == {"val_macro_f1": 0.26} and card["classes"] == list(CLASSES)
    assert card["stage"] == "released" and card["calibration"] == {"calibrated": False, "temperature": 1.0}
    assert card["champion"] is None and card["uri"] == store["a"]
