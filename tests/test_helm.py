"""The Helm chart helm/covidray, offline: Helm's Go SDK (helm-python-sdk) lints and renders it
with each ci/ values file; core objects are checked with kubernetes-validate (1.30, strict),
RayService / RayJob / RayCronJob against KubeRay v1.7.0's CRDs made strict; values.schema.json
must reject bad values; the chart's Serve config must match serving/config.yaml.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from helm_chart import (
    CHART,
    CI_VALUES,
    ROOT,
    SCHEMAS,
    by_kind,
    embedded_rayjobs,
    kuberay_errors,
    lint,
    load_values,
    merged,
    pod_templates,
    ray_cluster_specs,
    rayjob_specs,
    render,
    render_files,
)

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is a dev dependency")

CI_IDS = [p.stem for p in CI_VALUES]
DEFAULT = CHART / "ci" / "default-values.yaml"
PRODUCTION = CHART / "ci" / "production-gpu-values.yaml"
JOBS = CHART / "ci" / "jobs-values.yaml"
PACS = CHART / "ci" / "nightly-pacs-values.yaml"
KUBERAY = {"RayService", "RayJob", "RayCronJob", "RayCluster"}
NOT_CORE = KUBERAY | {"PodMonitor"}
needs_schemas = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"no KubeRay CRDs at {SCHEMAS}")


@pytest.fixture(scope="module", params=CI_VALUES, ids=CI_IDS)
def ci(request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values = load_values(request.param)
    return values, render(values)


def test_ci_value_sets_present():
    assert {"default-values", "production-gpu-values"} <= set(CI_IDS)


# --- lint and render ---------------------------------------------------------------------


@pytest.mark.parametrize("path", CI_VALUES, ids=CI_IDS)
def test_lint_clean(path: Path):
    report = lint(load_values(path))
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert problems == []


def test_renders_expected_objects(ci):
    values, docs = ci
    kinds = {doc["kind"] for doc in docs}
    assert "ServiceAccount" in kinds
    assert ("NetworkPolicy" in kinds) == values.get("networkPolicy", {}).get("enabled", True)
    if values.get("serve", {}).get("enabled", True):
        assert {"RayService", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        assert doc["metadata"]["name"].startswith("covidray-ci")
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "covidray-ci"


# --- validation of every rendered object ---------------------------------------------------


def test_core_objects_pass_kubernetes_validate(ci):
    import kubernetes_validate

    _, docs = ci
    core = [doc for doc in docs if doc["kind"] not in NOT_CORE]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


@needs_schemas
def test_kuberay_objects_pass_strict_crd_schemas(ci):
    _, docs = ci
    objects = [doc for doc in docs if doc["kind"] in KUBERAY] + embedded_rayjobs(docs)
    assert objects
    for obj in objects:
        assert obj["apiVersion"] == "ray.io/v1"
        assert kuberay_errors(obj) == [], obj["kind"]


@needs_schemas
def test_strict_crd_schemas_catch_a_misspelt_field():
    docs = render(load_values(DEFAULT))
    (service,) = by_kind(docs, "RayService")
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    service["spec"]["serveConfigv2"] = "x"
    errors = kuberay_errors(service)
    assert any("rayStartParam" in e for e in errors) and any("serveConfigv2" in e for e in errors)


PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "minProperties": 1,
                    "properties": {
                        "matchLabels": {"type": "object"},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "relabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def test_podmonitor_off_by_default_and_well_formed_when_on():
    assert not by_kind(render(load_values(DEFAULT)), "PodMonitor")
    docs = render(load_values(PRODUCTION))
    (monitor,) = by_kind(docs, "PodMonitor")
    jsonschema.validate(monitor, PODMONITOR_SCHEMA)
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    for _, cluster in ray_cluster_specs(docs):
        for _, template in pod_templates(cluster):
            assert selector.items() <= template["metadata"]["labels"].items()
            ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
            assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


# --- values.schema.json ---------------------------------------------------------------------

BAD_VALUES = {
    "negative replicas": {"serve": {"cluster": {"cpuWorkers": {"replicas": -1}}}},
    "negative minReplicas": {"nightly": {"cluster": {"gpuWorkers": {"minReplicas": -2}}}},
    "empty model uri": {"model": {"uri": ""}},
    "missing model uri": {"model": {"uri": None}},  # null removes the key in Helm
    "unknown top-level key": {"replicaCount": 3},
    "unknown nested key": {"serve": {"app": {"max_batch_size": 8}}},
    "credentials in values": {"s3": {"accessKeyId": "AKIA..."}},
    "nightly without data": {"nightly": {"enabled": True, "data": ""}},
    "training without out": {"training": {"enabled": True, "data": "s3://b/ds"}},
    "bad pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "nightly without pseudonym key": {"pseudonymKeySecret": {"name": ""}},
    "pseudonym key in values": {"pseudonymKeySecret": {"value": "site-secret"}},
    "pdb as maxUnavailable": {"serve": {"podDisruptionBudget": {"maxUnavailable": 1}}},
    "unknown upgrade strategy": {"serve": {"upgradeStrategy": {"type": "Recreate"}}},
    "pacs without links": {"nightly": {"pacs": {"source": "dicomweb+https://pacs/dicom-web"}}},
    "pacs password in values": {"nightly": {"pacs": {"password": "hunter2"}}},
    "pacs source not dicomweb": {"nightly": {"pacs": {"source": "https://pacs/dicom-web"}}},
    "two ca bundles": {"nightly": {"pacs": {"caBundle": {"configMap": "a", "secret": "b"}}}},
}


@pytest.mark.parametrize("override", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(override: dict[str, Any]):
    values = merged(load_values(DEFAULT), override)
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render_files(values)
    assert lint(values)["errors"]


def test_values_schema_is_closed_at_every_level():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, value in node.items():
                if key not in {"if", "then"}:  # extra constraints on a closed object
                    walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(schema, "")
    assert open_objects == []


def test_missing_model_uri_fails_with_default_values():
    with pytest.raises(helm.HelmValuesError, match="/model/uri"):
        render_files(None)


def test_replica_bounds_are_checked():
    values = merged(load_values(DEFAULT), {"serve": {"cluster": {"cpuWorkers": {"replicas": 9}}}})
    with pytest.raises(helm.HelmError, match="minReplicas <= replicas <= maxReplicas"):
        render_files(values)


# --- Serve config: serving/config.yaml -> files/serve-config.yaml -> serveConfigV2 ----------


def _sync_module():
    spec = importlib.util.spec_from_file_location(
        "sync_serve_config", ROOT / "scripts" / "sync_serve_config.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_host(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    out["http_options"] = {k: v for k, v in config["http_options"].items() if k != "host"}
    return out


def test_chart_serve_config_matches_serving_config():
    source = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    copy = yaml.safe_load((CHART / "files" / "serve-config.yaml").read_text())
    hint = "run python scripts/sync_serve_config.py"
    assert _without_host(copy) == _without_host(source), hint
    assert copy["http_options"]["host"] == "0.0.0.0"
    sync = _sync_module()
    source_text = (ROOT / "serving" / "config.yaml").read_text()
    assert sync.render(source_text) == (CHART / "files" / "serve-config.yaml").read_text(), hint


def test_sync_script_keeps_comments_and_sets_host():
    sync = _sync_module()
    text = sync.render("# c\nhttp_options:\n  port: 8000  # p\n  host: 127.0.0.1  # h\nx: 1\n")
    assert "host: 0.0.0.0  # h" in text and "port: 8000  # p" in text
    inserted = yaml.safe_load(sync.render("http_options:\n  port: 8000\napplications: []\n"))
    assert inserted["http_options"] == {"host": "0.0.0.0", "port": 8000}


APP_ARGS = {
    "maxBatchSize": "max_batch_size",
    "batchWaitTimeoutS": "batch_wait_timeout_s",
    "minReplicas": "min_replicas",
    "maxReplicas": "max_replicas",
    "targetOngoingRequests": "target_ongoing_requests",
    "maxQueuedRequests": "max_queued_requests",
    "numCpus": "num_cpus",
    "numGpus": "num_gpus",
    "maxBodyBytes": "max_body_bytes",
}


@pytest.mark.parametrize("path", [DEFAULT, PRODUCTION], ids=["default", "production-gpu"])
def test_serve_config_v2_is_the_file_with_values_args(path: Path):
    values = load_values(path)
    (service,) = by_kind(render(values), "RayService")
    rendered = yaml.safe_load(service["spec"]["serveConfigV2"])
    chart_copy = yaml.safe_load((CHART / "files" / "serve-config.yaml").read_text())
    expected_args = dict(chart_copy["applications"][0]["args"], model=values["model"]["uri"])
    for key, value in values.get("serve", {}).get("app", {}).items():
        if value is not None:
            expected_args[APP_ARGS[key]] = value
    (app,) = rendered["applications"]
    assert app["args"] == expected_args
    assert {k: v for k, v in app.items() if k != "args"} == {
        k: v for k, v in chart_copy["applications"][0].items() if k != "args"
    }
    assert {k: v for k, v in rendered.items() if k != "applications"} == {
        k: v for k, v in chart_copy.items() if k != "applications"
    }
    assert app["import_path"] == "serving.app:build_app"


def test_every_app_arg_has_a_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart_copy = yaml.safe_load((CHART / "files" / "serve-config.yaml").read_text())
    assert set(values["serve"]["app"]) == set(APP_ARGS)
    assert set(APP_ARGS.values()) <= set(chart_copy["applications"][0]["args"])


def test_ingress_body_limit_matches_the_endpoint_limit():
    for path, ingress_on in [(DEFAULT, {"ingress": {"enabled": True}}), (PRODUCTION, {})]:
        docs = render(merged(load_values(path), ingress_on))
        (service,) = by_kind(docs, "RayService")
        app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
        (ingress,) = by_kind(docs, "Ingress")
        limit = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
        assert limit == str(app["args"]["max_body_bytes"])
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {
            "name": f"{service['metadata']['name']}-serve-svc",
            "port": {"number": 8000},
        }
    assert load_values(PRODUCTION)["serve"]["app"]["maxBodyBytes"] == int(limit)


# --- the RayService cluster -----------------------------------------------------------------


def test_rayservice_gpu_workers_autoscaling_and_readiness():
    values = load_values(PRODUCTION)
    docs = render(values)
    (service,) = by_kind(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"
    (gpu,) = cluster["workerGroupSpecs"]
    expected = values["serve"]["cluster"]["gpuWorkers"]
    assert (gpu["groupName"], gpu["minReplicas"], gpu["maxReplicas"]) == (
        "gpu",
        expected["minReplicas"],
        expected["maxReplicas"],
    )
    container = gpu["template"]["spec"]["containers"][0]
    assert container["image"].endswith(":0.1.0-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    # KubeRay's own probes (raylet + local Serve proxy), not the chart's.
    assert "readinessProbe" not in container and "livenessProbe" not in container
    assert {"name": "serve", "containerPort": 8000} in container["ports"]
    env = {e["name"]: e for e in container["env"]}
    assert env["COVIDRAY_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "covidray-api-token",
        "key": "token",
    }
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(head["resources"]) and head["image"].endswith(":0.1.0")


def test_default_rayservice_runs_on_cpu_workers():
    (service,) = by_kind(render(load_values(DEFAULT)), "RayService")
    (cpu,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    container = cpu["template"]["spec"]["containers"][0]
    assert cpu["groupName"] == "cpu" and "nvidia.com/gpu" not in str(container["resources"])
    assert "readinessProbe" not in container
    assert "COVIDRAY_API_TOKEN" not in {e["name"] for e in container["env"]}


@pytest.mark.parametrize("path", [DEFAULT, PRODUCTION], ids=["generated", "existing-secret"])
def test_ray_token_auth_on(path: Path):
    values = load_values(path)
    docs = render(values)
    specs = ray_cluster_specs(docs)
    assert specs
    secret = values.get("rayAuth", {}).get("secretName")
    for _, cluster in specs:
        expected = {"mode": "token", **({"secretName": secret} if secret else {})}
        assert cluster["authOptions"] == expected
        for _, template in pod_templates(cluster):
            env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
            assert env["RAY_AUTH_MODE"] == "token"


def test_ray_token_auth_off_says_disabled():
    for _, cluster in ray_cluster_specs(render(load_values(JOBS))):
        assert cluster["authOptions"] == {"mode": "disabled"}
        for _, template in pod_templates(cluster):
            env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
            assert env["RAY_AUTH_MODE"] == "disabled"


def test_pdbs_select_the_serve_workers_and_the_head():
    docs = render(load_values(PRODUCTION))
    pdbs = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "PodDisruptionBudget")}
    assert set(pdbs) == {"covidray-ci-serve", "covidray-ci-serve-head"}
    (service,) = by_kind(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    for name, role in (("covidray-ci-serve", "worker"), ("covidray-ci-serve-head", "head")):
        selector = pdbs[name]["selector"]["matchLabels"]
        for group, template in pod_templates(cluster):
            selected = selector.items() <= template["metadata"]["labels"].items()
            assert selected == ((group == "head") == (role == "head")), (name, group)
    # Two GPU workers at minimum: drains keep one.
    assert pdbs["covidray-ci-serve"]["minAvailable"] == 1
    assert pdbs["covidray-ci-serve-head"]["minAvailable"] == 1


def test_pdb_minavailable_from_values_and_checked():
    values = merged(
        load_values(PRODUCTION), {"serve": {"podDisruptionBudget": {"minAvailable": 2}}}
    )
    with pytest.raises(helm.HelmError, match="must be below the Serve workers' minReplicas"):
        render_files(values)
    # One CPU worker at minimum (the defaults): no worker PDB, the head's only.
    names = {
        p["metadata"]["name"] for p in by_kind(render(load_values(DEFAULT)), "PodDisruptionBudget")
    }
    assert names == {"covidray-ci-serve-head"}


# --- nightly rescoring, training, GAN -----------------------------------------------------


def _entrypoint(spec: dict[str, Any]) -> list[str]:
    return shlex.split(spec["entrypoint"])


def _nightly(values_file: Path, kind: str, other: str) -> tuple[dict, list[dict], dict]:
    """(values, rendered docs, the one nightly object of ``kind``); no ``other`` rendered."""
    values = load_values(values_file)
    docs = render(values)
    assert not by_kind(docs, other)
    (cron,) = by_kind(docs, kind)
    return values, docs, cron


def _deletion(spec: dict[str, Any]) -> dict[tuple[str, str], int]:
    """{(policy, condition status): ttlSeconds} of a RayJob spec's deletion rules."""
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    out = {}
    for rule in spec["deletionStrategy"]["deletionRules"]:
        c = rule["condition"]
        out[(rule["policy"], c.get("jobStatus") or c["jobDeploymentStatus"])] = c["ttlSeconds"]
    return out


