"""The Kubernetes manifests (deploy/kubernetes), the KEDA ScaledObjects and the Grafana dashboard, checked offline.

Each overlay is rendered by a small kustomize written here (resources, components and JSON6902
patches: what the kustomizations use; anything else is refused), compared with `kubectl
kustomize` where kubectl is installed, and every object is validated strictly: Kubernetes kinds
with kubernetes-validate's schemas, ScaledObjects against KEDA's CRD schema
(deploy/kubernetes/crds/keda-scaledobject.schema.json). Then what ties the objects together:
probes, the GPU and its model volume, the settings each container is given, the queue names KEDA
reads, the metric names the queries and the dashboard use.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helpers import REPO

KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = ("latency", "batch", "external-datastores")
K8S_VERSIONS = ("1.30", "1.32")
DASHBOARD = REPO / "deploy" / "grafana" / "avatar-stack.json"

# The metric families the services export (name -> kind, labels): runtime/metrics.py,
# gpu_service/metrics.py and avatar_contracts/metrics.py (checked against their registries below).
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "avatar_runtime_http_requests_total": ("counter", frozenset({"method", "route", "status"})),
    "avatar_runtime_http_request_duration_seconds": ("histogram", frozenset({"method", "route"})),
    "avatar_runtime_stage_duration_seconds": ("histogram", frozenset({"stage"})),
    "avatar_runtime_jobs": ("gauge", frozenset({"state"})),
    "avatar_runtime_queue_depth": ("gauge", frozenset()),
    "avatar_runtime_job_retries_total": ("counter", frozenset({"reason"})),
    "avatar_runtime_gpu_calls_total": ("counter", frozenset({"endpoint", "outcome"})),
    "avatar_gpu_http_requests_total": ("counter", frozenset({"method", "route", "status"})),
    "avatar_gpu_http_request_duration_seconds": ("histogram", frozenset({"method", "route"})),
    "avatar_gpu_stage_duration_seconds": ("histogram", frozenset({"stage"})),
    "avatar_gpu_slots": ("gauge", frozenset({"device", "state"})),
    "avatar_gpu_queue_depth": ("gauge", frozenset()),
    "avatar_gpu_stream_sessions_active": ("gauge", frozenset()),
    "avatar_gpu_oom_retries_total": ("counter", frozenset({"device"})),
    "avatar_gpu_chunks_generated_total": ("counter", frozenset({"kind"})),
    "avatar_gpu_memory_used_bytes": ("gauge", frozenset({"device"})),
    "avatar_gpu_memory_total_bytes": ("gauge", frozenset({"device"})),
    "avatar_gpu_utilization_ratio": ("gauge", frozenset({"device"})),
}
TARGET_LABELS = frozenset({"instance", "job", "pod", "namespace"})
"""Labels Prometheus adds to every scraped series."""

LIBRARY_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
"""Read by boto3 from the environment, not by the runtime's settings."""

# KEDA trigger metadata keys, per scaler, from KEDA's scaler documentation (the CRD leaves `metadata` a
# free map of strings, so a misspelt key would only show as a scaler that never scales).
TRIGGER_KEYS = {
    "prometheus": ({"serverAddress", "query", "threshold"},
                   {"activationThreshold", "ignoreNullValues", "namespace", "customHeaders", "queryParameters",
                    "unsafeSsl", "timeout", "authModes"}),
    "redis": ({"listName"},
              {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv",
               "passwordFromEnv", "listLength", "activationListLength", "enableTLS", "unsafeSsl", "databaseIndex"}),
}


# -- a small kustomize ---------------------------------------------------------------------------------
class RenderError(ValueError):
    """A kustomization uses something this renderer does not implement, or a patch does not apply."""


