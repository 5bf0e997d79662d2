"""Which images do all the models miss? Reads several complete evaluation reports of the same
data (`brainmri evaluate ... --split val|test`) and prints how many images k or more of the
N models got wrong, and what that means for an accuracy goal.

Images most models miss mark where this family of models stops: a new model reaching
accuracy A on n images may miss at most floor((1 - A) * n) of them, so it has to get right
at least (images a majority misses) - that many, images most models before it got wrong.

    python -m benchmarks.hard_images ./lake/reports/<model>-<version>/<data-id> ... [--goal 0.985]

Each model counts with the decision it ships (`predicted_label`: flips and any decision rule
applied), which is what its accuracy measures. Reading only: nothing chooses anything here.
"""

from __future__ import annotations

import argparse
import collections
import io
import sys

import numpy as np
import pyarrow.parquet as pq

from brainmri.core.storage import StorageError, open_location
from brainmri.evaluation.evaluate import COMPLETE, PREDICTIONS


def read_report(uri: str) -> dict:
    """One complete report -> {path: (true_label, predicted_label)}."""
    loc = open_location(uri)
    if not (loc / COMPLETE).exists():
        raise StorageError(f"{loc.uri} is not a complete evaluation report (no {COMPLETE})")
    t = pq.read_table(io.BytesIO((loc / PREDICTIONS).read_bytes()),
                      columns=["path", "true_label", "predicted_label"]).to_pydict()
    return {p: (y, q) for p, y, q in zip(t["path"], t["true_label"], t["predicted_label"], strict=True)}


def overlap(reports: list[dict], goal: float | None = None) -> dict:
    """Misses shared across models; every report must hold the same images and labels."""
    if len(reports) < 2:
        raise ValueError("give at least two reports to compare")
    truth = {p: y for p, (y, _) in reports[0].items()}
    for r in reports[1:]:
        if {p: y for p, (y, _) in r.items()} != truth:
            raise ValueError("the reports are not of the same images with the same labels")
    paths = sorted(truth)
    wrong = np.array([[r[p][1] != truth[p] for p in paths] for r in reports])
    count, n_models = wrong.sum(0), len(reports)
    majority = count > n_models / 2
    out = {"images": len(paths), "models": n_models,
           "errors_per_model": wrong.sum(1).tolist(),
           "missed_by_at_least": {k: int((count >= k).sum()) for k in range(1, n_models + 1)},
           "missed_by_majority": int(majority.sum()),
           "majority_missed_by_class": dict(sorted(collections.Counter(
               truth[p] for p, m in zip(paths, majority, strict=True) if m).items()))}
    if goal is not None:
        allowed = int(np.floor((1 - goal) * len(paths) + 1e-9))
        out.update(goal=goal, goal_allows_errors=allowed,
                   goal_needs_majority_missed_right=max(0, out["missed_by_majority"] - allowed))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="report folders (local or s3://) of the same data")
    ap.add_argument("--goal", type=float, default=None, help="an accuracy goal, e.g. 0.985")
    args = ap.parse_args(argv)
    try:
        if args.goal is not None and not 0 < args.goal <= 1:
            raise ValueError(f"--goal is an accuracy in (0, 1], got {args.goal}")
        o = overlap([read_report(u) for u in args.reports], args.goal)
    except (StorageError, ValueError, OSError) as e:
        print(f"hard_images: {e}", file=sys.stderr)
        return 2
    n = o["images"]
    print(f"{o['models']} models, {n} images; errors per model: {o['errors_per_model']}")
    print("missed by at least k models: " + ", ".join(
        f"{k}: {v}" for k, v in o["missed_by_at_least"].items()))
    print(f"missed by a majority: {o['missed_by_majority']} of {n}, by class {o['majority_missed_by_class']}")
    if "goal" in o:
        print(f"accuracy {o['goal']} allows {o['goal_allows_errors']} errors: a model must get right "
              f"at least {o['goal_needs_majority_missed_right']} of the {o['missed_by_majority']} "
              "images a majority of these models miss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
