"""The compose file and the KubeRay manifest parse and agree with the images, ports and variables that
docs/cluster.md names. No Docker engine runs here, so nothing is built or started."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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


def install_list() -> dict[str, Requirement]:
    """docker/requirements.txt: the one list both images install, by package name."""
    lines = (DOCKER / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


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
        installs = re.findall(r"^RUN .*\bpip install\b.*$", text, flags=re.M)
        # The pinned list alone (a cached layer), then the project with the same pins; nothing else.
        assert installs == [
            "RUN pip install -r docker/requirements.txt",
            "RUN pip install -r docker/requirements.txt .",
        ], dockerfile
        assert "COPY docker/requirements.txt ./docker/requirements.txt" in text
        assert "==" not in text and "ARG " not in text, f"{dockerfile}: versions belong in the list"
        assert "USER flatbasin" in text and "--uid 1000 flatbasin" in text  # one owner for /shared
        assert re.search(r"mkdir /shared.*chown flatbasin:flatbasin /shared", text)
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert "chown flatbasin:flatbasin /shared /mlartifacts" in cpu  # the MLflow server writes there


def test_install_list_pins_what_the_stack_needs_within_pyproject():
    pins = install_list()
    assert set(pins) == {"torch", "torchvision", "ray", "mlflow", "psycopg2-binary"}
    for name, req in pins.items():
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name} must be pinned exactly"
    assert pins["mlflow"].extras == {"auth"}  # Flask-WTF: `mlflow server --app-name basic-auth`
    assert pins["ray"].extras == {"tune", "default"}
    assert "docker/requirements.txt" in DOCS and "mlflow[auth]" in DOCS
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, project):
        pin = pins.get(canonicalize_name(dep.name))
        if pin is not None:  # the images install versions the project accepts
            (spec,) = pin.specifier
            assert dep.specifier.contains(spec.version), f"{pin} is outside pyproject's {dep}"
            assert dep.extras <= pin.extras, f"{pin} lacks the extras of {dep}"


def test_mlflow_entrypoint_defaults_match_the_compose_stack():
    entrypoint = (DOCKER / "mlflow-entrypoint.sh").read_text()
    mlflow = compose()["services"]["mlflow"]
    defaults = dict(re.findall(r'^(\w+)="\$\{\1:-([^}]*)\}"', entrypoint, flags=re.M))
    assert defaults["POSTGRES_HOST"] in compose()["services"]  # the postgres service by name
    assert defaults["POSTGRES_PORT"] == "5432"
    assert defaults["MLFLOW_HOST"] == "0.0.0.0"
    assert mlflow["ports"] == [f"127.0.0.1:{defaults['MLFLOW_PORT']}:{defaults['MLFLOW_PORT']}"]
    assert f"mlartifacts:{defaults['MLFLOW_ARTIFACTS_DESTINATION']}" in mlflow["volumes"]
    assert "postgresql+psycopg2://" in entrypoint  # the driver the install list has
    for name in ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert f"${{{name}:?" in entrypoint, f"the entrypoint must refuse to start without {name}"
        assert name in mlflow["environment"]


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
