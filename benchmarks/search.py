"""Random search against TPE at the same budget: `brainmri tune` (the real Ray Tune search,
ASHA included) on one space, one dataset version and one trial budget, for several search
seeds each. Prints, per searcher, the best validation macro-F1 found after each number of
trials (trials in the order they were proposed) and the mean and spread over seeds.

    .venv/bin/python -m benchmarks.search --store ./lake --space configs/tune-cpu.yaml \
        --trials 8 --seeds 0 1 2 --epochs 3 --limit-train 1024 --limit-val 512 \
        --json benchmarks/results/search-cpu-<date>.json

On 2 cores a trial of the CPU space at 128 px takes minutes; --epochs, --limit-train and
--limit-val shorten every trial alike (what is compared is how the searchers spend a budget).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from brainmri.config import SEARCHERS, TuneConfig


def best_so_far(rows: list[dict]) -> list[float]:
    """The best score after each trial, trials in proposal order (ids are t000, t001, ...)."""
    out, best = [], float("nan")
    for r in sorted(rows, key=lambda r: r["trial"]):
        f1 = r["best_val_macro_f1"]
        if f1 is not None and not best >= f1:  # `not >=`: the first score replaces the NaN
            best = f1
        out.append(best)
    return out


def one_search(a, searcher: str, seed: int, work: Path) -> dict:
    from brainmri.ops.tune import run_search

    t0 = time.time()
    res = run_search(TuneConfig(data=a.store, dataset=a.dataset, out=str(work), space=a.space,
                                name=f"{searcher}-s{seed}", search=searcher, seed=seed,
                                num_samples=a.trials, epochs=a.epochs, limit_train=a.limit_train,
                                limit_val=a.limit_val, evaluate=False, max_concurrent=a.max_concurrent))
    curve = best_so_far(res.leaderboard)
    print(f"[search] {searcher:6s} seed {seed}: best after 1..{a.trials} trials "
          + " ".join(f"{v:.4f}" for v in curve) + f" ({time.time() - t0:.0f} s)", flush=True)
    return {"searcher": searcher, "seed": seed, "curve": curve, "seconds": time.time() - t0,
            "trials": [{k: r[k] for k in ("trial", "status", "best_val_macro_f1", "epochs_run", "config")}
                       for r in res.leaderboard]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="./lake")
    ap.add_argument("--dataset", default="brain-tumor-mri")
    ap.add_argument("--space", default="configs/tune-cpu.yaml")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit-train", type=int, default=1024)
    ap.add_argument("--limit-val", type=int, default=512)
    ap.add_argument("--max-concurrent", type=int, default=0)
    ap.add_argument("--searchers", nargs="+", default=list(SEARCHERS), choices=SEARCHERS)
    ap.add_argument("--work", default="", help="experiments' folder ('' = a temporary one)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(a.work or tmp).resolve()
        runs = [one_search(a, s, seed, work) for seed in a.seeds for s in a.searchers]
    summary = {}
    for s in a.searchers:
        finals = [r["curve"][-1] for r in runs if r["searcher"] == s]
        summary[s] = {"mean": statistics.fmean(finals),
                      "spread": statistics.pstdev(finals) if len(finals) > 1 else 0.0, "finals": finals}
        print(f"[search] {s:6s}: best validation macro-F1 after {a.trials} trials, {len(finals)} seeds: "
              f"{summary[s]['mean']:.4f} +- {summary[s]['spread']:.4f}", flush=True)
    if {"random", "tpe"} <= set(summary):
        print(f"[search] tpe - random: {summary['tpe']['mean'] - summary['random']['mean']:+.4f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": runs, "summary": summary,
                                            "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
