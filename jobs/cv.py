"""Entrypoint for `ray job submit --working-dir . -- python jobs/cv.py ARGS`.

Thin on purpose: the same arguments as `brainmri cv` (see `brainmri cv --help`).
Inside a submitted job, RAY_ADDRESS is set, so training connects to the cluster."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from brainmri.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["cv", *sys.argv[1:]]))
