"""cluster.yaml and jobs/runtime_env.yaml against the installed Ray's own rules (no Ray started)."""

import json
import pathlib
import re
import tomllib

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.runtime_env import RuntimeEnv

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA = pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def _ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.fullmatch(r"ray(\[.*\])?==(.+)", d).group(2) for d in deps if d.startswith("ray"))


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_installed_ray_matches_pin():
    assert ray.__version__ == _ray_pin()


def test_cluster_yaml_matches_ray_schema(cluster):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(cluster, schema)  # raises with the offending path


def test_cluster_yaml_passes_rays_validator(cluster):
    # What `ray up` runs before touching AWS: defaults merged, then the schema again,
    # plus Ray's docker / node-type checks (no network, no cluster).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(cluster)
    prepared = prepare_config(cluster)
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cluster_shape(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m6i.")
    assert head.get("resources", {}).get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != cluster["head_node_type"]}
    spot = [v for v in workers.values()
            if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    ondemand = [v for v in workers.values() if "InstanceMarketOptions" not in v["node_config"]]
    assert spot and ondemand
    for s in spot:
        assert s["resources"]["GPU"] >= 1
        fallback = [o for o in ondemand
                    if o["node_config"]["InstanceType"] == s["node_config"]["InstanceType"]]
        assert fallback, "on-demand fallback must be the same instance type as the spot type"
        for o in fallback:
            assert o["priority"] < s["priority"] and o["max_workers"] <= s["max_workers"]
            assert o["resources"] == s["resources"]
    for t in types.values():
        profile = t["node_config"]["IamInstanceProfile"]
        assert "Arn" in profile or "Name" in profile


def test_cluster_images_and_commands(cluster):
    pin = _ray_pin()
    d = cluster["docker"]
    for key in ("image", "head_image"):
        assert d[key].endswith(f"-{pin}"), f"docker.{key} must be tagged with Ray {pin}"
    assert "gpu" in d["image"] and "cpu" in d["head_image"]
    assert cluster["setup_commands"] == []
    assert not cluster.get("head_setup_commands") and not cluster.get("worker_setup_commands")
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cluster["worker_start_ray_commands"])


def test_no_credentials_in_cluster_yaml():
    text = (ROOT / "cluster.yaml").read_text()
    for pat in (r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret", r"(?i)aws_access_key_id\s*[:=]",
                r"(?i)secret_access_key", r"(?i)password\s*[:=]", r"(?i)session_token"):
        # (`aws ecr get-login-password | docker login --password-stdin` is a role-based login)
        assert not re.search(pat, text), pat


def test_runtime_env_yaml():
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own constructor/validation of each field
    excl = env["excludes"]
    for p in (".git", ".venv", "lake/", "runs/", "data", "__pycache__", "*.parquet", ".pytest_cache"):
        assert p in excl
    assert env["env_vars"] == {k: str(v) for k, v in env["env_vars"].items()}  # strings only
    assert not any(re.search(r"(?i)secret|password|token|access_key", k) for k in env["env_vars"])
    assert "pip" not in env and "conda" not in env and "uv" not in env
