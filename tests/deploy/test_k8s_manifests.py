"""jobs/k8s/*.yaml: parse, required fields, image/Ray versions, entrypoints, no secrets; the
RayService's Serve config checked by Ray Serve's own schema and built from its import path."""

import pathlib
import re
import shlex
import tomllib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "jobs" / "k8s").glob("*.yaml"))
SPECLESS_KINDS = {"ServiceAccount", "ConfigMap", "Role", "RoleBinding", "Secret"}
SECRETISH = re.compile(r"(?i)aws_secret|secret_access|access_key_id|password|passwd|session_token|api_key")


def _ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.fullmatch(r"ray(\[.*\])?==(.+)", d).group(2) for d in deps if d.startswith("ray"))


def _docs(path):
    """Every document in the file, plus RayJob manifests embedded in ConfigMaps."""
    out = []
    for d in yaml.safe_load_all(path.read_text()):
        if d is None:
            continue
        out.append(d)
        if d.get("kind") == "ConfigMap":
            for key, val in (d.get("data") or {}).items():
                if key.endswith((".yaml", ".yml")):
                    out.extend(x for x in yaml.safe_load_all(val) if x is not None)
    return out


def _walk(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path + (k,), k, v
            yield from _walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (i,))


def _rayjob_specs(doc):
    if doc["kind"] == "RayJob":
        yield doc["spec"]
    elif doc["kind"] == "RayCronJob":
        yield doc["spec"]["jobTemplate"]


ALL = [(p, d) for p in MANIFESTS for d in _docs(p)]
IDS = [f"{p.name}:{d.get('kind')}/"
       f"{d.get('metadata', {}).get('name') or d.get('metadata', {}).get('generateName')}"
       for p, d in ALL]


def _ray_clusters(doc):
    """(rayClusterSpec, of a RayJob or RayCronJob) or (rayClusterConfig, of a RayService)."""
    for spec in _rayjob_specs(doc):
        yield spec["rayClusterSpec"]
    if doc["kind"] == "RayService":
        yield doc["spec"]["rayClusterConfig"]


def test_expected_files():
    assert {p.name for p in MANIFESTS} >= {"rayjob-train.yaml", "raycronjob-retrain.yaml",
                                           "cronjob-fallback.yaml", "rayservice.yaml"}
    kinds = {d["kind"] for _, d in ALL}
    assert {"RayJob", "RayCronJob", "RayService", "CronJob", "ServiceAccount", "Role", "RoleBinding",
            "ConfigMap"} <= kinds


@pytest.mark.parametrize("path,doc", ALL, ids=IDS)
def test_required_fields(path, doc):
    assert doc.get("apiVersion") and doc.get("kind")
    meta = doc.get("metadata") or {}
    assert meta.get("name") or meta.get("generateName")
    if doc["kind"] not in SPECLESS_KINDS:
        assert isinstance(doc.get("spec"), dict) and doc["spec"]
    if doc["kind"] in ("RayJob", "RayCronJob", "RayService"):
        assert doc["apiVersion"] == "ray.io/v1"


@pytest.mark.parametrize("path,doc", ALL, ids=IDS)
def test_ray_images_and_version_match_pin(path, doc):
    pin = _ray_pin()
    for spec in _rayjob_specs(doc):
        assert spec["shutdownAfterJobFinishes"] is True
        assert isinstance(spec["ttlSecondsAfterFinished"], int)
        workers = spec["rayClusterSpec"]["workerGroupSpecs"]
        assert any(c["resources"]["limits"].get("nvidia.com/gpu") for g in workers
                   for c in g["template"]["spec"]["containers"])  # training runs on GPUs
    for rcs in _ray_clusters(doc):
        assert rcs["rayVersion"] == pin
        groups = [rcs["headGroupSpec"], *rcs["workerGroupSpecs"]]
        for g in groups:
            pod = g["template"]["spec"]
            assert pod.get("serviceAccountName"), "pods need a ServiceAccount (IRSA) for S3"
            for c in pod["containers"]:
                tag = c["image"].rsplit(":", 1)[1]
                assert tag.endswith(f"-{pin}") or tag.startswith(f"{pin}-"), c["image"]


@pytest.mark.parametrize("path,doc", ALL, ids=IDS)
def test_entrypoints_reference_existing_scripts(path, doc):
    for spec in _rayjob_specs(doc):
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "python"
        script = argv[1]
        assert script.startswith("jobs/") and script.endswith(".py")
        assert (ROOT / script).is_file(), f"{path.name}: entrypoint names missing {script}"


