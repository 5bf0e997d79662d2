"""Entrypoint for `ray job submit --working-dir . -- python jobs/ensemble.py MODEL MODEL ... ARGS`.

Thin on purpose: the same arguments as `brainmri ensemble` (see `brainmri ensemble --help`).
It runs on the job's driver: it reads the members from storage, scores the ensemble on their
validation rows and publishes it back there (no Ray work of its own)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from brainmri.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ensemble", *sys.argv[1:]]))