NIGHTLY_DELETION = {
    (policy, status): ttl
    for policy, ttl in (("DeleteCluster", 600), ("DeleteSelf", 604800))
    for status in ("SUCCEEDED", "FAILED", "Failed")
}


def test_nightly_raycronjob_when_the_gate_is_on():
    values, docs, cron = _nightly(JOBS, "RayCronJob", "CronJob")
    n = values["nightly"]
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == (n["schedule"], n["timeZone"])
    assert set(cron["spec"]) <= {"schedule", "timeZone", "suspend", "jobTemplate"}
    job = cron["spec"]["jobTemplate"]
    assert _deletion(job) == NIGHTLY_DELETION
    assert _entrypoint(job) == [
        "python",
        "/app/jobs/rescore.py",
        "--model",
        values["model"]["uri"],
        "--data",
        n["data"],
        "--out",
        n["out"],
        *n["extraArgs"],
    ]
    (gpu,) = job["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_nightly_fallback_cronjob_when_the_gate_is_off():
    values, docs, cron = _nightly(DEFAULT, "CronJob", "RayCronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert (spec["schedule"], spec["timeZone"]) == ("0 2 * * *", "Etc/UTC")
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:3] == ["apply", "--server-side", "--field-manager=covidray-nightly"]
    # Its own ServiceAccount, allowed to apply RayJobs and nothing else.
    account = pod["serviceAccountName"]
    (role,) = by_kind(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "patch"]}
    ]
    (binding,) = by_kind(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "xray"}]
    assert account in {sa["metadata"]["name"] for sa in by_kind(docs, "ServiceAccount")}
    # The RayJob it applies: the mounted ConfigMap's manifest, named by the init container
    # after the pod's Job (one name per scheduled run, the same on every retry).
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    (init,) = pod["initContainers"]
    (mount,) = [m for m in init["volumeMounts"] if m["name"] == volume["name"]]
    assert f"{mount['mountPath']}/rayjob.yaml" in init["command"][2]
    (job_name,) = [e for e in init["env"] if e["name"] == "JOB_NAME"]
    assert job_name["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/job-name']"
    )
    work = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["work"]
    assert f"> {work}/rayjob.yaml" in init["command"][2]
    assert container["args"][4] == f"{work}/rayjob.yaml"
    (cm,) = [
        c
        for c in by_kind(docs, "ConfigMap")
        if c["metadata"]["name"] == volume["configMap"]["name"]
    ]
    job = yaml.safe_load(cm["data"]["rayjob.yaml"])
    assert job["kind"] == "RayJob" and job["metadata"]["name"] == "@JOB_NAME@"
    assert "generateName" not in job["metadata"]
    assert _deletion(job["spec"]) == NIGHTLY_DELETION
    assert _entrypoint(job["spec"])[1:] == [
        "/app/jobs/rescore.py",
        "--model",
        values["model"]["uri"],
        "--data",
        values["nightly"]["data"],
        "--out",
        values["nightly"]["out"],
    ]


