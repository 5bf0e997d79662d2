"""The package's dependency direction (pyproject.toml's import-linter contracts) holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from support.data import REPO


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a dev dependency"
    r = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_config_imports_without_torch():
    """Validating a config must not pull in torch (the CLI's errors come before any import)."""
    code = ("import sys, brainmri.config, brainmri.cli; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
