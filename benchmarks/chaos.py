"""Chaos: SIGKILL ingest, training and retrain at random moments, re-run them, and check what a
reader would see after every kill and every re-run. Then tamper with stored files and check
that every kind is refused.

    .venv/bin/python -m benchmarks.chaos [--trials 21] [--seed 0] [--kinds ingest,train,retrain]
                                         [--per-class 24] [--work DIR] [--budget-min 40]
                                         [--train-seconds S]

Each trial runs one `brainmri` command in its own process group (with its own local Ray), kills
the whole group (driver, Ray, workers: a node dying) after a random delay drawn from
[0, 1.2 x the kind's uninterrupted duration], checks the store, re-runs the same command to the
end and checks again. The kinds take turns; trial i uses seed <seed>*1000+i (printed), so a
failure can be replayed alone with --only i.

What is checked, after each kill and after each re-run:
  datasets   every version with a manifest verifies (shard sizes and sha256); latest_version
             resolves only to such a version; a re-run publishes every accepted image; every
             pixel-shard set with a pixels.json verifies (every other train trial streams)
  runs       every checkpoint Ray registered loads (weights_only); after a re-run the run
             resumed from its last persisted epoch (no completed epoch is trained again)
  models     every version with metadata.json has a model.pt that matches its sha256;
             models/<name> never resolves to an unpromoted candidate
  champion   the champion is a complete, verifying model; its audit record says "promoted",
             and its frozen-test metrics were not worse than the champion it replaced
             (beyond the tolerances) -- every other retrain trial trains its challenger with
             a useless learning rate, which may win only where that rule lets it
Exit status 1 if anything failed. Bounded: stops starting trials after --budget-min.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness

NAME = "chaos"
TINY = ["--image-size", "64", "--batch-size", "16", "--num-workers", "1",
        "--set", "model_args={width: 8}", "--set", "patience=0", "--set", "warmup_epochs=0.5"]
EPOCHS = 4


class Chaos:
    def __init__(self, work: Path, per_class: int):
        self.work, self.per_class = work, per_class
        self.lake = work / "lake"
        self.src = work / "src"
        self.incoming = work / "incoming"
        self.failures: list[str] = []
        self.last = None  # the last command's harness.Run
        self.next_offset = 1000  # fresh scans for each retrain trial come from here on

    # -- processes -------------------------------------------------------------------------
    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "brainmri", *args]

    def run(self, args: list[str], kill_after: float | None = None) -> tuple[int | None, float]:
        """Run a command in its own process group (its own local Ray); SIGKILL the group after
        kill_after seconds. -> (exit status, or None if killed; seconds)."""
        self.last = harness.run(args, self.work / "last.log", timeout=kill_after, cwd=self.work)
        return self.last.returncode, self.last.seconds

    def must(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
            print(f"    FAIL {what}", flush=True)

    def tail(self) -> str:
        return self.last.tail(600)

    # -- commands --------------------------------------------------------------------------
    def ingest_cmd(self, seed: int) -> list[str]:
        return self.cmd("ingest", str(self.src), str(self.lake), "--name", NAME, "--seed", str(seed))

    def train_cmd(self, name: str, stream: bool = False) -> list[str]:
        """`stream`: the worker cache off, so the run first builds the version's pixel shards
        (a kill can land in that build) and streams them every epoch."""
        return self.cmd("train", "--data", str(self.lake), "--dataset", NAME, "--out", str(self.lake),
                        "--name", name, "--epochs", str(EPOCHS), *TINY,
                        *(["--set", "cache=false"] if stream else []))

    def retrain_cmd(self, bad: bool) -> list[str]:
        train = ["--train", "epochs=2", "--train", "image_size=64", "--train", "batch_size=16",
                 "--train", "num_workers=1", "--train", "model_args={width: 8}",
                 "--train", "patience=0", "--train", f"lr={'0.0000001' if bad else '0.003'}"]
        return self.cmd("retrain", "--store", str(self.lake), "--dataset", NAME, "--incoming",
                        str(self.incoming), "--lock-ttl-min", "0.05", "--wait-lock-s", "30", *train)

    # -- the checks ------------------------------------------------------------------------
    def check_store(self, when: str) -> None:
        from brainmri.core.storage import open_location
        from brainmri.data.datasets import dataset_root, latest_version, load_manifest, verify_shards
        from brainmri.data.pixels import PIXELS_MANIFEST, load_pixels
        from brainmri.evaluation.inference import open_model
        from brainmri.models.checkpoints import CKPT_FILE, META_FILE, load_state, model_file

        store = open_location(str(self.lake))
        root = dataset_root(store, NAME)
        for v in root.listdir():
            loc = root / v
            if (loc / "manifest.json").exists():
                try:
                    verify_shards(loc, load_manifest(loc))
                except Exception as e:  # noqa: BLE001 -- every failure is a finding
                    self.must(False, f"{when}: complete dataset {v} does not verify: {e}")
                for key in (loc / "pixels").listdir():  # every recorded pixel-shard set verifies
                    if (loc / "pixels" / key / PIXELS_MANIFEST).exists():
                        try:
                            pix = (loc / "pixels" / key / PIXELS_MANIFEST).read_json()
                            self.must(load_pixels(loc, load_manifest(loc), pix["image_size"], pix["splits"])
                                      is not None, f"{when}: pixel shards {v}/{key} are not this version's")
                        except Exception as e:  # noqa: BLE001
                            self.must(False, f"{when}: pixel shards {v}/{key} do not verify: {e}")
        if any((root / v / "manifest.json").exists() for v in root.listdir()):
            latest = latest_version(store, NAME)
            self.must((latest / "manifest.json").exists(), f"{when}: latest_version is incomplete")
        for run in (store / "runs").listdir():
            for ck in (store / "runs" / run).listdir():
                f = store / "runs" / run / ck / CKPT_FILE
                if ck.startswith("checkpoint_") and self.registered(store / "runs" / run, ck):
                    try:
                        load_state(f.read_bytes())
                    except Exception as e:  # noqa: BLE001
                        self.must(False, f"{when}: registered checkpoint {run}/{ck} unreadable: {e}")
        models = store / "models"
        for name in models.listdir():
            for v in (models / name).listdir():
                if (models / name / v / META_FILE).exists():
                    try:
                        open_model((models / name / v).uri)
                    except Exception as e:  # noqa: BLE001
                        self.must(False, f"{when}: complete model {name}/{v} does not verify: {e}")
            try:
                served = model_file((models / name).uri)
            except Exception:  # noqa: BLE001 -- only candidates so far: refused, correct
                served = None
            if served is not None:
                meta = (open_location(served.uri.rsplit("/", 1)[0]) / META_FILE).read_json()
                champ = self.champion()
                promoted = champ and champ.get("model", "").rstrip("/").endswith(meta["version"])
                self.must(meta.get("stage") != "candidate" or promoted,
                          f"{when}: models/{name} serves candidate {meta['version']} that was never promoted")
        self.check_champion(when)

    @staticmethod
    def registered(run, ck: str) -> bool:
        """Is checkpoint folder `ck` one that Ray Train registered (its snapshot lists it)?"""
        snap = run / "checkpoint_manager_snapshot.json"
        return snap.exists() and ck in snap.read_bytes().decode(errors="replace")

    def champion(self) -> dict | None:
        from brainmri.core.storage import open_location

        loc = open_location(str(self.lake)) / "retrain" / NAME / "champion.json"
        c = loc.read_json() if loc.exists() else None
        return c if c and c.get("model") else None

    def check_champion(self, when: str) -> None:
        from brainmri.config import RetrainConfig
        from brainmri.evaluation.inference import open_model
        from brainmri.ops.retrain import audit_log, decide

        champ = self.champion()
        if champ is None:
            return
        try:
            open_model(champ["model"])
        except Exception as e:  # noqa: BLE001
            self.must(False, f"{when}: champion {champ['model']} does not verify: {e}")
        audits = {a["id"]: a for a in audit_log(str(self.lake), NAME)}
        audit_id = (champ.get("audit") or "").rsplit("/", 1)[-1].removesuffix(".json")
        rec = audits.get(audit_id)
        self.must(rec is not None and rec["decision"] == "promoted"
                  and rec["challenger"]["model"] == champ["model"],
                  f"{when}: champion {champ['model']} has no audit record promoting it")
        if rec and rec["champion"]:
            ok, why = decide(rec["champion"]["test"], rec["challenger"]["test"], RetrainConfig())
            self.must(ok, f"{when}: champion replaced by a worse model: {why}")

    # -- the trials ------------------------------------------------------------------------
    def trial(self, kind: str, i: int, rng: random.Random, typical: dict) -> None:
        delay = rng.uniform(0.0, 1.2 * typical[kind])
        getattr(self, f"trial_{kind}")(i, rng, delay)

    def trial_ingest(self, i: int, rng: random.Random, delay: float) -> None:
        args = self.ingest_cmd(seed=100 + i)  # a new seed: a new split, a new version to write
        rc, t = self.run(args, kill_after=delay)
        print(f"  ingest  killed={rc is None} after {t:.1f}s", flush=True)
        self.check_store(f"trial {i} ingest after kill")
        rc, _ = self.run(args)
        self.must(rc == 0, f"trial {i} ingest re-run exited {rc}: {self.tail()}")
        from brainmri.core.storage import open_location
        from brainmri.data.datasets import dataset_root

        root = dataset_root(open_location(str(self.lake)), NAME)
        mans = [(root / v / "manifest.json").read_json() for v in root.listdir()
                if (root / v / "manifest.json").exists()]
        man = next((m for m in mans if m["ingest"]["seed"] == 100 + i), None)
        self.must(man is not None, f"trial {i} ingest re-run published no version")
        if man:
            f = man["files"]
            self.must(f["seen"] == f["accepted"] + f["duplicate"] + f["rejected"]
                      and sum(man["rows"].values()) == f["accepted"],
                      f"trial {i} ingest: not every input accounted for: {f} {man['rows']}")
        self.check_store(f"trial {i} ingest after re-run")

    def trial_train(self, i: int, rng: random.Random, delay: float) -> None:
        from brainmri.core.storage import open_location
        from brainmri.models.checkpoints import CKPT_FILE, load_state

        name = f"chaos-train-{i}"
        stream = (i // 3) % 2 == 0  # every other train trial streams pixel shards, the first one too
        args = self.train_cmd(name, stream)
        rc, t = self.run(args, kill_after=delay)
        run = open_location(str(self.lake)) / "runs" / name
        done = len((run / "history.json").read_json()) if (run / "history.json").exists() else 0
        print(f"  train   killed={rc is None} after {t:.1f}s, {done} epochs persisted"
              f"{' (streaming pixel shards)' if stream else ''}", flush=True)
        self.check_store(f"trial {i} train after kill")
        rc, _ = self.run(args)
        self.must(rc == 0, f"trial {i} train re-run exited {rc}: {self.tail()}")
        h = (run / "history.json").read_json() if (run / "history.json").exists() else []
        self.must([e["epoch"] for e in h] == list(range(EPOCHS)),
                  f"trial {i} train: history epochs {[e['epoch'] for e in h]}")
        starts = set()
        for ck in run.listdir():
            if ck.startswith("checkpoint_") and (run / ck / CKPT_FILE).exists():
                starts |= set(load_state((run / ck / CKPT_FILE).read_bytes()).get("resumes", []))
        lost = [s for s in starts if 0 < s < done]
        self.must(not lost, f"trial {i} train: resumed at epoch {lost} although {done} were persisted")
        self.check_store(f"trial {i} train after re-run")

    def trial_retrain(self, i: int, rng: random.Random, delay: float) -> None:
        # new scans: there is something to decide
        harness.copy_scans(self.incoming / "Training", 3, self.next_offset)
        self.next_offset += 3
        bad = i % 2 == 1
        before = self.champion()
        args = self.retrain_cmd(bad)
        rc, t = self.run(args, kill_after=delay)
        print(f"  retrain killed={rc is None} after {t:.1f}s (bad recipe: {bad})", flush=True)
        self.check_store(f"trial {i} retrain after kill")
        rc, _ = self.run(args)
        self.must(rc == 0, f"trial {i} retrain re-run exited {rc}: {self.tail()}")
        after = self.champion()
        changed = bool(before) and after["model"] != before["model"]
        print(f"  retrain champion {'replaced' if changed else 'kept'} (bad recipe: {bad})", flush=True)
        self.check_store(f"trial {i} retrain after re-run")


def tamper_checks(lake: Path) -> list[tuple[str, bool]]:
    """Copy the newest complete version and model; damage them six ways; is each refused?"""
    import pyarrow.parquet as pq

    from brainmri.core.storage import open_location
    from brainmri.data.datasets import latest_version, load_manifest, verify_shards
    from brainmri.evaluation.inference import open_model
    from brainmri.models.checkpoints import model_file

    store = open_location(str(lake))
    v0 = Path(latest_version(store, NAME).path)
    man = load_manifest(open_location(str(v0)))
    train = next(s for s in man["shards"] if s["split"] == "train")
    test = next(s for s in man["shards"] if s["split"] == "test")

    def flip(path: Path, at: int, n: int) -> None:
        b = bytearray(path.read_bytes())
        for k in range(at, at + n):
            b[k] ^= 0xFF
        path.write_bytes(bytes(b))

    def image_bytes(v: Path) -> None:
        flip(v / train["path"], 200, 64)

    def label_column(v: Path) -> None:
        md = pq.ParquetFile(v / train["path"]).metadata
        col = md.row_group(0).column(md.schema.names.index("label"))
        flip(v / train["path"], (col.dictionary_page_offset or col.data_page_offset)
             + col.total_compressed_size - 8, 4)

    def test_shard_as_train(v: Path) -> None:
        shutil.copyfile(v / test["path"], v / train["path"])

    def truncated(v: Path) -> None:
        p = v / train["path"]
        p.write_bytes(p.read_bytes()[:-100])

    def missing(v: Path) -> None:
        (v / train["path"]).unlink()

    results = []
    for fn in (image_bytes, label_column, test_shard_as_train, truncated, missing):
        with tempfile.TemporaryDirectory() as d:
            v = Path(d) / "v"
            shutil.copytree(v0, v)
            fn(v)
            loc = open_location(str(v))
            try:
                verify_shards(loc, load_manifest(loc))
                results.append((fn.__name__, False))
            except Exception:  # noqa: BLE001 -- refused: detected
                results.append((fn.__name__, True))
    try:
        mf = Path(model_file((store / "models" / "brainnet").uri).path)
    except Exception:  # noqa: BLE001 -- no released model in this store
        return results
    with tempfile.TemporaryDirectory() as d:
        m = Path(d) / mf.parent.name
        shutil.copytree(mf.parent, m)
        flip(m / mf.name, len(mf.read_bytes()) // 2, 8)
        try:
            open_model(str(m))
            results.append(("model_weights", False))
        except Exception:  # noqa: BLE001
            results.append(("model_weights", True))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=21)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="ingest,train,retrain")
    ap.add_argument("--per-class", type=int, default=24, help="scans per class in the source")
    ap.add_argument("--work", default="", help="working folder (default: a fresh temp folder)")
    ap.add_argument("--budget-min", type=float, default=40.0, help="start no trial after this")
    ap.add_argument("--only", type=int, default=-1, help="run only trial i (replay a failure)")
    ap.add_argument("--train-seconds", type=float, default=0.0,
                    help="an uninterrupted training's seconds, the scale of its kill delays, instead of "
                         "a reference run to measure it (0: measure)")
    a = ap.parse_args(argv)
    harness.training_folder()  # the shared scans are there (else: exit 2, one line)
    kinds = a.kinds.split(",")
    work = Path(a.work or tempfile.mkdtemp(prefix="brainmri-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    c = Chaos(work, a.per_class)
    harness.copy_scans(c.src / "Training", a.per_class, 0)
    harness.copy_scans(c.incoming / "Training", a.per_class, 200)

    # uninterrupted runs: the first dataset, model and champion, and each kind's duration
    typical = {}
    rc, typical["ingest"] = c.run(c.ingest_cmd(seed=0))
    assert rc == 0, c.tail()
    if "train" in kinds and a.train_seconds > 0:
        typical["train"] = a.train_seconds  # given, not measured: the retrain below trains too
    elif "train" in kinds:
        rc, typical["train"] = c.run(c.train_cmd("chaos-reference"))
        assert rc == 0, c.tail()
    if "retrain" in kinds:
        rc, typical["retrain"] = c.run(c.retrain_cmd(bad=False))
        assert rc == 0, c.tail()
    print(f"work {work}; uninterrupted seconds: " + json.dumps({k: round(v, 1) for k, v in typical.items()}),
          flush=True)
    c.check_store("reference runs")

    ran = 0
    for i in range(a.trials):
        if a.only >= 0 and i != a.only:
            continue
        if (time.time() - t_start) / 60 > a.budget_min:
            print(f"budget of {a.budget_min} min spent: stopping before trial {i}")
            break
        kind = kinds[i % len(kinds)]
        seed = a.seed * 1000 + i
        print(f"trial {i}: {kind}, seed {seed}", flush=True)
        n_fail = len(c.failures)
        c.trial(kind, i, random.Random(seed), typical)
        ran += 1
        print(f"  {'ok' if len(c.failures) == n_fail else 'FAILED'}", flush=True)

    tampers = tamper_checks(c.lake)
    for kind, detected in tampers:
        c.must(detected, f"tamper {kind} not detected")
    summary = {"trials": ran, "kinds": kinds, "seed": a.seed, "failures": len(c.failures),
               "tamper_detected": [k for k, ok in tampers if ok],
               "tamper_missed": [k for k, ok in tampers if not ok],
               "minutes": round((time.time() - t_start) / 60, 1)}
    print(json.dumps(summary))
    for f in c.failures:
        print("FAILURE:", f)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