def _pacs_job(values: dict[str, Any]) -> dict[str, Any]:
    (job,) = embedded_rayjobs(render(values))
    return job["spec"]


def test_nightly_pacs_pull_runs_jobs_nightly():
    values = load_values(PACS)
    n, p = values["nightly"], values["nightly"]["pacs"]
    spec = _pacs_job(values)
    assert _entrypoint(spec) == [
        "python",
        "/app/jobs/nightly.py",
        "--source",
        p["source"],
        "--to",
        p["destination"],
        "--data",
        n["data"],
        "--links",
        p["links"],
        "--model",
        values["model"]["uri"],
        "--out",
        n["out"],
        "--modality",
        "CR",
        "--modality",
        "DX",
        "--ca-bundle",
        "/etc/covidray/pacs-ca/ca.crt",
    ]
    for _, template in pod_templates(spec["rayClusterSpec"]):
        pod = template["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        for name, key in (
            ("COVIDRAY_DICOMWEB_USER", "username"),
            ("COVIDRAY_DICOMWEB_PASSWORD", "password"),
            ("COVIDRAY_DICOMWEB_TOKEN", "token"),
        ):
            assert "value" not in env[name]
            assert env[name]["valueFrom"]["secretKeyRef"] == {
                "name": p["credentialsSecret"],
                "key": key,
                "optional": True,
            }
        (ca,) = [v for v in pod["volumes"] if v["name"] == "pacs-ca"]
        assert ca["configMap"] == {
            "name": "hospital-ca",
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
        }
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "pacs-ca"]
        assert mount == {"name": "pacs-ca", "mountPath": "/etc/covidray/pacs-ca", "readOnly": True}
    # Credentials never as arguments, never in the rendered text.
    text = "\n".join(render_files(values).values())
    assert "COVIDRAY_DICOMWEB" not in spec["entrypoint"]
    assert "password" not in spec["entrypoint"] and "token" not in spec["entrypoint"]
    assert "runtimeEnvYAML" not in text


