"""The pipeline across hosts: ingest (the ray engine, the source in S3), training with its two
ranks spread over two worker hosts, and evaluation, each submitted as users submit jobs
(`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml`) to a cluster whose
hosts share nothing but the S3 server (harness.py). Every artefact is read back from this
machine, another host on the cluster's network, and verified."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from brainmri.core.storage import open_location
from brainmri.data.datasets import resolve_dataset, verify_shards
from brainmri.models.checkpoints import load_state
from brainmri.serving.app import APP
from tests.cluster import harness as hx

from support.data import CLASSES, real_subset

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1500)]
RUN = "spread"
SERVE_PORT = 8000
PER_CLASS = 8
# what a host writes locally for a run it takes part in: none of it may stay on a host's disk
ARTEFACTS = (".parquet", ".pt", ".onnx", "manifest.json", "metadata.json", "placement.json")


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """The source uploaded, then the three jobs in order; {step: harness Run}."""
    src = real_subset(tmp_path_factory.mktemp("src"), per_class=PER_CLASS)
    assert len(cluster.upload(src, "src")) == 4 * PER_CLASS
    return {step: cluster.submit(entrypoint, cluster.work / f"{step}.log", timeout=600).check()
            for step, entrypoint in hx.pipeline_jobs(cluster.bucket, RUN)}


@pytest.fixture
def lake(cluster):
    """s3://<bucket>/lake as this machine's brainmri storage sees it."""
    with cluster.as_client():
        yield open_location(f"s3://{cluster.bucket}/lake", check=True)


def sha256(loc) -> str:
    return hashlib.sha256(loc.read_bytes()).hexdigest()


def test_ingest_reads_the_source_from_s3_into_a_version_that_verifies(jobs, lake):
    version, manifest = resolve_dataset(lake.uri, "brain-tumor-mri")
    assert manifest["source"] == f"s3://{lake.path.split('/')[0]}/src"
    assert sum(manifest["rows"].values()) == 4 * PER_CLASS and manifest["rows"]["test"] > 0
    verify_shards(version, manifest)  # every shard's size and sha256, read over the network
    listed = {"manifest.json", "inventory.csv", "rejects.csv"} | {s["path"] for s in manifest["shards"]}
    assert {version.relative(f.path) for f in version.files()} == listed  # no debris of any writer


def test_train_runs_its_two_ranks_on_two_worker_hosts(jobs, lake, cluster):
    placed = (lake / "runs" / RUN / "placement.json").read_json()
    workers = {n["node_id"]: n["node_ip"] for n in cluster.alive_nodes() if not n["is_head_node"]}
    ranks = placed["ranks"]
    assert placed["placement"] == "spread" and placed["nodes"] == 2 and len(ranks) == 2
    assert len({r["node_id"] for r in ranks}) == 2
    assert all(workers.get(r["node_id"]) == r["ip"] for r in ranks), (ranks, workers)
    history = (lake / "runs" / RUN / "history.json").read_json()
    assert [h["epoch"] for h in history] == [0, 1]
    checkpoints = (lake / "runs" / RUN).files("checkpoint.pt")
    assert checkpoints and all(load_state(c.read_bytes())["epoch"] in (0, 1) for c in checkpoints)


def test_the_published_model_verifies_from_another_host(jobs, lake):
    [version] = (lake / "models" / "brainnet").listdir()
    folder = lake / "models" / "brainnet" / version
    meta = (folder / "metadata.json").read_json()
    assert meta["sha256"] == sha256(folder / "model.pt") and version.endswith(meta["sha256"][:8])
    for kind, export in meta["exports"].items():
        assert "error" not in export, (kind, export)
        assert export["sha256"] == sha256(folder / export["file"])
    assert meta["dataset"]["uri"].startswith(f"{lake.uri}/datasets/brain-tumor-mri/")
    assert load_state((folder / "model.pt").read_bytes())["classes"] == meta["classes"]