def _load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    unknown = set(target) - set(want)
    if unknown:
        raise RenderError(f"patch target keys not supported here: {sorted(unknown)}")
    return all(want[key] == value for key, value in target.items())


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _json_patch(obj: dict, ops: list[dict]) -> None:
    """RFC 6902 add / replace / remove, in place."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind in ("replace", "remove") and not 0 <= index < len(node):
                raise RenderError(f"{op['path']}: no such element")
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index]
            else:
                raise RenderError(f"JSON patch op {kind!r} not supported here")
        else:
            if kind in ("replace", "remove") and last not in node:
                raise RenderError(f"{op['path']}: no such member")
            if kind in ("add", "replace"):
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            else:
                raise RenderError(f"JSON patch op {kind!r} not supported here")


def _apply_patches(objects: list[dict], patches: list[dict], where: Path) -> None:
    for patch in patches:
        if set(patch) - {"target", "patch"} or "target" not in patch or "patch" not in patch:
            raise RenderError(f"{where}: only inline JSON6902 patches with a target are supported here")
        ops = yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise RenderError(f"{where}: a patch must be a JSON6902 list of operations")
        hits = [obj for obj in objects if _matches(obj, patch["target"])]
        if not hits:
            raise RenderError(f"{where}: patch target {patch['target']} matches nothing")
        for obj in hits:
            _json_patch(obj, ops)


def render(directory: Path, kind: str = "Kustomization") -> list[dict]:
    """The objects a kustomization (or component) directory builds."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if spec.get("kind", "Kustomization") != kind:
        raise RenderError(f"{directory}: expected a {kind}, found {spec.get('kind')}")
    unsupported = set(spec) - {"apiVersion", "kind", "resources", "components", "patches"}
    if unsupported:
        raise RenderError(f"{directory}: kustomization fields not supported here: {sorted(unsupported)}")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else _load_docs(path)
    for entry in spec.get("components", []):
        component_dir = (directory / entry).resolve()
        component = yaml.safe_load((component_dir / "kustomization.yaml").read_text())
        if component.get("kind") != "Component":
            raise RenderError(f"{component_dir}: not a Component")
        unsupported = set(component) - {"apiVersion", "kind", "resources", "patches"}
        if unsupported:
            raise RenderError(f"{component_dir}: component fields not supported here: {sorted(unsupported)}")
        for item in component.get("resources", []):
            objects += _load_docs(component_dir / item)
        _apply_patches(objects, component.get("patches", []), component_dir)
    _apply_patches(objects, spec.get("patches", []), directory)
    ids = [_id(obj) for obj in objects]
    if len(set(ids)) != len(ids):
        raise RenderError(f"{directory}: an object is defined twice")
    return objects


def _id(obj: dict) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(KUBE / "overlays" / request.param)


def _one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def _container(workload: dict, name: str, init: bool = False) -> dict:
    pod = workload["spec"]["template"]["spec"]
    return next(c for c in pod["initContainers" if init else "containers"] if c["name"] == name)


# -- rendering --------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: kustomize's own rendering not compared")
@pytest.mark.parametrize("name", OVERLAYS)
def test_the_renderer_agrees_with_kubectl_kustomize(name):
    done = subprocess.run(["kubectl", "kustomize", str(KUBE / "overlays" / name)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    theirs = {_id(o): o for o in yaml.safe_load_all(done.stdout) if o}
    ours = {_id(o): o for o in render(KUBE / "overlays" / name)}
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key] == theirs[key], key


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(RenderError, match="namePrefix"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [../base]\npatches:\n- target: {kind: Deployment, name: nope}\n  patch: '[]'\n".replace(
            "../base", str(KUBE / "base")))
    with pytest.raises(RenderError, match="matches nothing"):
        render(tmp_path)


# -- schemas ----------------------------------------------------------------------------------------
def _strict(schema: object) -> object:
    """The CRD's structural schema with unknown fields refused (additionalProperties false where it lists properties)."""
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def keda_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((KUBE / "crds" / "keda-scaledobject.schema.json").read_text())
    schema = _strict({k: v for k, v in schema.items() if k != "$comment"})
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _check_triggers(obj: dict) -> None:
    for trigger in obj["spec"]["triggers"]:
        required, optional = TRIGGER_KEYS[trigger["type"]]
        keys = set(trigger["metadata"])
        assert required <= keys, f"{trigger.get('name')}: missing {sorted(required - keys)}"
        assert keys <= required | optional, f"{trigger.get('name')}: unknown metadata {sorted(keys - required - optional)}"
        if trigger["type"] == "redis":
            meta = trigger["metadata"]
            assert "address" in meta or "addressFromEnv" in meta or {"host", "port"} <= keys


