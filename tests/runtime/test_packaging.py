"""Static checks of runtime/Dockerfile and docker-compose.yml (no Docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from runtime.settings import Settings
from tests.helpers import REPO

COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _dockerfile(service: dict) -> Path:
    build = service["build"]
    context = REPO / build.get("context", ".")
    return context / build.get("dockerfile", "Dockerfile")


def test_compose_parses_and_has_the_three_services(compose):
    assert {"runtime", "redis", "evaluator"} <= set(compose["services"])
    assert compose["services"]["evaluator"]["profiles"] == ["evaluator"]
    assert compose["services"]["redis"]["image"].startswith("redis")


@pytest.mark.parametrize("name", ["runtime", "evaluator"])
def test_build_contexts_and_dockerfiles_exist(compose, name):
    service = compose["services"][name]
    context = REPO / service["build"].get("context", ".")
    assert context.is_dir(), f"{name}: build context {context} is missing"
    dockerfile = _dockerfile(service)
    assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"


def test_runtime_service_matches_the_settings(compose):
    service = compose["services"]["runtime"]
    command = service["command"]
    assert command[:3] == ["python", "-m", "runtime"] and (REPO / "runtime" / "__main__.py").is_file()
    fields = set(Settings.model_fields)
    env = service["environment"]
    unknown = [name for name in env if name.lower() not in fields and not name.startswith("AWS_")]  # AWS_*: boto3's own
    assert not unknown, f"compose sets variables the runtime does not read: {unknown}"
    container_port = int(str(env["PORT"]))
    published = [str(p) for p in service["ports"]]
    assert any(p.endswith(f":{container_port}") for p in published), published
    assert Settings.model_fields["port"].default == 8000 == container_port
    assert "host.docker.internal:host-gateway" in service["extra_hosts"]
    assert "host.docker.internal" in env["GPU_SERVICE_URL"]
    assert "redis://redis:" in env["REDIS_URL"]


def test_runtime_dockerfile_is_slim_torch_free_and_copies_what_exists(compose):
    dockerfile = _dockerfile(compose["services"]["runtime"])
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert '".[runtime]"' in text
    installs = [line for line in text.replace("\\\n", " ").splitlines() if "pip install" in line]
    assert installs and not any(re.search(r"pip install[^&]*torch", line) for line in installs), installs
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which does not exist"
    joined = text.replace("\\\n", " ")  # fold continuation lines
    env_names = [n for line in re.findall(r"^ENV (.+)$", joined, re.M) for n in re.findall(r"(\w+)=", line)]
    settings_env = [n for n in env_names if not n.startswith(("PYTHON", "PIP_"))]
    assert settings_env and all(n.lower() in Settings.model_fields for n in settings_env), settings_env
    cmd = re.search(r'^CMD \["python", "-m", "runtime"\]', text, re.M)
    assert cmd, "the image must start the runtime"


def test_runtime_extra_carries_the_broker_dependencies():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", dep)[0].lower() for dep in extras["runtime"]}
    assert {"dramatiq", "redis"} <= names
    assert not any("torch" in dep for dep in extras["runtime"])