def test_nightly_pacs_defaults_and_secret_ca():
    values = merged(
        load_values(PACS),
        {
            "nightly": {
                "pacs": {
                    "destination": "",
                    "modalities": [],
                    "caBundle": {"configMap": "", "secret": "pacs-ca", "key": "bundle.pem"},
                }
            }
        },
    )
    spec = _pacs_job(values)
    words = _entrypoint(spec)
    assert "--to" not in words and "--modality" not in words
    assert words[words.index("--ca-bundle") + 1] == "/etc/covidray/pacs-ca/bundle.pem"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (ca,) = [v for v in head["volumes"] if v["name"] == "pacs-ca"]
    assert ca["secret"] == {
        "secretName": "pacs-ca",
        "items": [{"key": "bundle.pem", "path": "bundle.pem"}],
    }
    # No CA bundle: no mount, no flag.
    plain = merged(values, {"nightly": {"pacs": {"caBundle": {"secret": ""}}}})
    spec = _pacs_job(plain)
    assert "--ca-bundle" not in _entrypoint(spec)
    assert "pacs-ca" not in str(spec["rayClusterSpec"])


def test_nightly_without_pacs_has_no_pacs_credentials():
    (job,) = embedded_rayjobs(render(load_values(DEFAULT)))
    assert _entrypoint(job["spec"])[1] == "/app/jobs/rescore.py"
    assert "COVIDRAY_DICOMWEB" not in str(job) and "pacs-ca" not in str(job)