def validate(obj: dict, keda_validator: jsonschema.Draft202012Validator, version: str) -> None:
    """Raise if `obj` is not a valid object of its kind (strict: no unknown fields)."""
    if obj["apiVersion"] == "keda.sh/v1alpha1":
        assert obj["kind"] == "ScaledObject"
        keda_validator.validate(obj)
        _check_triggers(obj)
    else:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(overlay, keda_validator, version):
    name, objects = overlay
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "ScaledObject"} <= kinds
    for obj in objects:
        try:
            validate(obj, keda_validator, version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError, AssertionError) as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} is invalid: {exc}")


def test_a_misspelt_field_is_caught(keda_validator):
    objects = render(KUBE / "overlays" / "latency")
    deployment = copy.deepcopy(_one(objects, "Deployment", "runtime-api"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        validate(deployment, keda_validator, K8S_VERSIONS[-1])

    gpu = copy.deepcopy(_one(objects, "StatefulSet", "gpu-service"))
    gpu["spec"]["volumeClaimTemplate"] = gpu["spec"].pop("volumeClaimTemplates")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(gpu, keda_validator, K8S_VERSIONS[-1])

    scaled = copy.deepcopy(_one(objects, "ScaledObject", "gpu-service"))
    scaled["spec"]["minReplicasCount"] = scaled["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="minReplicasCount"):
        validate(scaled, keda_validator, K8S_VERSIONS[-1])

    scaled = copy.deepcopy(_one(objects, "ScaledObject", "gpu-service"))
    scaled["spec"]["triggers"][0]["metadata"]["treshold"] = scaled["spec"]["triggers"][0]["metadata"].pop("threshold")
    with pytest.raises(AssertionError, match="threshold"):
        validate(scaled, keda_validator, K8S_VERSIONS[-1])

    scaled = copy.deepcopy(_one(objects, "ScaledObject", "runtime-worker"))
    scaled["spec"]["maxReplicaCount"] = "10"
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled, keda_validator, K8S_VERSIONS[-1])


# -- what ties the objects together -----------------------------------------------------------------
def _config(objects: list[dict], name: str) -> dict[str, str]:
    obj = next(o for o in objects if o["metadata"]["name"] == name and o["kind"] in ("ConfigMap", "Secret"))
    return dict(obj.get("data") or obj.get("stringData") or {})


def _container_env(objects: list[dict], container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        env.update(_config(objects, ref["name"]))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "")
    return env


def test_the_gpu_service_has_its_gpu_probes_and_model_volume(overlay):
    _, objects = overlay
    sts = _one(objects, "StatefulSet", "gpu-service")
    main = _container(sts, "gpu-service")
    init = _container(sts, "fetch-models", init=True)
    resources = main["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    assert main["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert main["livenessProbe"]["httpGet"]["path"] == "/health"
    assert main["command"] == ["python", "-m", "gpu_service"]
    assert init["command"][:5] == ["python", "-m", "gpu_service", "models", "fetch"]
    assert init["image"] == main["image"]

    env = _container_env(objects, main)
    assert env == _container_env(objects, init), "the fetch must see the settings the service loads with"
    model_dir = env["AVATAR_MODEL_DIR"]
    for container in (main, init):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["models"] == model_dir
    claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
    assert "models" in claims and "models" not in {v["name"] for v in sts["spec"]["template"]["spec"].get("volumes", [])}
    assert claims["models"]["spec"]["resources"]["requests"]["storage"].endswith("Gi")

    port = int(env["PORT"])
    assert {p["name"]: p["containerPort"] for p in main["ports"]}["http"] == port
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port


def test_the_runtime_api_leaves_jobs_to_the_workers(overlay):
    _, objects = overlay
    api = _one(objects, "Deployment", "runtime-api")
    worker = _one(objects, "Deployment", "runtime-worker")
    api_c, worker_c = _container(api, "runtime"), _container(worker, "worker")
    assert _container_env(objects, api_c)["RUN_WORKER"] == "false"
    assert api_c["command"] == ["python", "-m", "runtime"] and worker_c["command"] == ["python", "-m", "runtime", "worker"]
    assert api_c["image"] == worker_c["image"]
    assert api_c["readinessProbe"]["httpGet"]["path"] == "/ready" and api_c["livenessProbe"]["httpGet"]["path"] == "/health"
    env = _container_env(objects, worker_c)
    assert env["REDIS_URL"].startswith("redis://"), "a separate worker process needs Redis"


def _settings_names(settings_cls) -> set[str]:
    return {name.upper() for name in settings_cls.model_fields}


def _known_env(name: str, settings_cls) -> bool:
    head, _, rest = name.partition("__")
    field = settings_cls.model_fields.get(head.lower())
    if field is None:
        return False
    if not rest:
        return True
    group = field.annotation
    return hasattr(group, "model_fields") and rest.lower() in group.model_fields


def test_every_setting_given_is_one_the_service_reads_and_accepts(overlay, monkeypatch):
    from gpu_service.models.manifest import load_manifests
    from gpu_service.settings import Settings as GpuSettings
    from runtime.settings import Settings as RuntimeSettings

    _, objects = overlay
    accept_envs = {m.license.accept_env for m in load_manifests().values() if m.license}
    for workload in _workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            image = container["image"]
            if image.startswith("avatar-runtime"):
                settings_cls, allowed = RuntimeSettings, LIBRARY_ENV
            elif image.startswith("avatar-gpu-service"):
                settings_cls, allowed = GpuSettings, accept_envs
            else:
                continue  # postgres, redis: their images' own variables
            env = _container_env(objects, container)
            unknown = sorted(n for n in env if not _known_env(n, settings_cls) and n not in allowed)
            assert not unknown, f"{container['name']}: variables its service does not read: {unknown}"
            # ...and the values are ones the settings accept (as the service would read them at start).
            for name in list(os.environ):
                if _known_env(name, settings_cls):
                    monkeypatch.delenv(name)
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            settings_cls(_env_file=None)
            for name in env:
                monkeypatch.delenv(name)


def test_services_select_pods_and_name_their_ports(overlay):
    _, objects = overlay
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        pods = [w for w in _workloads(objects)
                if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())]
        assert pods, f"service {service['metadata']['name']} selects no pods"
        port_names = {p["name"] for w in pods for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)


def test_gpu_service_urls_name_every_pod_keda_may_start(overlay):
    _, objects = overlay
    urls = _config(objects, "runtime-config")["GPU_SERVICE_URLS"].split(",")
    sts = _one(objects, "StatefulSet", "gpu-service")
    headless = _one(objects, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    port = headless["spec"]["ports"][0]["port"]
    scaled = _one(objects, "ScaledObject", "gpu-service")
    assert len(urls) == scaled["spec"]["maxReplicaCount"]
    assert urls == [f"http://gpu-service-{i}.{headless['metadata']['name']}:{port}" for i in range(len(urls))]


def test_the_datastores_are_in_cluster_or_external(overlay):
    name, objects = overlay
    secrets = _config(objects, "runtime-secrets")
    db, redis_url = urlsplit(secrets["DATABASE_URL"]), urlsplit(secrets["REDIS_URL"])
    assert db.scheme.startswith("postgresql") and redis_url.scheme == "redis"
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    worker_scaler = _one(objects, "ScaledObject", "runtime-worker")
    redis_addresses = {t["metadata"]["address"] for t in worker_scaler["spec"]["triggers"] if t["type"] == "redis"}
    if name == "external-datastores":
        assert not {("StatefulSet", "postgres"), ("StatefulSet", "redis")} & names
        assert db.hostname.endswith(".example.internal") and redis_url.hostname.endswith(".example.internal")
        assert redis_addresses == {f"{redis_url.hostname}:{redis_url.port}"}
        return
    assert {("StatefulSet", "postgres"), ("StatefulSet", "redis"), ("Service", "postgres"), ("Service", "redis")} <= names
    pg = _config(objects, "postgres-credentials")
    assert (db.hostname, db.port, db.username, db.password, db.path.lstrip("/")) == (
        "postgres", 5432, pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    assert (redis_url.hostname, redis_url.port) == ("redis", 6379)
    redis_ns = _one(objects, "Service", "redis")["metadata"]["namespace"]
    # KEDA runs in its own namespace: it reaches Redis by the fully qualified name.
    assert redis_addresses == {f"redis.{redis_ns}.svc.cluster.local:6379"}


def test_keda_reads_the_queue_dramatiq_writes():
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.common import dq_name

    from runtime.jobs import QUEUE

    namespace = inspect.signature(RedisBroker.__init__).parameters["namespace"].default
    scaled = _one(render(KUBE / "overlays" / "latency"), "ScaledObject", "runtime-worker")
    lists = [t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"]
    assert lists == [f"{namespace}:{QUEUE}", f"{namespace}:{dq_name(QUEUE)}"]


def test_scaled_objects_target_the_workloads_and_follow_the_profile(overlay):
    name, objects = overlay
    want_min = {"latency": 1, "external-datastores": 1, "batch": 0}[name]
    scaled = [o for o in objects if o["kind"] == "ScaledObject"]
    assert {o["metadata"]["name"] for o in scaled} == {"runtime-worker", "gpu-service"}
    for obj in scaled:
        ref = obj["spec"]["scaleTargetRef"]
        target = _one(objects, ref["kind"], ref["name"])
        assert target["apiVersion"] == ref["apiVersion"]
        assert obj["spec"]["minReplicaCount"] == want_min
        assert obj["spec"]["maxReplicaCount"] >= max(1, want_min)
        for trigger in obj["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                _check_promql(trigger["metadata"]["query"])
    gpu_queries = [t["metadata"]["query"] for t in _one(objects, "ScaledObject", "gpu-service")["spec"]["triggers"]]
    assert any('sum(avatar_gpu_slots{state="busy"})' in q for q in gpu_queries)
    if want_min == 0:
        # At zero there are no GPU slots to count: something outside the GPU pods must wake the first one.
        assert any("avatar_runtime_" in q for q in gpu_queries)


# -- PromQL: the metrics and labels the queries use --------------------------------------------------
_METRIC = re.compile(r"\b(avatar_[a-z0-9_]+)\b(\{[^}]*\})?")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _check_promql(expr: str) -> set[str]:
    """The metric families `expr` uses; AssertionError naming an unknown metric or label."""
    used: set[str] = set()
    labels: set[str] = set(TARGET_LABELS)
    for name, matchers in _METRIC.findall(expr):
        base = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in METRICS:
                base = name[: -len(suffix)]
                assert METRICS[base][0] == "histogram", f"{name}: {base} is not a histogram"
                if suffix == "_bucket":
                    labels.add("le")
        assert base in METRICS, f"unknown metric {name!r} in {expr!r}"
        if base == name:
            assert METRICS[base][0] != "histogram", f"{name} is a histogram: use {name}_bucket/_sum/_count"
        used.add(base)
        labels |= METRICS[base][1]
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            assert label in METRICS[base][1] | TARGET_LABELS, f"{base} has no label {label!r}"
    assert used, f"no avatar_ metric in {expr!r}"
    for group in _GROUPING.findall(expr):
        for label in (part.strip() for part in group.split(",") if part.strip()):
            assert label in labels, f"grouping by {label!r}, which none of {sorted(used)} carries ({expr!r})"
    return used


def test_the_promql_check_can_fail():
    assert _check_promql('sum by (device) (avatar_gpu_memory_used_bytes)') == {"avatar_gpu_memory_used_bytes"}
    for bad, why in [("sum(avatar_gpu_slot)", "unknown metric"), ('avatar_gpu_slots{status="busy"}', "no label"),
                     ("sum by (stage) (avatar_runtime_queue_depth)", "grouping by 'stage'"),
                     ("rate(avatar_gpu_stage_duration_seconds[5m])", "is a histogram"), ("vector(1)", "no avatar_ metric")]:
        with pytest.raises(AssertionError, match=why):
            _check_promql(bad)


REGISTERED_WITH_ENGINES_OR_NVML = frozenset({"avatar_gpu_slots", "avatar_gpu_queue_depth", "avatar_gpu_memory_used_bytes",
                                             "avatar_gpu_memory_total_bytes", "avatar_gpu_utilization_ratio"})
"""GPU families whose collectors exist only with loaded engines (slots) or NVML (memory, utilisation)."""


def test_the_metric_list_is_what_the_services_register():
    from gpu_service.metrics import GpuMetrics
    from runtime.metrics import RuntimeMetrics

    kinds = {"Counter": "counter", "Histogram": "histogram", "Gauge": "gauge"}
    for registry, prefix in ((RuntimeMetrics().registry, "avatar_runtime_"), (GpuMetrics().registry, "avatar_gpu_")):
        collectors = registry._names_to_collectors  # family name -> its collector (prometheus_client's index)
        for name in (n for n in METRICS if n.startswith(prefix)):
            if name in REGISTERED_WITH_ENGINES_OR_NVML:
                source = (REPO / "gpu_service" / "metrics.py").read_text()
                assert f'f"{{PREFIX}}_{name.removeprefix(prefix)}"' in source, f"{name} is not made by gpu_service/metrics.py"
                continue
            assert name in collectors, f"{name} is not registered by the service"
            collector = collectors[name]
            if type(collector).__name__ in kinds:  # the custom collectors (slots, jobs, NVML) carry no label list
                assert kinds[type(collector).__name__] == METRICS[name][0], name
                assert frozenset(collector._labelnames) == METRICS[name][1], name
        families = {n for n, c in collectors.items() if n.startswith(prefix) and type(c).__name__ in kinds
                    and not n.endswith(("_created", "_bucket", "_sum", "_count"))}
        unlisted = {n for n in families if n not in METRICS and f"{n}_total" not in METRICS}
        assert not unlisted, f"families the dashboard and these checks do not know: {sorted(unlisted)}"


def _dashboard_exprs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in _dashboard_exprs(value)]
    if isinstance(node, list):
        return [e for item in node for e in _dashboard_exprs(item)]
    return []


def test_the_grafana_dashboard_uses_the_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] == "avatar-stack"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= len(panels) > 10
    used: set[str] = set()
    for expr in exprs:
        used |= _check_promql(expr)
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"
    for panel in panels:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# -- the GPU service image --------------------------------------------------------------------------
def test_the_gpu_service_dockerfile_copies_what_exists_and_sets_real_settings():
    from gpu_service.settings import Settings as GpuSettings

    text = (REPO / "gpu_service" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    joined = text.replace("\\\n", " ")
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", joined, re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which does not exist"
    env_names = [n for line in re.findall(r"^ENV (.+)$", joined, re.M) for n in re.findall(r"(\w+)=", line)]
    settings_env = [n for n in env_names if not n.startswith(("PYTHON", "PIP_")) and n != "PATH"]
    assert settings_env and all(_known_env(n, GpuSettings) for n in settings_env), settings_env
    assert "setup_gpu_service.sh" in joined and re.search(r'^CMD \["python", "-m", "gpu_service"\]', text, re.M)
    objects = render(KUBE / "overlays" / "latency")
    model_dir = _container_env(objects, _container(_one(objects, "StatefulSet", "gpu-service"), "gpu-service"))["AVATAR_MODEL_DIR"]
    assert f"AVATAR_MODEL_DIR={model_dir}" in joined, "the image's model directory is where the volume is mounted"