def test_the_evaluation_report_lands_whole_in_the_bucket(jobs, lake):
    [report] = (lake / "reports").files("complete.json")
    folder = open_location(report.uri.rsplit("/", 1)[0])
    done = report.read_json()
    assert done["complete"] and "metrics.json" in done["files"]
    assert all((folder / f).is_file() for f in done["files"])
    _, manifest = resolve_dataset(lake.uri, "brain-tumor-mri")
    metrics = (folder / "metrics.json").read_json()
    assert metrics["counts"]["evaluated"] == manifest["rows"]["test"]
    [version] = (lake / "models" / "brainnet").listdir()  # the model it evaluated, as published
    meta = (lake / "models" / "brainnet" / version / "metadata.json").read_json()
    assert metrics["model"]["sha256"] == meta["sha256"]


def serve_replicas(cluster) -> tuple[str, list[dict]]:
    """The Serve application's status and its replicas ({node_id, state, ...}), by the
    dashboard's Serve API ("" and [] before it exists)."""
    _, body = cluster.request(f"{cluster.dashboard}/api/serve/applications/")
    try:
        app = json.loads(body)["applications"].get(APP, {})
    except (TypeError, ValueError, KeyError):
        return "", []
    deployments = app.get("deployments", {}).values()
    return app.get("status", ""), [r for d in deployments for r in d.get("replicas", [])]