def test_training_and_gan_jobs_off_by_default_on_in_jobs_values():
    assert not by_kind(render(load_values(DEFAULT)), "RayJob")
    values = load_values(JOBS)
    docs = render(values)
    jobs = {job["metadata"]["name"]: job["spec"] for job in by_kind(docs, "RayJob")}
    assert set(jobs) == {"covidray-ci-train", "covidray-ci-gan"}
    train, gan = jobs["covidray-ci-train"], jobs["covidray-ci-gan"]
    t, g = values["training"], values["gan"]
    assert _entrypoint(train) == [
        "python",
        "/app/jobs/train.py",
        "--data",
        t["data"],
        "--out",
        t["out"],
        *t["extraArgs"],
    ]
    assert _entrypoint(gan)[:2] == ["python", "/app/jobs/train_gan.py"]
    assert _entrypoint(gan)[2:] == ["--data", g["data"], "--out", g["out"], *g["extraArgs"]]
    for spec in (train, gan):
        # The cluster goes; the Helm-owned RayJob stays (else the next upgrade re-runs it).
        assert _deletion(spec) == {
            ("DeleteCluster", status): 600 for status in ("SUCCEEDED", "FAILED", "Failed")
        }
    assert not by_kind(docs, "RayService")


def test_entrypoints_quote_odd_arguments():
    values = merged(load_values(DEFAULT), {"nightly": {"extraArgs": ["--note", "it's; rm -rf /"]}})
    (cm,) = by_kind(render(values), "ConfigMap")
    job = yaml.safe_load(cm["data"]["rayjob.yaml"])
    assert _entrypoint(job["spec"])[-2:] == ["--note", "it's; rm -rf /"]


