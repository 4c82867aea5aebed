"""Static checks of runtime/Dockerfile and docker-compose.yml (no Docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

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


# -- the `scale` profile: API + two workers on PostgreSQL and Redis ----------------------------------
def _scale(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if "scale" in svc.get("profiles", [])}


def test_scale_profile_has_the_api_two_workers_and_postgres(compose):
    scale = _scale(compose)
    assert set(scale) == {"runtime-api", "runtime-worker", "postgres"}
    api, worker = scale["runtime-api"], scale["runtime-worker"]
    assert api["command"] == ["python", "-m", "runtime"] and str(api["environment"]["RUN_WORKER"]) == "false"
    assert worker["command"] == ["python", "-m", "runtime", "worker"] and (REPO / "runtime" / "__main__.py").is_file()
    assert worker["deploy"]["replicas"] == 2
    assert "ports" not in worker, "replicas cannot share a published port"
    assert api["build"] == worker["build"] == compose["services"]["runtime"]["build"]
    assert scale["postgres"]["image"].startswith("postgres:") and "healthcheck" in scale["postgres"]
    assert "profiles" not in compose["services"]["redis"], "Redis is shared with the default runtime"
    for svc in (api, worker):
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "redis" in svc["depends_on"]
        assert "host.docker.internal:host-gateway" in svc["extra_hosts"]


def test_scale_services_share_the_record_queue_and_outputs(compose):
    scale = _scale(compose)
    default_env = compose["services"]["runtime"]["environment"]
    pg = scale["postgres"]["environment"]
    fields = set(Settings.model_fields)
    for name in ("runtime-api", "runtime-worker"):
        svc = scale[name]
        env = svc["environment"]
        unknown = [n for n in env if n.lower() not in fields]
        assert not unknown, f"{name} sets variables the runtime does not read: {unknown}"
        db = urlsplit(env["DATABASE_URL"])
        assert db.scheme.startswith("postgresql") and (db.hostname, db.port) == ("postgres", 5432)
        assert (db.username, db.password, db.path.lstrip("/")) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
        redis_url = urlsplit(env["REDIS_URL"])
        default_redis = urlsplit(re.fullmatch(r"\$\{REDIS_URL:-(.+)\}", default_env["REDIS_URL"]).group(1))
        assert redis_url.hostname == default_redis.hostname == "redis"
        assert redis_url.path == "/1" != default_redis.path, "the scale queue is its own Redis database"
        assert "scale-data:/data" in svc["volumes"] and env["DATA_DIR"] == "/data"
    assert scale["runtime-api"]["environment"]["DATABASE_URL"] == scale["runtime-worker"]["environment"]["DATABASE_URL"]
    published = [str(p).rsplit(":", 1)[0] for p in scale["runtime-api"]["ports"]]
    default_published = [str(p).rsplit(":", 1)[0] for p in compose["services"]["runtime"]["ports"]]
    assert not set(published) & set(default_published), "the scale API must not take the default runtime's port"
    assert {"scale-data", "postgres-data"} <= set(compose["volumes"])


def _docker_compose() -> list[str] | None:
    import shutil
    import subprocess

    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return cmd
    return None


@pytest.mark.skipif(_docker_compose() is None, reason="no docker compose CLI here: the YAML is checked by the tests above")
def test_docker_compose_config_accepts_every_profile():
    import subprocess

    for profile in ("scale", "evaluator"):
        done = subprocess.run([*_docker_compose(), "-f", str(COMPOSE), "--profile", profile, "config", "-q"],
                              capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
