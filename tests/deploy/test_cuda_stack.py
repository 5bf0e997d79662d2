"""One CUDA stack from the wheel to the host: the pinned torch build, the images, the AMI and
the documented driver agree (files parsed only: no Docker engine, no AWS, no GPU needed).

The source of the CUDA facts is docker/Dockerfile.gpu (ARG TORCH_CUDA / CUDA_MAJOR /
NVIDIA_DRIVER_MIN). Everything else is checked against it, so changing any one of them alone
(the torch pin, the wheel index, the declared CUDA major, the driver floor in the docs or in
cluster.yaml, the AMI) fails here."""

import pathlib
import platform
import re
import sys
import tomllib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
GPU_DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"
CPU_DOCKERFILE = ROOT / "docker" / "Dockerfile.cpu"
MANIFESTS = sorted((ROOT / "jobs" / "k8s").glob("*.yaml"))
CUDA_DOC = ROOT / "docs" / "operations.md"  # the page that documents the CUDA stack

# The oldest NVIDIA Linux driver branch that runs any CUDA <major>.x build (NVIDIA's CUDA
# compatibility table, "minor version compatibility": 11.x >= 450.80.02, 12.x >= 525.60.13,
# 13.x >= 580.65.06). A CUDA major missing here must be looked up, not guessed.
DRIVER_FLOOR = {11: 450, 12: 525, 13: 580}

# "NVIDIA driver >= 580", "NVIDIA driver 595.91.07 (>= 580)", "its driver must be >= 580", ...
FLOOR_MENTION = re.compile(r"(?i)driver[^\n]*?>=\s*\**\s*(\d+)")
AMI_LINE = re.compile(r"(ami-[0-9a-f]{8,17})\s*=\s*\"(Deep Learning Base OSS Nvidia Driver GPU AMI "
                      r"\(Ubuntu \d\d\.\d\d\) \d{8})\"[^\n]*\n#\s+in ([a-z0-9-]+), x86_64[^\n]*"
                      r"NVIDIA driver (\d+)\.\d+(?:\.\d+)?")


def _pin(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.split(r"[\[=<>!~ ]", d, maxsplit=1)[0] == name]
    m = re.fullmatch(rf"{re.escape(name)}==([0-9][0-9.]*)", spec)
    assert m, f"{name} must be pinned exactly in pyproject.toml, got {spec!r}"
    return m.group(1)


