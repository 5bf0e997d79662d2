"""The package's dependency direction (pyproject.toml's import-linter contracts) holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from support.data import REPO


def lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a dev dependency"
    return exe


def test_import_contracts_are_kept():
    r = subprocess.run([lint_imports()], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


# Each pair that once imported both ways, with the import that would close the cycle again
# (inside a function: it still counts), and the start of the name of the contract that forbids it.
BACK_EDGES = [
    ("data/dicom.py", "from . import images", "data: images calls dicom"),
    ("data/ingest_ray.py", "from .ingest import publish", "data: ingest runs its ray engine"),
    ("models/export.py", "from .checkpoints import build_model", "models: checkpoints publishes"),
]


@pytest.mark.parametrize("module,back,contract", BACK_EDGES, ids=[m for m, _, _ in BACK_EDGES])
def test_a_cycle_put_back_breaks_the_contracts(tmp_path, module, back, contract):
    """On a copy of the package with one function-level import closing a cycle again, both
    the pair's own contract and the one against any cycle fail."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [pair] = [c["name"] for c in contracts if c["name"].startswith(contract)]
    [acyclic] = [c["name"] for c in contracts
                 if c["type"] == "acyclic_siblings" and c["ancestors"] == ["brainmri"]]
    shutil.copytree(REPO / "brainmri", tmp_path / "brainmri", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    f = tmp_path / "brainmri" / module
    f.write_text(f.read_text() + f"\n\ndef _closes_a_cycle():\n    {back}  # noqa: F401\n")
    r = subprocess.run([lint_imports(), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode != 0, r.stdout[-3000:]
    report = " ".join(r.stdout.split())  # the report wraps long contract names
    assert f"{pair} BROKEN" in report and f"{acyclic} BROKEN" in report, r.stdout[-3000:]


def test_config_imports_without_torch():
    """Validating a config must not pull in torch (the CLI's errors come before any import)."""
    code = ("import sys, brainmri.config, brainmri.cli; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