def test_train_entrypoint_arguments():
    (doc,) = [d for d in _docs(ROOT / "jobs/k8s/rayjob-train.yaml") if d["kind"] == "RayJob"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    assert argv[argv.index("--data") + 1].startswith("s3://")
    assert argv[argv.index("--out") + 1].startswith("s3://")
    assert "--gpu" in argv and argv[argv.index("--num-workers") + 1] == "2"


def test_train_run_has_a_stable_name():
    """KubeRay retries a failed RayJob (backoffLimit) on a fresh cluster with the same
    entrypoint: only a fixed --name makes the retry resume the run's checkpoints in S3
    instead of starting a new, timestamp-named run."""
    from brainmri.core.storage import check_name

    (doc,) = [d for d in _docs(ROOT / "jobs/k8s/rayjob-train.yaml") if d["kind"] == "RayJob"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert "--name" in argv, "rayjob-train.yaml: give the run a stable --name so a retry resumes it"
    name = argv[argv.index("--name") + 1]
    check_name(name, "run name")  # a valid path segment, and a literal (no $VAR / $(date))
    assert not re.search(r"[$`{}]", name)
    assert doc["spec"].get("backoffLimit", 0) >= 1  # retries happen, hence the name


def test_kubectl_image_is_pinned_and_has_a_shell():
    """The fallback CronJob's submitter: an image that exists upstream, pinned to an exact
    release (or digest), with the /bin/sh its script needs."""
    (cron,) = [d for d in _docs(ROOT / "jobs/k8s/cronjob-fallback.yaml") if d["kind"] == "CronJob"]
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    image = c["image"]
    assert not image.startswith(("bitnami/", "docker.io/bitnami/")), "bitnami/kubectl tags are gone"
    # registry.k8s.io/kubectl is distroless (no shell): only for a command without /bin/sh
    if c.get("command", [""])[0] in ("/bin/sh", "sh", "/bin/bash", "bash"):
        assert not image.startswith("registry.k8s.io/kubectl"), image
    m = re.fullmatch(r"(?:docker\.io/)?(alpine/k8s|registry\.k8s\.io/kubectl):v?(\d+)\.(\d+)\.(\d+)"
                     r"(@sha256:[0-9a-f]{64})?", image)
    assert m, f"pin the kubectl image to an exact version (or digest), not {image!r}"


def test_cronjob_fallback():
    docs = _docs(ROOT / "jobs/k8s/cronjob-fallback.yaml")
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in pod["containers"])
    assert re.search(r"kubectl (create|apply) -f /manifests/", script)
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] and "ray.io" in r["apiGroups"]
               for r in role["rules"])
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"] == binding["roleRef"]["name"]
    accounts = {d["metadata"].get("name") for d in docs if d["kind"] == "ServiceAccount"}
    assert accounts == {pod["serviceAccountName"]}
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert mounted <= {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}


def test_raycronjob_schedule():
    (doc,) = _docs(ROOT / "jobs/k8s/raycronjob-retrain.yaml")
    fields = doc["spec"]["schedule"].split()
    assert len(fields) == 5 and fields[4] not in ("*",), "weekly: a day-of-week is set"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_no_secrets(path):
    assert not SECRETISH.search(path.read_text())
    for doc in _docs(path):
        assert doc["kind"] != "Secret"
        for _, key, val in _walk(doc):
            assert not SECRETISH.search(str(key))
            if key in ("env", "envFrom"):
                assert "secretKeyRef" not in str(val) and "secretRef" not in str(val)


def test_every_entrypoint_parses_with_the_brainmri_cli():
    """The arguments a manifest passes are ones `brainmri <command>` accepts (argparse exits
    on an unknown flag), so a schedule cannot fail on a typo at 03:00."""
    from brainmri.cli import build_parser

    seen = set()
    for path in MANIFESTS:
        for doc in _docs(path):
            docs = [doc]
            if doc.get("kind") == "ConfigMap":
                docs = [d for v in doc.get("data", {}).values() for d in yaml.safe_load_all(v) if d]
            for d in docs:
                spec = d.get("spec", {})
                entry = spec.get("entrypoint") or spec.get("jobTemplate", {}).get("entrypoint")
                if not entry:
                    continue
                argv = shlex.split(entry)
                command = argv[1].removeprefix("jobs/").removesuffix(".py")
                build_parser().parse_args([command, *argv[2:]])
                seen.add(command)
    assert {"train", "retrain"} <= seen


def _serve_config():
    (doc,) = [d for d in _docs(ROOT / "jobs/k8s/rayservice.yaml") if d["kind"] == "RayService"]
    return doc, yaml.safe_load(doc["spec"]["serveConfigV2"])


def test_rayservice_serve_config_is_valid_and_builds():
    """serveConfigV2 passes Ray Serve's own schema (what the cluster's Serve will parse), its
    import path is the application builder, its args are valid replica settings reading the
    champion from S3, and the deployment it sizes is the one the builder makes."""
    from ray.serve.schema import ServeDeploySchema

    from brainmri.serving import app, served

    doc, conf = _serve_config()
    schema = ServeDeploySchema.model_validate(conf)
    (application,) = schema.applications
    module, _, attr = application.import_path.partition(":")
    assert (module, attr) == ("brainmri.serving.app", "build") and application.route_prefix == "/"
    cfg = served.replica_config(application.args)
    assert cfg.store.startswith("s3://") and not cfg.model and cfg.poll_s > 0
    assert app.build(application.args).__class__.__name__ == "Application"
    (dep,) = application.deployments
    assert dep.name == app.DEPLOYMENT and dep.num_replicas >= 2  # a promotion never leaves none
    rcs = doc["spec"]["rayClusterConfig"]
    for g in [rcs["headGroupSpec"], *rcs["workerGroupSpecs"]]:  # every node runs a proxy
        (c,) = g["template"]["spec"]["containers"]
        assert {"containerPort": schema.http_options.port, "name": "serve"} in c["ports"]
    assert rcs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas go to workers
    replica_cpus = dep.ray_actor_options.num_cpus
    assert all(float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) >= replica_cpus
               for g in rcs["workerGroupSpecs"]), "a worker pod must fit at least one replica"