def test_serve_answers_through_the_head_from_replicas_on_the_worker_hosts(jobs, lake, cluster, tmp_path):
    """`brainmri serve` as a detached job: two one-CPU replicas land on two worker hosts (the
    head has no CPU), each loads the published model from S3, and a scan POSTed to the head's
    address is answered by one of them through the head's proxy. Deleted after (the fault
    tests need the CPUs); run before the disk check, which then covers the replicas too."""
    model = f"{lake.uri}/models/brainnet"
    cluster.submit(["jobs/serve.py", "--model", model, "--host", "0.0.0.0", "--port", str(SERVE_PORT),
                    "--replicas", "2", "--cpus-per-replica", "1", "--poll-s", "0", "--detach"],
                   cluster.work / "serve.log", timeout=300).check()
    try:
        deadline = time.monotonic() + 180
        while True:
            status, replicas = serve_replicas(cluster)
            if status == "RUNNING" and len(replicas) == 2 and all(r["state"] == "RUNNING" for r in replicas):
                break
            assert time.monotonic() < deadline, (status, replicas, hx.tail(cluster.work / "serve.log"))
            time.sleep(2)
        workers = {n["node_id"] for n in cluster.alive_nodes() if not n["is_head_node"]}
        assert len({r["node_id"] for r in replicas}) == 2 and {r["node_id"] for r in replicas} <= workers
        scan = next((real_subset(tmp_path, per_class=1) / "Training").rglob("*.jpg"))
        code, body = cluster.request(f"http://{cluster.head.ip}:{SERVE_PORT}/predict", data=scan.read_bytes(),
                                     headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert code == 200, (code, body)
        answer = json.loads(body)
        [version] = (lake / "models" / "brainnet").listdir()
        assert answer["ok"] and answer["class"] in CLASSES and answer["model"]["version"] == version, answer
    finally:
        cluster.request(f"{cluster.dashboard}/api/serve/applications/", method="DELETE", timeout=60)
        deadline = time.monotonic() + 120
        while serve_replicas(cluster)[1] and time.monotonic() < deadline:
            time.sleep(2)
    assert not serve_replicas(cluster)[1], "the replicas outlived the application's deletion"


# two trials of one 1-CPU worker: on the tier's three 1-CPU hosts they run at once on two of
# them, the third left to Ray Data (ops.tune.concurrency); tiny, as the pipeline's train job
# 8 epochs, none cut by ASHA (grace = epochs), so that the trials overlap however slowly a host
# starts its worker. With 2, in one suite run (every host shares the machine's 2 cores), the
# second trial's worker group was placed 15 s after the first's (GCS log) and its worker took
# 29 s to start (the first's 17 s): it began 12 s after the first trial's 2 epochs had ended
TUNE_SPACE = {"base": {"epochs": 8, "image_size": 64, "batch_size": 8, "warmup_epochs": 0.5, "patience": 0},
              "space": {"model": {"brainnet": {"model_args.width": [8]}}, "lr": [1e-3, 3e-3]}}


def test_tune_runs_two_trials_at_once_on_two_worker_hosts(jobs, lake, cluster):
    """`jobs/tune.py --max-concurrent 2`, its space read from the bucket and its results
    written to another store: the two trials' ranks ran on two different worker hosts, at the
    same time (each trial's placement.json, written when its workers start, is older than the
    other's last history.json), and the winner is published and verifies."""
    import yaml

    cluster.s3().put_object(Bucket=cluster.bucket, Key="spaces/tiny.yaml", Body=yaml.safe_dump(TUNE_SPACE))
    out = f"s3://{cluster.bucket}/tuned"
    cluster.submit(["jobs/tune.py", "--data", lake.uri, "--out", out, "--space",
                    f"s3://{cluster.bucket}/spaces/tiny.yaml", "--name", "two", "--num-samples", "2",
                    "--max-concurrent", "2", "--grace-period", "8", "--no-evaluate"],
                   cluster.work / "tune.log", timeout=600).check()
    with cluster.as_client():
        runs = open_location(out) / "tune" / "two" / "runs"
        placed = {f.uri: f.read_json() for f in runs.files("placement.json")}
        assert len(placed) == 2, list(placed)
        nodes = [{r["node_id"] for r in p["ranks"]} for p in placed.values()]
        workers = {n["node_id"] for n in cluster.alive_nodes() if not n["is_head_node"]}
        assert all(len(n) == 1 for n in nodes) and nodes[0] != nodes[1] and nodes[0] | nodes[1] <= workers
        s3, spans = cluster.s3(), []
        for uri in placed:
            key = uri.split(f"s3://{cluster.bucket}/", 1)[1]
            start = s3.head_object(Bucket=cluster.bucket, Key=key)["LastModified"]
            end = s3.head_object(Bucket=cluster.bucket, Key=key.replace("placement.json", "history.json"))
            spans.append((start, end["LastModified"]))
        (a0, a1), (b0, b1) = spans
        assert a0 <= b1 and b0 <= a1, spans  # both running at once
        [model] = (open_location(out) / "models" / "brainnet").listdir()
        folder = open_location(out) / "models" / "brainnet" / model
        assert (folder / "metadata.json").read_json()["sha256"] == sha256(folder / "model.pt")


def test_no_artefact_stays_on_a_hosts_own_disk(jobs, cluster):
    """Every host's local disk (its /tmp, Ray's temp dir and TMPDIR in it): what it wrote for
    the run went to S3, nothing of it lies where another host could not reach it."""
    disks = [n.disk for n in cluster.nodes.values()]
    left = [p for d in disks for p in d.rglob("*") if p.is_file() and p.name.endswith(ARTEFACTS)]
    assert all(d.is_dir() for d in disks) and not left, left


def test_a_job_past_its_deadline_is_stopped_not_left_holding_the_cluster(cluster):
    """The harness's deadline kills `ray job submit`, a client; the job itself would run on,
    holding CPUs a later job waits for (one such left-over starved the next fault test). The
    harness stops it on the cluster (`ray job stop`)."""
    sleeper = ["-c", "__import__('time').sleep(600)"]
    r = cluster.submit(sleeper, cluster.work / "deadline.log", timeout=20)
    assert r.returncode is None, r.describe()
    jobs = json.loads(cluster.request(f"{cluster.dashboard}/api/jobs/")[1] or b"[]")
    mine = [j for j in jobs if "sleep(600)" in j.get("entrypoint", "")]
    assert mine and all(j["status"] == "STOPPED" for j in mine), mine
