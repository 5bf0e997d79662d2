"""Entrypoint for `ray job submit --working-dir . -- python jobs/serve.py --store URI --detach`.

Thin on purpose: the same arguments as `brainmri serve` (see `brainmri serve --help`). With
--detach the job deploys the Serve application and ends; the application keeps running on
the cluster (`serve shutdown` stops it). On Kubernetes use jobs/k8s/rayservice.yaml instead."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from brainmri.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
