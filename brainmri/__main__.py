"""`python -m brainmri` is the `brainmri` command."""

import sys

from .cli import main

sys.exit(main())
