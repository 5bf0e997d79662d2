"""Faults on the cluster in a box (harness.py), each as it happens in production:

- a worker host lost mid-epoch (every process on it SIGKILLed, no notice: a spot reclaim)
  while a replacement host joins: Ray Train restarts the worker group (FailureConfig,
  `--max-failures`) from the latest checkpoint in S3; then, in the same run, the job's driver
  SIGKILLed on the head: the same run name submitted again resumes from the checkpoint in
  S3, after the last completed epoch, and the run finishes;
- a retrain tick from another host while one runs on the cluster: the lease in S3 lets
  exactly one of them work and promote; the other says the lease is held, in one line.

Each fault's figures (recovery seconds, epochs repeated, ...) go to the session's
`fault_figures` (conftest: written to <cluster work>/faults.json, and to
$BRAINMRI_CLUSTER_FIGURES when set). Runs live under s3://<bucket>/faults, apart from
test_pipeline's lake (whose tests count its models and reports)."""

from __future__ import annotations

import os
import time

import pytest

from tests.cluster import harness as hx

from support.data import real_subset

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1500)]
PER_CLASS = 8
EPOCHS = 3
# tiny runs: 64 px, width 8, batches of 4 (a few steps an epoch on each of 2 ranks); every
# epoch streams its rows from S3 (--no-cache: the feed of data larger than memory; Ray Data
# deals the rows, each rank reads its pixel shards from the bucket), else an epoch after the
# first takes 0.1 s and no fault lands inside one
TRAIN = ["--num-workers", "2", "--placement", "spread", "--epochs", str(EPOCHS), "--batch-size", "4",
         "--image-size", "64", "--set", "model_args.width=8", "--no-publish", "--no-cache"]


@pytest.fixture(scope="module")
def lake(cluster, tmp_path_factory):
    """s3://<bucket>/faults: the source uploaded and ingested (local engine, on the head)."""
    src = real_subset(tmp_path_factory.mktemp("faults-src"), per_class=PER_CLASS)
    assert len(cluster.upload(src, "faults/src")) == 4 * PER_CLASS
    lake = f"s3://{cluster.bucket}/faults"
    cluster.submit(["jobs/ingest.py", f"{lake}/src", lake], cluster.work / "faults-ingest.log").check()
    return lake


def train_job(lake: str, run: str) -> list[str]:
    return ["jobs/train.py", "--data", lake, "--out", lake, "--name", run, *TRAIN]


def epochs_in(history) -> list[int]:
    return [h["epoch"] for h in history or []]


