"""The compose file and the KubeRay manifest parse and agree with the images, ports and variables that
docs/cluster.md names. No Docker engine runs here, so nothing is built or started."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCS = (ROOT / "docs" / "cluster.md").read_text()
SECRETS = (
    "RAY_AUTH_TOKEN",
    "POSTGRES_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_the_services_the_docs_describe():
    services = compose()["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "ray-worker-gpu"} <= set(services)
    for name in services:
        assert f"`{name}`" in DOCS, f"docs/cluster.md does not mention service {name}"
    assert services["ray-worker-gpu"]["profiles"] == ["gpu"]
    shared = {"tune-storage:/shared"}
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        assert shared <= set(services[name]["volumes"]), name
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_published_ports_bind_loopback_only():
    published = {
        name: ports for name, svc in compose()["services"].items() if (ports := svc.get("ports"))
    }
    assert published == {"mlflow": ["127.0.0.1:5000:5000"], "ray-head": ["127.0.0.1:8265:8265"]}
    for port in ("5000", "8265"):
        assert f"127.0.0.1:{port}" in DOCS


def test_images_are_built_from_the_dockerfiles_with_the_tested_install():
    services = compose()["services"]
    builds = {
        svc["image"]: svc["build"]["dockerfile"] for svc in services.values() if "build" in svc
    }
    assert builds == {
        "flatbasin-cpu:latest": "docker/Dockerfile.cpu",
        "flatbasin-gpu:latest": "docker/Dockerfile.gpu",
    }
    for dockerfile in builds.values():
        text = (ROOT / dockerfile).read_text()
        assert re.search(
            r'RUN pip install \. "torch==\$\{TORCH_VERSION\}" "torchvision==\$\{TORCHVISION_VERSION\}"',
            text,
        )
        assert "USER flatbasin" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert (
        '"ray[tune,default]' in pyproject and '"torch' in pyproject and '"torchvision' in pyproject
    )


def test_secrets_come_from_the_environment_and_are_documented():
    text = (DOCKER / "compose.yaml").read_text()
    example = (DOCKER / "env.example").read_text()
    for name in SECRETS:
        assert f"${{{name}:?" in text, f"{name} must be required from the environment"
        assert f"{name}=" in example and name in DOCS
    entrypoint = (DOCKER / "mlflow-entrypoint.sh").read_text()
    assert "--app-name basic-auth" in entrypoint and "umask 077" in entrypoint


def test_kuberay_rayjob_references_the_same_images_and_secrets():
    job = yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("flatbasin search ")
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert (head["image"], worker["image"]) == ("flatbasin-cpu:latest", "flatbasin-gpu:latest")
    for container in (head, worker):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "flatbasin-secrets"
        assert {"mountPath": "/shared", "name": "storage"} in container["volumeMounts"]
    assert "flatbasin-secrets" in DOCS and "flatbasin-storage" in DOCS
