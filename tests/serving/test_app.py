"""`brainmri serve` on a real local Ray Serve, over real HTTP on 127.0.0.1, with real scans:
answers equal predict's rows (rule, abstention, calibration), bad files are 4xx with their
reason, and a champion promoted by a retrain-style atomic write of champion.json is picked up
while clients keep sending: no request fails, each answer comes whole from the version it names.

Two untrained brainnets (seeded random weights, published in milliseconds) stand in for the
old and the new champion: they answer the same scan differently, so an answer's
probabilities tell which model computed it."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import requests
from urllib3.filepost import encode_multipart_formdata

from brainmri.cli import main
from brainmri.core.storage import open_location
from brainmri.evaluation.inference import open_model
from brainmri.evaluation.predict import Predictor, row_fields

from support.data import CLASSES, SHARED_DATA
from support.synth import bad_files
from support.tiny import publish_untrained

pytestmark = pytest.mark.usefixtures("one_thread")
POLL_S = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scans(n_per_class: int = 2, offset: int = 400) -> list[bytes]:
    return [f.read_bytes() for c in CLASSES
            for f in sorted((SHARED_DATA / "Training" / c).iterdir())[offset:offset + n_per_class]]


def set_champion(root, model_uri: str) -> None:
    """What retrain's promotion does: one atomic replacement of champion.json."""
    (open_location(str(root)) / "retrain" / "brain-tumor-mri" / "champion.json").write_json(
        {"model": model_uri, "promoted_at": time.time()})