def wait_for(what: str, ready, timeout: float, job=None, poll: float = 0.25):
    """ready()'s first truthy value; fails with `what` on the timeout or when `job` (a
    future) ends first."""
    deadline = time.monotonic() + timeout
    while True:
        got = ready()
        if got:
            return got
        if job is not None and job.done():
            r = job.result()
            pytest.fail(f"{what}: the job ended first: {r.describe()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


def resumed_at(history: list) -> list[int]:
    """The epochs at which the run resumed (a history row counts its run's resumes so far)."""
    out, seen = [], 0
    for h in history:
        if h.get("resumes", 0) > seen:
            out.append(h["epoch"])
            seen = h["resumes"]
    return out


# the host-lost restart, then the driver killed an epoch later: room for both and a last epoch
TWO_FAULT_EPOCHS = 5


def test_a_worker_host_lost_then_the_driver_killed_the_run_resumes_from_s3_each_time(cluster, lake,
                                                                                      fault_figures):
    """Two faults of one run, one after the other. Spot reclaim: the host of rank 0 (it writes
    the checkpoints) is powered off mid-epoch and a new host joins; Ray Train replaces the
    worker group, which resumes from the last checkpoint in S3 (at most the epoch in flight is
    trained again, and the killed host is no longer among the ranks). Then, once the new group
    has finished an epoch, the job's driver (its python on the head) is SIGKILLed: the job
    fails, its workers go with it, and the same run name submitted again resumes from the
    checkpoint in S3, after the last completed epoch, not from 0. Every epoch is in the
    history exactly once."""
    run, s3 = "twofaults", cluster.s3()
    key = f"faults/runs/{run}"
    entry = [*train_job(lake, run), "--epochs", str(TWO_FAULT_EPOCHS), "--set", "patience=0"]
    job = cluster.submit_bg(entry, cluster.work / f"{run}.log", timeout=900)
    history = wait_for("the first epoch's checkpoint", lambda: cluster.read_json(f"{key}/history.json", s3),
                       600, job)

    # 1. the host of rank 0 lost, a replacement joining
    placed = cluster.read_json(f"{key}/placement.json", s3)
    rank0 = cluster.node_by_ip(placed["ranks"][0]["ip"])
    before = epochs_in(cluster.read_json(f"{key}/history.json", s3) or history)
    t_kill = time.monotonic()
    cluster.kill(rank0.name)  # every process on the host, SIGKILL, no notice
    killed_s = time.monotonic() - t_kill
    spare = f"w{max(int(n[1:]) for n in cluster.nodes if n.startswith('w')) + 1}"
    cluster.add_worker(spare)  # the autoscaler's replacement
    joined_s = time.monotonic() - t_kill

    def regrouped():  # rank 0 of the new worker group rewrites placement.json
        p = cluster.read_json(f"{key}/placement.json", s3)
        return p if p and p != placed else None

    new_placed = wait_for("the worker group restarted", regrouped, 600, job)
    restarted_s = time.monotonic() - t_kill
    wait_for("an epoch after the kill", lambda: epochs_in(cluster.read_json(f"{key}/history.json", s3))[-1:]
             > before[-1:], 600, job)
    next_epoch_s = time.monotonic() - t_kill

    # 2. the driver killed (a shell may stand between its python and Ray's job supervisor)
    drivers = [p for p in cluster.pids("head", "jobs/train.py", f"--name {run}")
               if "python" in hx.Path(f"/proc/{p}/comm").read_text()]
    assert len(drivers) == 1, drivers
    done = epochs_in(cluster.read_json(f"{key}/history.json", s3))
    assert done[-1] < TWO_FAULT_EPOCHS - 1, done  # the run was still going
    t_driver = time.monotonic()
    hx.os.kill(drivers[0], hx.signal.SIGKILL)
    first = job.result()
    failed_s = time.monotonic() - t_driver
    assert not first.ok, first.describe()
    # (the first job's "resumed from ..." line may not be out: its console polls history.json
    # every 2 s, and the driver dies right after the new group's first epoch lands there)
    assert epochs_in(cluster.read_json(f"{key}/history.json", s3))[:len(done)] == done
    again = cluster.submit(entry, cluster.work / f"{run}.log", timeout=900).check()

    history = cluster.read_json(f"{key}/history.json", s3)
    assert epochs_in(history) == list(range(TWO_FAULT_EPOCHS)), epochs_in(history)  # each epoch once
    # two restarts, each from the checkpoint: never from epoch 0
    assert len(resumed_at(history)) == 2, (before, done, history)
    host_resumed, driver_resumed = resumed_at(history)
    assert before and before[-1] + 1 <= host_resumed <= before[-1] + 2, (before, host_resumed)
    assert done[-1] + 1 <= driver_resumed <= done[-1] + 2, (done, driver_resumed)  # after the last epoch
    assert f"resumed from the checkpoint of epoch {driver_resumed}" in again.output()
    ranks = {x["node_id"] for x in new_placed["ranks"]}
    assert placed["ranks"][0]["node_id"] not in ranks and len(ranks) == 2, (placed, new_placed)
    last = history[-1]
    fault_figures["worker_host_lost"] = {
        "killed": rank0.name, "replacement": spare, "epochs": TWO_FAULT_EPOCHS,
        "last_epoch_checkpointed_at_kill": before[-1], "resumed_at_epoch": host_resumed,
        # the epoch in flight at the kill is trained again (0 when its checkpoint had landed)
        "epochs_repeated": 1 if host_resumed == before[-1] + 1 else 0,
        "kill_s": round(killed_s, 2), "replacement_joined_s": round(joined_s, 1),
        "worker_group_restarted_s": round(restarted_s, 1), "next_epoch_done_s": round(next_epoch_s, 1),
        "epoch_seconds": [round(h["epoch_seconds"], 2) for h in history],
        "replacement_used": cluster.nodes[spare].ip in {x["ip"] for x in new_placed["ranks"]},
        "final": {k: last[k] for k in ("train_loss", "val_accuracy", "val_macro_f1") if k in last},
    }
    fault_figures["driver_killed"] = {
        "epochs": TWO_FAULT_EPOCHS, "last_epoch_seen_at_kill": done[-1], "resumed_at_epoch": driver_resumed,
        "epochs_repeated": 1 if driver_resumed == done[-1] + 1 else 0,
        "job_failed_after_kill_s": round(failed_s, 1), "first_job_s": round(first.seconds, 1),
        "resubmitted_job_s": round(again.seconds, 1),
    }


def test_two_retrain_ticks_on_two_hosts_exactly_one_works_and_promotes(cluster, lake, fault_figures):
    """Tick A runs as a job on the cluster (its driver on the head); while it holds the lease,
    tick B starts on another host (this machine, a client on the cluster's network) on the
    same store: B exits 0 saying in one line that the lease is held, and by whom; A ingests,
    trains, evaluates and promotes; one audit record, one champion."""
    store, ds = lake, "leased"
    args = ["--store", store, "--dataset", ds, "--incoming", f"{lake}/src",
            *[f"--train={kv}" for kv in ("epochs=1", "batch_size=4", "image_size=64", "model_args.width=8",
                                         "num_workers=2", "placement=spread")]]
    s3 = cluster.s3()
    lock = f"faults/retrain/{ds}/lock.json"
    a = cluster.submit_bg(["jobs/retrain.py", *args], cluster.work / "retrain-a.log", timeout=900)
    def holding():
        body = cluster.read_json(lock, s3)
        return body if body and not body.get("released") else None

    held = wait_for("tick A holding the lease", holding, 600, a)
    t0 = time.monotonic()
    b = hx.bench.run([str(hx.VENV_BIN / "brainmri"), "retrain", *args], cluster.work / "retrain-b.log",
                     timeout=300, env=cluster.client_env())
    b_s = time.monotonic() - t0
    ra = a.result().check()
    assert b.ok, b.describe()
    said = [ln for ln in b.output().splitlines() if ln.startswith("retrain:")]
    assert len(said) == 1, b.output()
    assert said[0].startswith(f"retrain: locked: s3://{cluster.bucket}/{lock} is held by {held['host']} "), \
        said
    assert held["host"] == cluster.head.ns  # A's driver: the head host
    assert not a.running() and "retrain: promote" in ra.output(), ra.tail()
    audit = s3.list_objects_v2(Bucket=cluster.bucket,
                               Prefix=f"faults/retrain/{ds}/audit/").get("Contents", [])
    assert len(audit) == 1, audit
    champion = cluster.read_json(f"faults/retrain/{ds}/champion.json", s3)
    assert champion and champion.get("model"), champion
    fault_figures["retrain_lease"] = {
        "tick_a_host": held["host"], "tick_b_s": round(b_s, 1), "tick_b_line": said[0][:200],
        "tick_a_s": round(ra.seconds, 1), "audit_records": len(audit),
    }


CUT_S = int(os.environ.get("BRAINMRI_TEST_CUT_S", "30"))


def test_a_worker_hosts_network_cut_for_30_s_never_hangs_the_run(cluster, lake, fault_figures):
    """The cable of rank 1's host is pulled for 30 s mid-run, then plugged back. Ray's health
    checks may declare the host dead meanwhile (its raylet then exits when it hears so, which
    under load can be well after the cable is back): the host's supervisor starts Ray on it
    again. The run either survives (Ray Train restarts the worker group from the checkpoint in
    S3) or fails with one line and resumes when submitted again under the same name; it never
    hangs (the job has a deadline), and every epoch ends up in the history once."""
    run, s3 = "netcut", cluster.s3()
    key = f"faults/runs/{run}"
    entry = train_job(lake, run)
    job = cluster.submit_bg(entry, cluster.work / f"{run}.log", timeout=900)
    wait_for("the first epoch", lambda: cluster.read_json(f"{key}/history.json", s3), 600, job)
    placed = cluster.read_json(f"{key}/placement.json", s3)
    victim = cluster.node_by_ip(placed["ranks"][1]["ip"])
    before = epochs_in(cluster.read_json(f"{key}/history.json", s3))
    t_cut = time.monotonic()
    with cluster.supervise(victim.name) as supervisor:
        cluster.link(victim.name, up=False)
        try:
            time.sleep(CUT_S)
        finally:
            cluster.link(victim.name, up=True)
        first = job.result()
    first_s = time.monotonic() - t_cut
    assert not supervisor["errors"], supervisor
    declared_dead = supervisor["restarts"] > 0
    assert first.returncode is not None, f"the run hung past its deadline: {first.describe()}"
    outcome, again = "survived", None
    if not first.ok:
        said = [ln for ln in first.output().splitlines() if ln.startswith("brainmri train: error:")]
        assert len(said) == 1, first.tail()
        outcome = "failed in one line, resumed when resubmitted"
        again = cluster.submit(entry, cluster.work / f"{run}.log", timeout=900).check()
    history = cluster.read_json(f"{key}/history.json", s3)
    assert epochs_in(history) == list(range(EPOCHS)), epochs_in(history)  # each epoch once
    resumed = resumed_at(history)
    assert all(r >= before[-1] + 1 for r in resumed), (before, resumed)  # never from the start again
    fault_figures["network_cut"] = {
        "host": victim.name, "rank": 1, "cut_s": CUT_S, "declared_dead": declared_dead,
        "outcome": outcome, "first_job_after_cut_s": round(first_s, 1),
        "line": said[0][:300] if again else None,
        "resubmitted_job_s": round(again.seconds, 1) if again else None,
        "last_epoch_checkpointed_at_cut": before[-1], "resumed_at_epochs": resumed,
        "epochs_repeated": sum(1 for r in resumed if r == before[-1] + 1),
    }


# the notice comes after the first epoch; tiny streamed epochs take 3-7 s on a quiet tier and
# 8-13 s beside the rest of the suite, so 10 outlast the 10 s notice and the restart with room
# (the deadline's kill landed in epoch 2 of 20 in the suite), and each extra one costs seconds
NOTICE_S, DRAIN_EPOCHS = 10, 10


def test_a_worker_host_drained_with_notice_costs_no_failure_and_loses_at_most_the_epoch_in_flight(
        cluster, lake, fault_figures):
    """A spot reclaim with notice: rank 1's host is drained (`ray drain-node`, reason
    preemption, deadline 10 s: what the autoscaler does on a cloud's notice) while a
    replacement joins, then powered off at the deadline. Ray 2.60 Train watches Ray's draining
    nodes and counts the restart for a drained host against
    FailureConfig.max_preemption_failures (no limit), not max_failures: the run goes on with
    `--max-failures 0` on the replacement, from the last checkpoint in S3, every epoch once.
    Killed without notice, the same run would fail (max_failures 0)."""
    run, s3 = "drain", cluster.s3()
    key = f"faults/runs/{run}"
    job = cluster.submit_bg([*train_job(lake, run), "--epochs", str(DRAIN_EPOCHS), "--max-failures", "0",
                             "--set", "patience=0"],  # no early stop before the last epoch
                            cluster.work / f"{run}.log", timeout=900)
    wait_for("the first epoch", lambda: cluster.read_json(f"{key}/history.json", s3), 600, job)
    placed = cluster.read_json(f"{key}/placement.json", s3)
    victim = cluster.node_by_ip(placed["ranks"][1]["ip"])
    spare = f"w{max(int(n[1:]) for n in cluster.nodes if n.startswith('w')) + 1}"
    drain = [str(hx.VENV_BIN / "ray"), "drain-node", "--address", f"{cluster.head.ip}:{hx.GCS_PORT}",
             "--node-id", placed["ranks"][1]["node_id"], "--reason", "DRAIN_NODE_REASON_PREEMPTION",
             "--reason-message", "spot reclaim (test)", "--deadline-remaining-seconds", str(NOTICE_S)]
    t_notice = time.monotonic()
    drained = hx.bench.run(drain, cluster.work / f"{run}-drain.log", timeout=60, env=cluster.client_env())
    at_notice = epochs_in(cluster.read_json(f"{key}/history.json", s3))
    assert drained.ok, drained.describe()
    assert at_notice[-1] < DRAIN_EPOCHS - 1, at_notice  # the run was still going
    cluster.add_worker(spare)  # the autoscaler's replacement, started on the notice
    time.sleep(max(0.0, t_notice + NOTICE_S - time.monotonic()))
    at_kill = epochs_in(cluster.read_json(f"{key}/history.json", s3))
    cluster.kill(victim.name)  # the cloud takes the host at the deadline
    r = job.result()
    assert r.ok, r.tail()  # the preemption did not count as one of the 0 failures allowed
    history = cluster.read_json(f"{key}/history.json", s3)
    assert epochs_in(history) == list(range(DRAIN_EPOCHS)), epochs_in(history)  # each epoch once
    resumed = resumed_at(history)
    assert resumed, "the worker group never restarted: the drain did not reach the run"
    assert all(x >= at_notice[-1] + 1 for x in resumed), (at_notice, resumed)
    new_placed = cluster.read_json(f"{key}/placement.json", s3)
    assert victim.ip not in {x["ip"] for x in new_placed["ranks"]}, new_placed
    fault_figures["drain_with_notice"] = {
        "host": victim.name, "replacement": spare, "notice_s": NOTICE_S, "max_failures": 0,
        "epochs": DRAIN_EPOCHS, "last_epoch_at_notice": at_notice[-1], "last_epoch_at_kill": at_kill[-1],
        "resumed_at_epochs": resumed,
        # the epoch in flight at the deadline is trained again (0 when the group stopped between)
        "epochs_repeated": sum(1 for x in resumed if x <= at_kill[-1] + 1),
        "job_after_notice_s": round(time.monotonic() - t_notice, 1),
        "replacement_used": cluster.nodes[spare].ip in {x["ip"] for x in new_placed["ranks"]},
        "said": [ln.strip()[:200] for ln in r.output().splitlines() if "preempt" in ln.lower()][:3],
    }