def _args(path: pathlib.Path) -> dict[str, str]:
    """ARG NAME=default lines of a Dockerfile (comments ignored)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)\s*", line)
        if m:
            out[m.group(1)] = m.group(2).strip("\"'")
    return out


def _run_text(path: pathlib.Path) -> str:
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).replace("\\\n", " ")


@pytest.fixture(scope="module")
def facts():
    a = _args(GPU_DOCKERFILE)
    for k in ("TORCH_CUDA", "CUDA_MAJOR", "NVIDIA_DRIVER_MIN"):
        assert k in a, f"docker/Dockerfile.gpu must declare ARG {k}=..."
    m = re.fullmatch(r"cu(\d+?)(\d)", a["TORCH_CUDA"])
    assert m, f"TORCH_CUDA={a['TORCH_CUDA']!r} is not a CUDA build tag like cu130"
    return {"torch_cuda": a["TORCH_CUDA"], "build_major": int(m.group(1)),
            "cuda_major": int(a["CUDA_MAJOR"]), "driver_min": int(a["NVIDIA_DRIVER_MIN"])}


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_dockerfile_facts_agree(facts):
    # cu130 -> CUDA 13, and CUDA 13 -> driver >= 580
    assert facts["build_major"] == facts["cuda_major"], facts
    assert facts["cuda_major"] in DRIVER_FLOOR, (
        f"look up NVIDIA's driver floor for CUDA {facts['cuda_major']}")
    assert facts["driver_min"] == DRIVER_FLOOR[facts["cuda_major"]], (
        f"CUDA {facts['cuda_major']} needs NVIDIA driver >= {DRIVER_FLOOR[facts['cuda_major']]}, "
        f"Dockerfile.gpu says {facts['driver_min']}")


def test_installed_torch_is_the_declared_build(facts):
    """The torch in .venv came from the registry at the pyproject pin: its build (the local
    version label, e.g. +cu130) and CUDA major are what the GPU image installs."""
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("the registry's CUDA build of torch is the x86_64 Linux wheel")
    import torch

    base, _, local = torch.__version__.partition("+")
    assert base == _pin("torch"), (torch.__version__, _pin("torch"))
    assert torch.version.cuda, f"installed torch {torch.__version__} is not a CUDA build"
    assert int(torch.version.cuda.split(".")[0]) == facts["cuda_major"], (
        f"installed torch {torch.__version__} is CUDA {torch.version.cuda}, "
        f"docker/Dockerfile.gpu declares CUDA_MAJOR={facts['cuda_major']}")
    assert local == facts["torch_cuda"], (
        f"installed torch is +{local}, docker/Dockerfile.gpu installs +{facts['torch_cuda']}")
    import torchvision

    assert torchvision.__version__.partition("+")[0] == _pin("torchvision")


def test_gpu_image_gets_cuda_only_from_the_torch_wheel(facts):
    text = GPU_DOCKERFILE.read_text()
    (base,) = re.findall(r"(?m)^FROM\s+(\S+)", text)
    # no CUDA in the base: Ray's CPU variant, not -gpu/-cuXXX, not an nvidia/cuda image
    assert re.fullmatch(r"rayproject/ray:[0-9.]+-py\d+-cpu", base), base
    run = _run_text(GPU_DOCKERFILE)
    # torch/torchvision from PyTorch's index for exactly the declared build, at pyproject's pins
    assert re.search(r"--index-url\s+\"?https://download\.pytorch\.org/whl/\$\{TORCH_CUDA\}\"?", run), run
    assert "pyproject.toml" in run and "'torch', 'torchvision'" in run
    # and the build itself refuses a torch of another CUDA major or build
    assert "torch.version.cuda.split('.')[0] == '${CUDA_MAJOR}'" in run
    assert "endswith('+${TORCH_CUDA}')" in run
    # Ray starts GPU containers with --runtime=nvidia: only these make the runtime mount the
    # GPUs and the driver's libcuda/libnvidia-ml into a non-CUDA-based image
    env = dict(re.findall(r"(NVIDIA_[A-Z_]+)=(\S+)", run))
    assert env.get("NVIDIA_VISIBLE_DEVICES") == "all", env
    assert {"compute", "utility"} <= set(env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(",")), env


def test_head_image_has_no_cuda():
    a = _args(CPU_DOCKERFILE)
    assert a.get("TORCH_CUDA") == "cpu", a
    run = _run_text(CPU_DOCKERFILE)
    assert re.search(r"--index-url\s+\"?https://download\.pytorch\.org/whl/\$\{TORCH_CUDA\}\"?", run), run
    assert "torch.version.cuda is None" in run
    (base,) = re.findall(r"(?m)^FROM\s+(\S+)", CPU_DOCKERFILE.read_text())
    (gpu_base,) = re.findall(r"(?m)^FROM\s+(\S+)", GPU_DOCKERFILE.read_text())
    assert base == gpu_base, "both images on the same Ray base (the GPU one adds only CUDA torch)"


def test_documented_driver_floor_matches(facts):
    """The CUDA page, cluster.yaml and every manifest with GPU workers name the same driver floor
    (and any other page that names one names that one)."""
    floor = facts["driver_min"]
    docs = {"docs/operations.md": CUDA_DOC, "cluster.yaml": ROOT / "cluster.yaml"}
    docs.update({f"jobs/k8s/{p.name}": p for p in MANIFESTS if "nvidia.com/gpu" in p.read_text()})
    for name, path in docs.items():
        found = [int(x) for x in FLOOR_MENTION.findall(path.read_text())]
        assert found, f"{name} must state the NVIDIA driver requirement (NVIDIA driver >= {floor})"
        assert set(found) == {floor}, (
            f"{name} states NVIDIA driver >= {sorted(set(found))}, the stack needs >= {floor}")
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        found = {int(x) for x in FLOOR_MENTION.findall(path.read_text())}
        assert found <= {floor}, f"{path.relative_to(ROOT)} states NVIDIA driver >= {sorted(found)}"
    doc = CUDA_DOC.read_text()
    assert f"CUDA {facts['cuda_major']}" in doc and f"+{facts['torch_cuda']}" in doc


def test_ami_is_pinned_with_a_driver_that_runs_the_wheel(facts, cluster):
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    ids = {k: t["node_config"].get("ImageId") for k, t in cluster["available_node_types"].items()}
    assert len(set(ids.values())) == 1, f"one host image for every node type: {ids}"
    (ami,) = set(ids.values())
    assert ami and re.fullmatch(r"ami-[0-9a-f]{8,17}", ami), f"pin an AMI id, not {ami!r}"
    # Ray's own default (ImageId unset / latest_dlami) is a CUDA 11-era Deep Learning AMI
    assert ami not in DEFAULT_AMI.values()
    text = (ROOT / "cluster.yaml").read_text()
    m = AMI_LINE.search(text)
    assert m, "cluster.yaml must say which AMI the id is: '<id> = \"<name>\"' + region + its NVIDIA driver"
    doc_id, name, region, driver_major = m.group(1), m.group(2), m.group(3), int(m.group(4))
    assert doc_id == ami, (doc_id, ami)
    assert region == cluster["provider"]["region"], "AMI ids are per region"
    assert driver_major >= facts["driver_min"], (
        f"{name}: NVIDIA driver {driver_major} < {facts['driver_min']} needed by CUDA {facts['cuda_major']}")
    assert "aws ec2 describe-images" in text, "say how to look the id up for another region"
    doc = CUDA_DOC.read_text()
    assert ami in doc and name in doc, "docs/operations.md names the same AMI as cluster.yaml"


def test_manifests_run_the_cluster_images(cluster):
    """KubeRay pods run the same two images as the VM cluster (one stack, not two)."""
    gpu, head = cluster["docker"]["image"], cluster["docker"]["head_image"]
    seen = 0
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            docs = [doc] if doc else []
            if doc and doc.get("kind") == "ConfigMap":
                docs = [d for v in doc["data"].values() for d in yaml.safe_load_all(v) if d]
            for d in docs:
                spec = d.get("spec", {})
                spec = spec.get("jobTemplate", spec) if d.get("kind") == "RayCronJob" else spec
                # a RayJob's / RayCronJob's rayClusterSpec, a RayService's rayClusterConfig
                if not isinstance(spec, dict):
                    continue
                rcs = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
                if not rcs:
                    continue
                for c in rcs["headGroupSpec"]["template"]["spec"]["containers"]:
                    assert c["image"] == head, (path.name, c["image"])
                for g in rcs["workerGroupSpecs"]:
                    for c in g["template"]["spec"]["containers"]:
                        gpu_worker = c["resources"]["limits"].get("nvidia.com/gpu")
                        assert c["image"] == (gpu if gpu_worker else head), (path.name, c["image"])
                seen += 1
    assert seen >= 4