def version(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    a, b = publish_untrained(root, 1), publish_untrained(root, 2)
    ref_b = open_model(b)  # B is calibrated (T = 2): served answers must be too
    ref_b.calibration_file.write_json({"model_sha256": ref_b.sha256, "temperature": 2.0})
    images = scans()
    # half the scans fall below the threshold on A: both sides of the abstain rule are seen
    threshold = float(np.median([r.confidence for r in Predictor(a).predict([("", x) for x in images])]))
    set_champion(root, a)
    port = free_port()
    assert main(["serve", "--store", str(root), "--port", str(port), "--poll-s", str(POLL_S),
                 "--abstain-below", str(threshold), "--max-batch-size", "8", "--detach"]) == 0
    preds = {version(u): Predictor(u, abstain_below=threshold) for u in (a, b)}
    yield {"url": f"http://127.0.0.1:{port}", "root": root, "a": version(a), "b": version(b),
           "uris": (a, b), "images": images, "preds": preds}
    serve.shutdown()


def expected(service, v: str, data: bytes) -> dict:
    return row_fields(service["preds"][v].predict([("", data)])[0])


def check_answer(service, body: dict, data: bytes) -> None:
    """The answer is predict's row for these bytes on the version the answer names."""
    v = body["model"]["version"]
    want = expected(service, v, data)
    assert {k: body[k] for k in ("ok", "class", "abstained", "advice")} == \
           {k: want[k] for k in ("ok", "class", "abstained", "advice")}
    assert body["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
    assert [body["probabilities"][c] for c in CLASSES] == pytest.approx(
        [want["probabilities"][c] for c in CLASSES], abs=1e-5)
    assert body["calibrated"] is (v == service["b"])


def post(service, data: bytes, **kw) -> requests.Response:
    return requests.post(service["url"] + "/predict", data=data, timeout=60, **kw)


def test_predict_answers_as_predict_does(service):
    images = service["images"]
    results = [None] * len(images)

    def send(i):  # concurrently: the replica batches them
        results[i] = post(service, images[i], headers={"content-type": "image/jpeg"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, data in zip(results, images, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["version"] == service["a"] and body["path"] == ""
        check_answer(service, body, data)
    flags = {r.json()["abstained"] for r in results}
    assert flags == {True, False}  # the threshold splits them: the rule is applied, both ways
    assert {r.json()["advice"] for r in results if r.json()["abstained"]} == {"refer to a radiologist"}
    body, ctype = encode_multipart_formdata({"file": ("scan.jpg", images[0], "image/jpeg")})
    r = post(service, body, headers={"content-type": ctype})
    assert r.status_code == 200 and r.json()["path"] == "scan.jpg"
    check_answer(service, r.json(), images[0])


def test_bad_files_are_4xx_with_the_reason(service):
    good = service["images"][0]
    cases = {name: (data, reason, 422) for name, (data, reason) in bad_files().items()}
    cases["truncated_real_scan.jpg"] = (good[: len(good) // 2], "corrupt_or_truncated", 422)
    results = {}

    def send(name, data):
        results[name] = post(service, data)

    # bad files in the same batches as a good one: each gets its own answer
    threads = [threading.Thread(target=send, args=(n, d)) for n, (d, _, _) in cases.items()]
    threads.append(threading.Thread(target=send, args=("good", good)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.pop("good").status_code == 200
    for name, (_, reason, status) in cases.items():
        r = results[name]
        assert (r.status_code, r.json()["error"]) == (status, reason), name
        assert r.json()["ok"] is False and r.json()["model"]["version"] == service["a"]
    body, ctype = encode_multipart_formdata({"a": ("a.jpg", good), "b": ("b.jpg", good)})
    r = post(service, body, headers={"content-type": ctype})
    assert r.status_code == 400 and r.json()["error"] == "bad_multipart" and "one image" in r.json()["detail"]
    r = post(service, good, headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["detail"]
    r = requests.get(service["url"] + "/predict", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert requests.get(service["url"] + "/nope", timeout=30).status_code == 404


def test_model_card_and_health(service):
    card = requests.get(service["url"] + "/model", timeout=30).json()
    a = service["uris"][0]
    meta = (open_location(a) / "metadata.json").read_json()
    assert (card["version"], card["sha256"]) == (service["a"], meta["sha256"])
    assert card["metrics"] == meta["metrics"] == {"val_macro_f1": 0.26}
    assert card["champion"]["model"] == a and card["classes"] == list(CLASSES)
    assert card["calibration"] == {"calibrated": False, "temperature": 1.0}
    health = requests.get(service["url"] + "/healthz", timeout=30).json()
    assert health == {"status": "ok", "model": {"name": "brainnet", "version": service["a"],
                                                "sha256": meta["sha256"]}, "last_error": ""}


def test_a_promotion_is_picked_up_without_failing_a_request(service):
    """4 clients send scans in a loop; champion.json is switched A -> B under them. Bounded:
    each client stops after 5 answers from B, or at 400 requests / 90 s."""
    a, b = service["a"], service["b"]
    images = service["images"]
    seen: dict[int, list] = {i: [] for i in range(4)}
    errors: list = []
    started = threading.Barrier(5)
    deadline = time.monotonic() + 90

    def client(k):
        started.wait()
        n_b = 0
        for i in range(400):
            data = images[(k + i) % len(images)]
            try:
                r = post(service, data)
                body = r.json()
            except Exception as e:  # noqa: BLE001 - a dropped request is the failure looked for
                errors.append(repr(e))
                return
            seen[k].append((r.status_code, body, data))
            n_b = n_b + 1 if body.get("model", {}).get("version") == b else 0
            if n_b >= 5 or time.monotonic() > deadline:
                return

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    started.wait()
    while min(len(v) for v in seen.values()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    set_champion(service["root"], service["uris"][1])
    for t in threads:
        t.join()
    assert not errors
    for k, answers in seen.items():
        assert all(code == 200 for code, _, _ in answers), k
        versions = [body["model"]["version"] for _, body, _ in answers]
        assert set(versions) == {a, b}, (k, versions)
        first_b = versions.index(b)  # one replica: once B answers, A never again
        assert versions == [a] * first_b + [b] * (len(versions) - first_b), (k, versions)
        for _, body, data in answers:
            check_answer(service, body, data)  # each answer whole from the version it names
    assert requests.get(service["url"] + "/model", timeout=30).json()["version"] == b


def health_when(service, done, timeout_s: float = 30) -> dict:
    """/healthz once `done(health)` holds, or the last one seen after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = requests.get(service["url"] + "/healthz", timeout=30).json()
        if done(health) or time.monotonic() > deadline:
            return health
        time.sleep(POLL_S)


def test_a_bad_champion_keeps_the_old_one_serving(service):
    set_champion(service["root"], service["uris"][1])
    root = open_location(str(service["root"]))
    set_champion(service["root"], (root / "models" / "brainnet" / "20990101-000000-00000000").uri)
    health = health_when(service, lambda h: h["last_error"])
    assert "no model or checkpoint" in health["last_error"] and health["model"]["version"] == service["b"]
    r = post(service, service["images"][1])
    assert r.status_code == 200 and r.json()["model"]["version"] == service["b"]
    set_champion(service["root"], service["uris"][1])  # mended: the error clears
    assert health_when(service, lambda h: not h["last_error"])["last_error"] == ""
