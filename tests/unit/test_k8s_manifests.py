"""deploy/k8s against the Kubernetes schemas, offline: no cluster, no network.

Built-in kinds go through `kubernetes-validate` (the API's own OpenAPI schemas, shipped in the package) in strict
mode, so an unknown or misspelled field fails as the API server would reject it. The KEDA ScaledObject goes
through `cloudcoil.models.keda`, models generated from KEDA's CRD: pydantic checks the types, and comparing
the document with the model's dump finds a field the CRD does not have (pydantic drops it silently).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pydantic
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject

from api.admin import autoscaling
from api.admin.metrics import Snapshot, families

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"  # the oldest minor version still maintained upstream when this was written
JOB_TIME_LIMIT_S = 600


class ManifestError(Exception):
    pass


def _unknown_fields(given: Any, known: Any, path: str = "") -> list[str]:
    """Keys of `given` that are missing from `known` (the model's dump), recursively."""
    if isinstance(given, dict) and isinstance(known, dict):
        missing = [f"{path}.{k}".lstrip(".") for k in given if k not in known]
        return missing + [m for k in given if k in known for m in _unknown_fields(given[k], known[k], f"{path}.{k}")]
    if isinstance(given, list) and isinstance(known, list) and len(given) == len(known):
        pairs = enumerate(zip(given, known, strict=True))
        return [m for i, (g, k) in pairs for m in _unknown_fields(g, k, f"{path}[{i}]")]
    return []


def validate(doc: dict[str, Any]) -> None:
    """Raise ManifestError when `doc` does not match its kind's schema."""
    if doc.get("apiVersion") == "keda.sh/v1alpha1" and doc.get("kind") == "ScaledObject":
        try:
            model = ScaledObject.model_validate(doc)
        except pydantic.ValidationError as e:
            raise ManifestError(str(e)) from e
        unknown = _unknown_fields(doc, model.model_dump(by_alias=True, exclude_unset=True, mode="json"))
        if unknown:
            raise ManifestError(f"fields the ScaledObject CRD does not have: {unknown}")
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
        raise ManifestError(getattr(e, "message", str(e))) from e


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def applied() -> list[dict[str, Any]]:
    """Every document `kubectl apply -k deploy/k8s` applies."""
    return [doc for name in kustomization()["resources"] for doc in load(name)]


def by_kind_name(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in applied() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_validates(name: str) -> None:
    docs = load(name)
    assert docs, name
    for doc in docs:
        validate(doc)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    listed = kustomization()["resources"]
    assert sorted(listed) == sorted(set(MANIFESTS) - {"secret.example.yaml"})
    assert kustomization()["namespace"] == "renderfarm"
    assert {d["kind"] for d in applied()} >= {"Namespace", "ConfigMap", "Deployment", "Service", "Job", "ScaledObject"}


def _broken(doc: dict[str, Any], path: list[str | int], key: str, value: Any) -> dict[str, Any]:
    copied = copy.deepcopy(doc)
    node: Any = copied
    for part in path:
        node = node[part]
    node[key] = value
    return copied


@pytest.mark.parametrize(("name", "path", "key", "value"), [
    ("worker.yaml", ["spec"], "replica", 2),  # misspelled field
    ("api.yaml", ["spec"], "replicas", "two"),  # wrong type
    ("worker.yaml", ["spec", "template", "spec"], "terminationGracePeriod", 900),
    ("api.yaml", ["spec", "template", "spec", "containers", 0, "readinessProbe", "httpGet"], "port", [7861]),
    ("worker-scaledobject.yaml", ["spec"], "minReplicas", 0),  # the HPA's name, not KEDA's
    ("worker-scaledobject.yaml", ["spec"], "maxReplicaCount", "eight"),
    ("worker-scaledobject.yaml", ["spec", "triggers", 0], "metdata", {}),
])
def test_a_broken_copy_fails_validation(name: str, path: list[str | int], key: str, value: Any) -> None:
    doc = load(name)[0]
    validate(doc)
    with pytest.raises(ManifestError):
        validate(_broken(doc, path, key, value))


def test_gpu_worker_takes_one_gpu_and_outlives_a_job_on_shutdown() -> None:
    worker = by_kind_name("Deployment", "renderfarm-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] > JOB_TIME_LIMIT_S
    assert "replicas" not in worker["spec"]  # KEDA owns the count; an apply must not reset it
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert container["command"] == compose["worker"]["command"]
    assert container["image"] == compose["worker"]["image"]
    webhooks = by_kind_name("Deployment", "renderfarm-webhooks")["spec"]["template"]["spec"]["containers"][0]
    assert webhooks["command"] == compose["webhooks"]["command"] and webhooks["image"] == compose["webhooks"]["image"]
    config = by_kind_name("ConfigMap", "renderfarm-config")["data"]
    assert int(config["RENDERFARM_JOB_TIME_LIMIT"]) == JOB_TIME_LIMIT_S


def test_api_is_replicated_and_ready_on_healthz() -> None:
    api = by_kind_name("Deployment", "renderfarm-api")
    assert api["spec"]["replicas"] >= 2
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    service = by_kind_name("Service", "renderfarm-api")
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    migrate = by_kind_name("Job", "renderfarm-migrate")["spec"]["template"]["spec"]["containers"][0]
    assert migrate["command"] == ["alembic", "upgrade", "head"]


def test_every_pod_reads_the_shared_config_and_secret() -> None:
    secret = load("secret.example.yaml")[0]
    assert {"DATABASE_URL", "REDIS_URL"} <= set(secret["stringData"])
    assert "STORAGE_URL" in by_kind_name("ConfigMap", "renderfarm-config")["data"]
    for doc in applied():
        if doc["kind"] in ("Deployment", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
                assert refs == {"renderfarm-config", secret["metadata"]["name"]}, doc["metadata"]["name"]


def emitted_metric_names() -> set[str]:
    """The family names /metrics writes for a snapshot with every source answering."""
    snap = Snapshot(
        sources_up={"postgres": True, "redis": True},
        queued_work=autoscaling.summarize([("render", "m.safetensors", {"steps": 20}, 3, None)]),
        activity=autoscaling.WorkerActivity(busy=1, idle=1),
        workers=[("w1", 1.0, False, 3, 1.5)],
    )
    return {family.name for family in families(snap)}


def test_scaled_object_scales_the_worker_on_a_metric_that_metrics_exports() -> None:
    scaled = by_kind_name("ScaledObject", "renderfarm-worker")
    target = scaled["spec"]["scaleTargetRef"]
    worker = by_kind_name("Deployment", target["name"])
    assert target.get("kind", "Deployment") == "Deployment" and worker["metadata"]["name"] == "renderfarm-worker"
    assert scaled["spec"]["minReplicaCount"] == 1  # scale to zero is the documented option, not the default
    assert "minReplicaCount: 0" in (K8S / "worker-scaledobject.yaml").read_text()
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    used = set(re.findall(r"\brenderfarm_[a-z_]+\b", query))
    assert "renderfarm_queued_work_seconds" in used
    assert used <= emitted_metric_names(), used - emitted_metric_names()
    assert float(trigger["metadata"]["threshold"]) > 0
    # The busy-worker term is priced at the threshold, so busy workers are never scaled in (see the file's notes).
    assert f"{float(trigger['metadata']['threshold']):g} * " in query
