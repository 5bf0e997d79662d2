"""docker/Dockerfile.* and .dockerignore, parsed only (no Docker engine here)."""

import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def _ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.fullmatch(r"ray(\[.*\])?==(.+)", d).group(2) for d in deps if d.startswith("ray"))


def _instructions(path):
    """(INSTRUCTION, args) pairs, comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        buf += s[:-1] + " " if s.endswith("\\") else s
        if not s.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.gpu", "Dockerfile.cpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_from_tag_matches_pinned_ray(path):
    froms = [a for i, a in _instructions(path) if i == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)(?:-(\S+))?", froms[0].split()[0])
    assert m, froms[0]
    assert m.group(1) == _ray_pin()
    assert m.group(2) == "311"  # requires-python 3.11, as the venv
    # Both images on Ray's CPU variant: the GPU image's only CUDA is the torch wheel's
    # (a -gpu/-cuXXX base would put a second CUDA stack under it; tests/test_cuda_stack.py)
    assert m.group(3) == "cpu", f"{path.name}: use the explicit -cpu Ray base, not {m.group(3)!r}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_and_installs_package(path):
    ins = _instructions(path)
    users = [a for i, a in ins if i == "USER"]
    assert users, "no USER line"
    assert users[-1].split(":")[0] not in ("root", "0")
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert "pip install --no-cache-dir ." in runs
    copies = " ".join(a for i, a in ins if i == "COPY")
    for needed in ("pyproject.toml", "README.md", "brainmri/"):
        assert needed in copies


def test_dockerignore():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    for p in (".git", ".venv", "lake", "runs", ".pytest_cache", "*.parquet"):
        assert p in lines
    for p in ("pyproject.toml", "README.md", "brainmri", "!brainmri"):
        assert p not in lines