# --- security --------------------------------------------------------------------------------


def _all_pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    pods = []
    for owner, cluster in ray_cluster_specs(docs):
        pods += [(f"{owner} {group}", t["spec"]) for group, t in pod_templates(cluster)]
    for name, spec in rayjob_specs(docs):
        pods.append((f"{name} submitter", spec["submitterPodTemplate"]["spec"]))
    for cron in by_kind(docs, "CronJob"):
        pods.append(
            (cron["metadata"]["name"], cron["spec"]["jobTemplate"]["spec"]["template"]["spec"])
        )
    return pods


def test_pods_are_locked_down(ci):
    _, docs = ci
    pods = _all_pod_specs(docs)
    assert pods
    for where, pod in pods:
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in pod["containers"] + pod.get("initContainers", []):
            c = container["securityContext"]
            assert c["readOnlyRootFilesystem"] is True, where
            assert c["allowPrivilegeEscalation"] is False, where
            assert c["capabilities"] == {"drop": ["ALL"]}, where


def test_ray_pods_run_as_ray_with_writable_emptydirs(ci):
    _, docs = ci
    for owner, cluster in ray_cluster_specs(docs):
        for group, template in pod_templates(cluster):
            pod = template["spec"]
            assert pod["securityContext"]["runAsUser"] == 1000, (owner, group)
            (container,) = pod["containers"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            env = {e["name"]: e.get("value") for e in container["env"]}
            for path in ("/tmp", "/tmp/ray", env["HOME"]):
                assert "emptyDir" in mounts[path], (owner, group, path)
            assert "/dev/shm" not in mounts  # KubeRay's, sized to the memory limit
            assert env["HOME"] != "/home/ray"  # the image's Python lives there
            assert env["MPLCONFIGDIR"].startswith("/tmp/")
            # Only a head running the autoscaler sidecar gets an API token.
            autoscaling = cluster["enableInTreeAutoscaling"] and group == "head"
            assert pod["automountServiceAccountToken"] is autoscaling
        if cluster["enableInTreeAutoscaling"]:
            options = cluster["autoscalerOptions"]
            assert options["securityContext"]["readOnlyRootFilesystem"] is True
            assert {m["mountPath"] for m in options["volumeMounts"]} >= {"/tmp"}


def _envs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("env"), list):
                found.extend(node["env"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(docs + embedded_rayjobs(docs))
    return found


def test_s3_keys_only_from_a_secret():
    values = load_values(DEFAULT)
    envs = _envs(render(values))
    keys = [e for e in envs if e["name"] in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}]
    assert keys
    for e in keys:
        assert "value" not in e
        assert e["valueFrom"]["secretKeyRef"]["name"] == values["s3"]["credentialsSecret"]["name"]
    plain = {e["name"]: e["value"] for e in envs if "value" in e}
    assert plain["AWS_ENDPOINT_URL"] == values["s3"]["endpoint"]
    assert plain["AWS_DEFAULT_REGION"] == values["s3"]["region"]


def test_cloud_identity_instead_of_keys():
    values = load_values(PRODUCTION)
    docs = render(values)
    names = {e["name"] for e in _envs(docs)}
    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    (account,) = [sa for sa in by_kind(docs, "ServiceAccount") if "annotations" in sa["metadata"]]
    assert account["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    for _, cluster in ray_cluster_specs(docs):
        for _, template in pod_templates(cluster):
            assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]


# --- network policy and names ---------------------------------------------------------------


def test_network_policy_covers_every_ray_pod():
    values = load_values(DEFAULT)
    docs = render(values)
    (policy,) = by_kind(docs, "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    templates = [t for _, c in ray_cluster_specs(docs) for _, t in pod_templates(c)]
    templates += [s["submitterPodTemplate"] for _, s in rayjob_specs(docs)]
    for template in templates:
        assert selector.items() <= template["metadata"]["labels"].items()
    rules = policy["spec"]["ingress"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # Open ports: any port only from the release's pods; 8000 from serveFrom and the operator.
    assert rules[0] == {"from": [{"podSelector": {"matchLabels": selector}}]}
    by_port: dict[int, list] = {}
    for rule in rules[1:]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    assert set(by_port) == {8000, 8265}
    net = values.get("networkPolicy", {})
    operator = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["operatorFrom"]
    assert by_port[8265] == operator and "dashboardFrom" not in net
    assert (
        by_port[8000]
        == operator
        + yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["serveFrom"]
    )
