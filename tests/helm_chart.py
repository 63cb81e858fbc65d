"""Offline helpers for the Helm chart tests: render and lint helm/covidray with Helm's Go SDK
(helm-python-sdk, no helm binary, no cluster), and load KubeRay's CRD schemas made strict.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "covidray"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
# KubeRay v1.7.0's CRDs, beside the project (see ../shared/schemas/README.md).
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay-v1.7.0"
KUBERAY_KINDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
RELEASE = "covidray-ci"
NAMESPACE = "xray"


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, recursively (as Helm merges values files)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render_files(values: dict[str, Any] | None) -> dict[str, str]:
    """Rendered templates by path, as ``helm template`` would (the schema is checked first)."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values``, NOTES.txt aside."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def lint(values: dict[str, Any] | None) -> dict[str, Any]:
    """``helm lint --strict --kube-version 1.30.0`` of the chart with ``values``."""
    import helm_python as helm

    return helm.lint(CHART, values, strict=True, kube_version="v1.30.0")


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI schema with ``additionalProperties: false`` on every object that
    lists ``properties`` and does not preserve unknown fields, so a misspelt field fails."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def kuberay_validator(kind: str) -> Any:
    """A validator of the strict OpenAPI v3 schema of a KubeRay v1 kind, from its CRD."""
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large
    crd = yaml.load((SCHEMAS / KUBERAY_KINDS[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def kuberay_errors(obj: dict[str, Any]) -> list[str]:
    """Schema errors of a rendered KubeRay object (strict), as readable lines."""
    validator = kuberay_validator(obj["kind"])
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc.get("kind") == kind]


def embedded_rayjobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """RayJob manifests carried in ConfigMaps (the fallback CronJob creates them)."""
    found = []
    for cm in by_kind(docs, "ConfigMap"):
        for text in (cm.get("data") or {}).values():
            doc = yaml.safe_load(text)
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                found.append(doc)
    return found


def ray_cluster_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(owner description, RayCluster spec) of every Ray cluster the release defines."""
    specs = []
    for doc in docs + embedded_rayjobs(docs):
        name = f"{doc['kind']}/{doc['metadata'].get('name') or doc['metadata'].get('generateName')}"
        spec = doc.get("spec", {})
        if doc["kind"] == "RayService":
            specs.append((name, spec["rayClusterConfig"]))
        elif doc["kind"] == "RayJob":
            specs.append((name, spec["rayClusterSpec"]))
        elif doc["kind"] == "RayCronJob":
            specs.append((name, spec["jobTemplate"]["rayClusterSpec"]))
    return specs


def pod_templates(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group name, pod template) of a RayCluster spec: the head and each worker group."""
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs") or []]
    return out


def rayjob_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, RayJob spec) of every RayJob: standalone, in a RayCronJob, in a ConfigMap."""
    out = []
    for doc in by_kind(docs, "RayJob") + embedded_rayjobs(docs):
        out.append((doc["metadata"].get("name") or doc["metadata"]["generateName"], doc["spec"]))
    for doc in by_kind(docs, "RayCronJob"):
        out.append((doc["metadata"]["name"], doc["spec"]["jobTemplate"]))
    return out
