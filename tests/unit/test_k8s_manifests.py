"""deploy/k8s against the Kubernetes schemas, offline: no cluster, no network.

Built-in kinds go through `kubernetes-validate` (the API's own OpenAPI schemas, shipped in the package) in strict
mode, so an unknown or misspelled field fails as the API server would reject it. The KEDA ScaledObject goes
through `cloudcoil.models.keda`, models generated from KEDA's CRD: pydantic checks the types, and comparing
the document with the model's dump finds a field the CRD does not have (pydantic drops it silently).

The manifests are in deploy/k8s/base; deploy/k8s applies the base as it is, and each overlay in
deploy/k8s/overlays patches it (`render` builds one as kustomize does, and `kubectl kustomize` checks that where
kubectl is installed).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
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
DEPLOY = ROOT / "deploy" / "k8s"
K8S = DEPLOY / "base"
SCALE_TO_ZERO = DEPLOY / "overlays" / "scale-to-zero"
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


def load(name: str, folder: Path = K8S) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((folder / name).read_text()) if doc is not None]


def kustomization(folder: Path = K8S) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def applied() -> list[dict[str, Any]]:
    """Every document `kubectl apply -k deploy/k8s` applies (the base's resources; namespace and labels aside)."""
    return [doc for name in kustomization()["resources"] for doc in load(name)]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, what kustomize applies for a kind it has no schema for (a CRD's): maps merge,
    null deletes, anything else (a list included) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def render(overlay: Path, patches: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The documents an overlay of the base applies: the base's, with each of its patches (``patches``: file name ->
    patch, instead of the file) merged into the document of the same kind and name."""
    spec = kustomization(overlay)
    assert [(overlay / resource).resolve() for resource in spec["resources"]] == [K8S.resolve()]
    docs = applied()
    for entry in spec["patches"]:
        patch = (patches or {}).get(entry["path"]) or load(entry["path"], overlay)[0]
        found = [i for i, doc in enumerate(docs) if (doc["kind"], doc["metadata"]["name"])
                 == (patch["kind"], patch["metadata"]["name"])]
        assert len(found) == 1, f"{entry['path']} patches {len(found)} documents"
        docs[found[0]] = merge_patch(docs[found[0]], patch)
    return docs


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
    assert kustomization(DEPLOY)["resources"] == ["base"]  # `kubectl apply -k deploy/k8s`: the base as it is
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
    assert scaled["spec"]["minReplicaCount"] == 1  # scale to zero is the overlay's option, not the default
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    used = set(re.findall(r"\brenderfarm_[a-z_]+\b", query))
    assert "renderfarm_queued_work_seconds" in used
    assert used <= emitted_metric_names(), used - emitted_metric_names()
    assert float(trigger["metadata"]["threshold"]) > 0
    # The busy-worker term is priced at the threshold, so busy workers are never scaled in (see the file's notes).
    assert f"{float(trigger['metadata']['threshold']):g} * " in query


def scaled_object(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "ScaledObject" and d["metadata"]["name"] == "renderfarm-worker"]
    return found


def test_the_scale_to_zero_overlay_validates_and_changes_only_the_minimum() -> None:
    docs = render(SCALE_TO_ZERO)
    for doc in docs:
        validate(doc)
    scaled, base = scaled_object(docs), by_kind_name("ScaledObject", "renderfarm-worker")
    assert scaled["spec"]["minReplicaCount"] == 0 < scaled["spec"]["maxReplicaCount"]
    # KEDA itself scales 0 <-> 1: it activates the workers when the value passes the trigger's activationThreshold
    # (any queued work or busy worker) and deactivates them after cooldownPeriod at or below it.
    (trigger,) = scaled["spec"]["triggers"]
    assert float(trigger["metadata"]["activationThreshold"]) == 0
    assert scaled["spec"]["cooldownPeriod"] > 0
    assert merge_patch(scaled, {"spec": {"minReplicaCount": base["spec"]["minReplicaCount"]}}) == base
    assert [d for d in docs if d["kind"] != "ScaledObject"] == [d for d in applied() if d["kind"] != "ScaledObject"]


@pytest.mark.parametrize("spec", [
    {"minReplicaCount": "zero"},  # wrong type
    {"minReplicas": 0},  # the HPA's name, not KEDA's
    {"minReplicaCount": 0, "cooldownPeriod": [600]},
    {"triggers": [{"type": "prometheus", "metadata": {"query": "1"}, "activation": "0"}]},  # not a trigger field
])
def test_a_broken_scale_to_zero_patch_fails_validation(spec: dict[str, Any]) -> None:
    patch = load("worker-scaledobject.yaml", SCALE_TO_ZERO)[0]
    with pytest.raises(ManifestError):
        validate(scaled_object(render(SCALE_TO_ZERO, {"worker-scaledobject.yaml": merge_patch(patch, {"spec": spec})})))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("target", [DEPLOY, SCALE_TO_ZERO])
def test_kustomize_builds_what_the_tests_check(target: Path) -> None:
    """Where kubectl is installed, its kustomize (offline) builds the same ScaledObject and the same kinds."""
    built = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True, timeout=60,
                           check=True).stdout
    docs = [doc for doc in yaml.safe_load_all(built) if doc is not None]
    expected = applied() if target == DEPLOY else render(target)
    assert scaled_object(docs)["spec"] == scaled_object(expected)["spec"]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in expected)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"renderfarm"}
