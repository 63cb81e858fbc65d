"""KubeRay v1.7.0's own rules as properties of what the chart renders, with every ci/ values
file: what the operator's validation would refuse, and what its controllers would build from
the objects (pod labels, head Services, probes, /dev/shm) that would misbehave. Each test names
the file and function of ray-project/kuberay at tag v1.7.0 (commit 59d663aeec13) it follows,
under ray-operator/controllers/ray/. The CRDs' CEL rules (x-kubernetes-validations) are
evaluated on the rendered objects with cel-python, as the API server would on create and on
an unchanged re-apply (helm upgrade).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest
import yaml
from helm_chart import (
    CHART,
    CI_VALUES,
    KUBERAY_KINDS,
    SCHEMAS,
    by_kind,
    embedded_rayjobs,
    load_values,
    merged,
    render,
    render_files,
)

pytest.importorskip("helm_python", reason="helm-python-sdk is a dev dependency")

CI_IDS = [p.stem for p in CI_VALUES]
DEFAULT = CHART / "ci" / "default-values.yaml"
PRODUCTION = CHART / "ci" / "production-gpu-values.yaml"
needs_schemas = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"no KubeRay CRDs at {SCHEMAS}")

# utils/constant.go
MAX_RAYCLUSTER_NAME = 53
MAX_NAME = {"RayService": MAX_RAYCLUSTER_NAME - 6, "RayJob": MAX_RAYCLUSTER_NAME - 6}
MAX_NAME["RayCronJob"] = MAX_NAME["RayJob"] - 11
SERVING_PORT_NAME, DEFAULT_SERVING_PORT = "serve", 8000
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# A batch/v1 CronJob names its Jobs <cronjob>-<minutes since 1970> (8 digits until 2160).
SAMPLE_JOB_SUFFIX = "-29412345"


@pytest.fixture(scope="module", params=CI_VALUES, ids=CI_IDS)
def ci(request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values = load_values(request.param)
    return values, render(values)


# --- what the operator gets ------------------------------------------------------------------


def _named(job: dict[str, Any], cron_name: str) -> dict[str, Any]:
    """The fallback CronJob's RayJob as its pod applies it: named after the pod's Job."""
    if job["metadata"].get("name") == "@JOB_NAME@":
        job = {**job, "metadata": {**job["metadata"], "name": cron_name + SAMPLE_JOB_SUFFIX}}
    return job


def rayjobs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, RayJob spec, nightly) of every RayJob the release creates or has created."""
    out = []
    crons = by_kind(docs, "CronJob")
    for job in by_kind(docs, "RayJob") + embedded_rayjobs(docs):
        if crons:
            job = _named(job, crons[0]["metadata"]["name"])
        # A generated name gets 5 random characters (apiserver SimpleNameGenerator).
        name = job["metadata"].get("name") or job["metadata"]["generateName"] + "x1y2z"
        nightly = job["metadata"]["labels"].get("app.kubernetes.io/component") == "nightly"
        out.append((name, job["spec"], nightly))
    for cron in by_kind(docs, "RayCronJob"):
        # raycronjob_controller.go getRayJobName: <cronjob>-<minutes since 1970>.
        out.append(
            (cron["metadata"]["name"] + SAMPLE_JOB_SUFFIX, cron["spec"]["jobTemplate"], True)
        )
    return out


def clusters(docs: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(owner, creator CRD: RayService | RayJob, RayCluster spec) of every Ray cluster."""
    out = [
        (f"RayService/{s['metadata']['name']}", "RayService", s["spec"]["rayClusterConfig"])
        for s in by_kind(docs, "RayService")
    ]
    out += [(f"RayJob/{n}", "RayJob", spec["rayClusterSpec"]) for n, spec, _ in rayjobs(docs)]
    return out


def groups(cluster: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(node type, group name, group spec) of a RayCluster spec."""
    out = [("head", "headgroup", cluster["headGroupSpec"])]
    out += [("worker", g["groupName"], g) for g in cluster.get("workerGroupSpecs") or []]
    return out


def label_pod(node_type: str, cluster: str, group: str, template: dict[str, Any]) -> dict:
    """common/pod.go labelPod: KubeRay's labels, overridden by the template's except
    ray.io/node-type, ray.io/group and ray.io/cluster."""
    labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/cluster": cluster,
        "ray.io/node-type": node_type,
        "ray.io/group": group,
        "ray.io/identifier": f"{cluster}-{node_type}",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    fixed = {"ray.io/node-type", "ray.io/group", "ray.io/cluster"}
    labels.update(
        {k: v for k, v in template["metadata"].get("labels", {}).items() if k not in fixed}
    )
    return labels


def head_service_selector(cluster: str) -> dict[str, str]:
    """common/service.go BuildServiceForHeadPod(cluster, nil, nil) = HeadServiceLabels: the
    selector of the RayService's and the RayJob's head Services (BuildHeadServiceForRayService,
    common/job.go BuildHeadServiceForRayJob)."""
    return {
        "ray.io/cluster": cluster,
        "ray.io/node-type": "head",
        "ray.io/identifier": f"{cluster}-head",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }


@functools.cache
def _crd_version(kind: str) -> dict[str, Any]:
    """The v1 version of a KubeRay CRD (schema, subresources)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large
    crd = yaml.load((SCHEMAS / KUBERAY_KINDS[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # utils.RayContainerIndex


UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity(value: Any) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m, value
    number, unit = float(m.group(1)), m.group(2)
    return number / 1000 if unit == "m" else number * UNITS.get(unit, 1)


# --- utils/validation.go ------------------------------------------------------------------


def test_worker_group_idle_timeout_needs_autoscaler_v2(ci):
    """utils/validation.go validateWorkerGroupIdleTimeout, from ValidateRayClusterSpec, reached
    from ValidateRayServiceSpec and ValidateRayJobSpec: a worker group's idleTimeoutSeconds is
    refused unless autoscalerOptions.version is v2 (or RAY_enable_autoscaler_v2 on the head);
    autoscalerOptions.idleTimeoutSeconds works with v1 and v2 and must be >= 0."""
    _, docs = ci
    for owner, _, cluster in clusters(docs):
        options = cluster.get("autoscalerOptions") or {}
        head_env = {
            e["name"]: e.get("value") for e in ray_container(cluster["headGroupSpec"])["env"]
        }
        v2 = options.get("version") == "v2" or head_env.get("RAY_enable_autoscaler_v2") in {
            "1",
            "true",
        }
        for _, name, group in groups(cluster)[1:]:
            if "idleTimeoutSeconds" in group:
                assert group["idleTimeoutSeconds"] >= 0
                assert v2, (
                    f"{owner} {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled"
                )
        assert options.get("idleTimeoutSeconds", 0) >= 0
        if cluster["enableInTreeAutoscaling"]:
            assert "idleTimeoutSeconds" in options, owner  # the values' idle timeout is used


def test_cluster_spec_rules(ci):
    """utils/validation.go ValidateRayClusterSpec: containers, replica bounds, autoscaler env,
    token auth's Ray version, GCS fault tolerance settings, gated fields."""
    _, docs = ci
    for owner, _, cluster in clusters(docs):
        autoscaling = cluster["enableInTreeAutoscaling"]
        head = ray_container(cluster["headGroupSpec"])
        head_env = {e["name"] for e in head["env"]}
        for _, name, group in groups(cluster):
            assert group["template"]["spec"]["containers"], (owner, name)
            assert "resources" not in group and "labels" not in group  # no rayStartParams clash
        for _, name, group in groups(cluster)[1:]:
            if not autoscaling:
                assert "minReplicas" in group and "maxReplicas" in group, (owner, name)
            assert 0 <= group["minReplicas"] <= group["maxReplicas"], (owner, name)
            assert not group.get("suspend"), (owner, name)
        if not autoscaling:
            assert "RAY_enable_autoscaler_v2" not in head_env
        if cluster["authOptions"]["mode"] == "token":
            version = tuple(int(x) for x in cluster["rayVersion"].split(".")[:3])
            assert version >= (2, 52, 0), owner
        assert "redis-username" not in cluster["headGroupSpec"]["rayStartParams"]
        assert "REDIS_USERNAME" not in head_env
        if "gcsFaultToleranceOptions" in cluster:
            ft = cluster["gcsFaultToleranceOptions"]
            assert "redis-password" not in cluster["headGroupSpec"]["rayStartParams"]
            assert not head_env & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"}
            assert (
                ft.get("backend", "redis") == "redis" and "storage" not in ft
            )  # rocksdb: alpha gate
            assert ft["redisAddress"], owner
        else:
            assert "RAY_REDIS_ADDRESS" not in head_env
        # Alpha feature gates, off by default: the operator refuses these fields.
        assert not {"networkPolicy", "tlsOptions", "historyServerOptions"} & set(cluster)


def test_names_fit_kuberay_limits(ci):
    """utils/validation.go ValidateRayServiceMetadata, ValidateRayJobMetadata,
    ValidateRayCronJobSpec (utils/constant.go MaxRay*NameLength): DNS-1035 names within the
    limits, child RayJobs of the RayCronJob and of the fallback CronJob included."""
    _, docs = ci
    names = [(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in MAX_NAME]
    names += [("RayJob", name) for name, _, _ in rayjobs(docs)]
    assert names
    for kind, name in names:
        assert len(name) <= MAX_NAME[kind] and DNS1035.match(name), (kind, name)


def test_names_fit_with_a_long_release_name():
    """As above, for the longest names the chart can make (its full name is capped at 28)."""
    import helm_python

    values = merged(
        load_values(PRODUCTION),
        {"training": {"enabled": True, "data": "s3://b/d", "out": "s3://b/o"}},
    )
    for gate in (True, False):
        v = merged(values, {"nightly": {"rayCronJobFeatureGate": gate}})
        with helm_python.Chart.load(CHART) as chart:
            out = chart.render(values=v, name="a-very-long-release-name-for-x-rays", namespace="x")
        docs = [
            d
            for k, t in out.items()
            if not k.endswith("NOTES.txt")
            for d in yaml.safe_load_all(t)
            if d
        ]
        for kind, name in [
            (d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in MAX_NAME
        ] + [("RayJob", n) for n, _, _ in rayjobs(docs)]:
            assert len(name) <= MAX_NAME[kind] and DNS1035.match(name), (kind, name)


def _deletion_errors(spec: dict[str, Any]) -> list[str]:
    """utils/validation.go validateDeletionConfiguration and validateDeletionRules."""
    errors = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return errors
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    rules = strategy.get("deletionRules") or []
    if rules and shutdown:
        errors.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
    if rules and legacy:
        errors.append("legacy policies and deletionRules together")
    if not rules and not legacy:
        errors.append("deletionStrategy without rules")
    autoscaling = spec["rayClusterSpec"].get("enableInTreeAutoscaling", False)
    seen: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(rules):
        c = rule["condition"]
        if ("jobStatus" in c) == ("jobDeploymentStatus" in c):
            errors.append(f"rule {i}: exactly one of jobStatus and jobDeploymentStatus")
            continue
        if c.get("ttlSeconds", 0) < 0:
            errors.append(f"rule {i}: negative ttlSeconds")
        if autoscaling and rule["policy"] == "DeleteWorkers":
            errors.append(f"rule {i}: DeleteWorkers with autoscaling")
        key = (
            ("jobStatus", c["jobStatus"])
            if "jobStatus" in c
            else ("deploy", c["jobDeploymentStatus"])
        )
        policies = seen.setdefault(key, {})
        if rule["policy"] in policies:
            errors.append(f"rule {i}: duplicate {rule['policy']} for {key}")
        policies[rule["policy"]] = c.get("ttlSeconds", 0)
    for key, policies in seen.items():  # validateTTLConsistency: Workers <= Cluster <= Self
        ttls = [
            policies[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in policies
        ]
        if ttls != sorted(ttls):
            errors.append(f"{key}: TTLs must not decrease from Workers to Cluster to Self")
    return errors


def test_rayjob_spec_rules(ci):
    """utils/validation.go ValidateRayJobSpec (with validateDeletionConfiguration), and the
    submitter template KubeRay runs in K8sJobMode (common/job.go GetSubmitterTemplate)."""
    _, docs = ci
    for name, spec, _ in rayjobs(docs):
        assert _deletion_errors(spec) == [], name
        assert not spec.get("suspend") and "clusterSelector" not in spec
        assert spec["submissionMode"] == "K8sJobMode"
        assert spec.get("activeDeadlineSeconds", 1) > 0 and spec.get("backoffLimit", 0) >= 0
        yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        submitter = spec["submitterPodTemplate"]["spec"]
        assert submitter["restartPolicy"] == "Never"
        # KubeRay fills in `ray job submit` where none is set (rayjob_controller.go
        # configureSubmitterContainer): no command of our own, and
        # the head's image, as GetDefaultSubmitterContainer uses, against version mismatches.
        (container,) = submitter["containers"]
        assert "command" not in container and "args" not in container
        assert container["image"] == ray_container(spec["rayClusterSpec"]["headGroupSpec"])["image"]


def test_deletion_rules_checker_catches_what_kuberay_refuses():
    """The emulation of validateDeletionConfiguration refuses what KubeRay refuses."""
    (_, spec, _) = rayjobs(render(load_values(DEFAULT)))[0]
    assert _deletion_errors(spec) == []
    both = {**spec, "shutdownAfterJobFinishes": True}
    assert any("mutually exclusive" in e for e in _deletion_errors(both))
    rules = spec["deletionStrategy"]["deletionRules"]
    inverted = [
        {
            **r,
            "condition": {**r["condition"], "ttlSeconds": 0 if r["policy"] == "DeleteSelf" else 9},
        }
        for r in rules
    ]
    bad = {**spec, "deletionStrategy": {"deletionRules": inverted}}
    assert any("must not decrease" in e for e in _deletion_errors(bad))


def test_serve_port_is_named_serve(ci):
    """common/pod.go initLivenessAndReadinessProbe and common/service.go getServicePorts find
    the Serve port by name (utils/constant.go ServingPortName "serve", default 8000): every
    RayService pod declares it, with the Serve config's port."""
    _, docs = ci
    config = yaml.safe_load((CHART / "files" / "serve-config.yaml").read_text())
    port = config.get("http_options", {}).get("port", DEFAULT_SERVING_PORT)
    for owner, creator, cluster in clusters(docs):
        if creator != "RayService":
            continue
        for _, name, group in groups(cluster):
            ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
            assert ports.get(SERVING_PORT_NAME) == port, (owner, name)


# --- common/pod.go, common/service.go: what the controllers build ----------------------------


def test_kuberay_probes_are_not_replaced(ci):
    """common/pod.go BuildPod -> initLivenessAndReadinessProbe injects KubeRay's probes only
    where none is set: the raylet (and GCS on the head), and on RayService workers the local
    Serve proxy with failure threshold 1 (utils/constant.go ServeReadinessProbeFailureThreshold).
    A chart probe on the Ray container would replace them."""
    _, docs = ci
    for owner, _, cluster in clusters(docs):
        for _, name, group in groups(cluster):
            container = ray_container(group)
            assert "readinessProbe" not in container, (owner, name)
            assert "livenessProbe" not in container, (owner, name)


def test_object_store_fits_in_shm(ci):
    """common/pod.go BuildPod -> addEmptyDir: KubeRay mounts a memory-backed /dev/shm sized to
    the container's memory limit (makeEmptyDirVolume) unless one is mounted already; Ray's
    object store (object-store-memory, default 30 % of the memory) must fit in it, or Ray
    falls back to disk."""
    _, docs = ci
    for owner, _, cluster in clusters(docs):
        for _, name, group in groups(cluster):
            container = ray_container(group)
            limits = container.get("resources", {}).get("limits", {})
            memory = quantity(limits.get("memory") or container["resources"]["requests"]["memory"])
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            shm = mounted.get("/dev/shm", {}).get("emptyDir", {}).get("sizeLimit", memory)
            params = group["rayStartParams"]
            store = quantity(params.get("object-store-memory", 0.3 * memory))
            assert store <= quantity(shm), (owner, name, store, shm)


def test_head_services_select_the_head(ci):
    """common/service.go HeadServiceLabels / BuildServiceForHeadPod: the RayService's and the
    RayJob's head Services select KubeRay's labels (app.kubernetes.io/name=kuberay among them);
    common/pod.go labelPod lets a pod template override them, and then they select nothing."""
    _, docs = ci
    for owner, _, cluster in clusters(docs):
        name = "cluster-x"
        head = cluster["headGroupSpec"]
        labels = label_pod("head", name, "headgroup", head["template"])
        assert head_service_selector(name).items() <= labels.items(), owner


def test_pdbs_use_min_available_and_select_ray_pods(ci):
    """A PDB over pods whose controller (RayCluster) has no scale subresource (see its CRD:
    subresources status only) works only with an integer minAvailable (Kubernetes, "arbitrary
    controllers"); its selector must match the labels the pods get (common/pod.go labelPod),
    and a worker budget must leave a drain possible at the groups' minimum."""
    _, docs = ci
    if SCHEMAS.is_dir():
        assert "scale" not in _crd_version("RayCluster").get("subresources", {})
    services = by_kind(docs, "RayService")
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        spec = pdb["spec"]
        assert "maxUnavailable" not in spec and isinstance(spec["minAvailable"], int)
        (service,) = services
        cluster = service["spec"]["rayClusterConfig"]
        selected = []
        for node_type, name, group in groups(cluster):
            labels = label_pod(node_type, "c", name, group["template"])
            if spec["selector"]["matchLabels"].items() <= labels.items():
                selected.append((node_type, group))
        assert selected, pdb["metadata"]["name"]
        assert len({t for t, _ in selected}) == 1  # workers or the head, not both
        if selected[0][0] == "worker":
            assert spec["minAvailable"] < sum(g["minReplicas"] for _, g in selected)


def test_serve_head_has_a_pdb(ci):
    """Item 10: evicting the Serve head restarts the Serve cluster; a PDB guards it."""
    values, docs = ci
    if not by_kind(docs, "RayService"):
        return
    (service,) = by_kind(docs, "RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    labels = label_pod("head", "c", "headgroup", head)
    guarded = [
        p
        for p in by_kind(docs, "PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert [p["spec"]["minAvailable"] for p in guarded] == [1]


@needs_schemas
def test_gcs_fault_tolerance_offered_for_production():
    """Item 10 (utils/validation.go ValidateRayClusterSpec, validateGcsFaultToleranceBackend):
    the production values run the Serve cluster with GCS fault tolerance on Redis, its
    password from a Secret."""
    values = load_values(PRODUCTION)
    (service,) = by_kind(render(values), "RayService")
    ft = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    expected = values["serve"]["cluster"]["gcsFaultTolerance"]
    assert ft["redisAddress"] == expected["redisAddress"]
    assert ft["redisPassword"] == {"valueFrom": {"secretKeyRef": expected["redisPasswordSecret"]}}


def test_upgrade_strategy_is_explicit(ci):
    """Item 11, utils/validation.go ValidateRayServiceSpec: upgradeStrategy.type is one of
    NewCluster, None, NewClusterWithIncrementalUpgrade, set by the values."""
    _, docs = ci
    for service in by_kind(docs, "RayService"):
        strategy = service["spec"]["upgradeStrategy"]
        assert strategy["type"] in {"NewCluster", "None", "NewClusterWithIncrementalUpgrade"}


def test_incremental_upgrade_options():
    """utils/validation.go ValidateClusterUpgradeOptions: the incremental upgrade needs the
    autoscaler and complete options (the chart refuses it without autoscaling)."""
    import helm_python as helm

    incremental = {"serve": {"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}}}
    with pytest.raises(helm.HelmValuesError):  # gatewayClassName required
        render_files(merged(load_values(DEFAULT), incremental))
    gateway = {"clusterUpgradeOptions": {"gatewayClassName": "istio"}}
    values = merged(load_values(DEFAULT), incremental)
    values = merged(values, {"serve": {"upgradeStrategy": gateway}})
    (service,) = by_kind(render(values), "RayService")
    options = service["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert 0 <= options["stepSizePercent"] <= options["maxSurgePercent"] <= 100
    assert options["intervalSeconds"] > 0 and options["gatewayClassName"] == "istio"
    no_autoscaler = merged(values, {"serve": {"cluster": {"autoscaling": {"enabled": False}}}})
    with pytest.raises(helm.HelmError, match="ValidateClusterUpgradeOptions"):
        render_files(no_autoscaler)


# --- the nightly job ------------------------------------------------------------------------


def test_nightly_rayjobs_delete_their_cluster_then_themselves(ci):
    """Item 7, rayjob_controller.go handleDeletionRules: shutdownAfterJobFinishes +
    ttlSecondsAfterFinished delete only the cluster; the nightly RayJobs, one per night, also
    go (DeleteSelf, after the cluster); every RayJob's cluster goes when the job ends."""
    _, docs = ci
    for name, spec, nightly in rayjobs(docs):
        rules = spec["deletionStrategy"]["deletionRules"]
        by = {
            (
                r["policy"],
                r["condition"].get("jobStatus") or r["condition"].get("jobDeploymentStatus"),
            )
            for r in rules
        }
        ends = {"SUCCEEDED", "FAILED", "Failed"}
        assert {("DeleteCluster", s) for s in ends} <= by, name
        assert ({("DeleteSelf", s) for s in ends} <= by) == nightly, name


def test_fallback_cronjob_creates_one_rayjob_per_run(ci):
    """Item 9: the fallback CronJob's retries (backoffLimit) apply the same RayJob, named after
    the Job (one name per scheduled run), with server-side apply: no second RayJob."""
    _, docs = ci
    for cron in by_kind(docs, "CronJob"):
        (job,) = embedded_rayjobs(docs)
        assert "generateName" not in job["metadata"]
        assert job["metadata"]["name"] == "@JOB_NAME@"
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        env = {e["name"]: e for e in init["env"]}
        assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.labels['batch.kubernetes.io/job-name']"
        )
        assert "s/@JOB_NAME@/${JOB_NAME}/" in init["command"][-1]
        (apply,) = pod["containers"]
        assert apply["args"][:2] == ["apply", "--server-side"]
        (role,) = [
            r for r in by_kind(docs, "Role") if r["metadata"]["name"] == pod["serviceAccountName"]
        ]
        assert set(role["rules"][0]["verbs"]) == {"create", "get", "patch"}


def test_production_prefers_the_cronjob():
    """Item 8, raycronjob_controller.go Reconcile: no starting deadline, one RayJob per missed
    tick back to back after a suspension or operator downtime. Production uses the CronJob
    (startingDeadlineSeconds)."""
    docs = render(load_values(PRODUCTION))
    assert not by_kind(docs, "RayCronJob")
    (cron,) = by_kind(docs, "CronJob")
    assert cron["spec"]["startingDeadlineSeconds"] > 0
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_heads_take_no_work(ci):
    """Item 12: num-cpus 0 does not keep zero-CPU tasks off the head (common/pod.go
    generateRayStartCommand sets memory from the limit unless given): every head advertises
    no CPU and no memory resource (the scoring job's zero-CPU stages request memory:
    tests/test_score_job.py)."""
    _, docs = ci
    for owner, _, cluster in clusters(docs):
        params = cluster["headGroupSpec"]["rayStartParams"]
        assert params.get("num-cpus") == "0" and params.get("memory") == "0", owner


def test_disk_is_bounded(ci):
    """Item 13: every disk-backed emptyDir has a sizeLimit and every container of the release's
    pods requests ephemeral storage, so spilled objects and logs are accounted for."""
    _, docs = ci
    pods = []
    for owner, _, cluster in clusters(docs):
        pods += [(f"{owner} {n}", g["template"]["spec"]) for _, n, g in groups(cluster)]
        if cluster["enableInTreeAutoscaling"]:
            assert "ephemeral-storage" in cluster["autoscalerOptions"]["resources"]["requests"]
    pods += [
        (f"RayJob/{n} submitter", s["submitterPodTemplate"]["spec"]) for n, s, _ in rayjobs(docs)
    ]
    pods += [
        (c["metadata"]["name"], c["spec"]["jobTemplate"]["spec"]["template"]["spec"])
        for c in by_kind(docs, "CronJob")
    ]
    assert pods
    for where, pod in pods:
        for volume in pod.get("volumes", []):
            if "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory":
                assert "sizeLimit" in volume["emptyDir"], (where, volume["name"])
        for container in pod["containers"] + pod.get("initContainers", []):
            resources = container["resources"]
            assert "ephemeral-storage" in resources["requests"], (where, container["name"])
            assert "ephemeral-storage" in resources["limits"], (where, container["name"])


def test_conventions(ci):
    """Item 14: the PodMonitor scrapes the heads' autoscaler and dashboard metrics too (as
    KubeRay's config/prometheus podMonitor does); the API token only where the ingress
    replicas run (Serve workers); no dashboard-host (common/pod.go setMissingRayStartParams
    sets it)."""
    values, docs = ci
    for owner, creator, cluster in clusters(docs):
        assert "dashboard-host" not in cluster["headGroupSpec"]["rayStartParams"]
        head = ray_container(cluster["headGroupSpec"])
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert ports.get("as-metrics") == 44217 and ports.get("dash-metrics") == 44227, owner
        assert "COVIDRAY_API_TOKEN" not in {e["name"] for e in head["env"]}, owner
        if creator == "RayService" and values.get("serve", {}).get("apiTokenSecret", {}).get(
            "name"
        ):
            for _, _name, group in groups(cluster)[1:]:
                assert "COVIDRAY_API_TOKEN" in {e["name"] for e in ray_container(group)["env"]}
    for monitor in by_kind(docs, "PodMonitor"):
        endpoints = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
        assert {"metrics", "as-metrics", "dash-metrics"} <= endpoints


# --- the pseudonym key ----------------------------------------------------------------------


def test_pseudonym_key_only_from_its_secret(ci):
    """Item 6: COVIDRAY_PSEUDONYM_KEY from the Secret the values name reaches every Ray
    container (drivers, `covidray submit`'s included, run on the heads; tasks on the workers),
    never as a value in the rendered manifests, a runtime env or the entrypoints; the values
    cannot hold it (tests/test_helm.py: the schema refuses it)."""
    values, docs = ci
    secret = values.get("pseudonymKeySecret", {})
    if values.get("nightly", {}).get("enabled"):
        assert secret.get("name"), "the nightly job needs the pseudonym key"
    text = "\n".join(yaml.safe_dump(d) for d in docs)
    assert "COVIDRAY_PSEUDONYM_KEY=" not in text and "runtimeEnvYAML" not in text
    for name, spec, _ in rayjobs(docs):
        assert "PSEUDONYM" not in spec["entrypoint"], name
    for owner, _, cluster in clusters(docs):
        for _, name, group in groups(cluster):
            env = [e for e in ray_container(group)["env"] if e["name"] == "COVIDRAY_PSEUDONYM_KEY"]
            if not secret.get("name"):
                assert env == [], (owner, name)
                continue
            assert env == [
                {
                    "name": "COVIDRAY_PSEUDONYM_KEY",
                    "valueFrom": {
                        "secretKeyRef": {"name": secret["name"], "key": secret.get("key", "key")}
                    },
                }
            ], (owner, name)


# --- the CRDs' CEL rules ---------------------------------------------------------------------


def _crd_schema(kind: str) -> dict[str, Any]:
    return _crd_version(kind)["schema"]["openAPIV3Schema"]


@functools.cache
def _program(rule: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_errors(obj: dict[str, Any]) -> list[str]:
    """The x-kubernetes-validations of the object's CRD that fail on it: on create, and, for
    transition rules (oldSelf), on an unchanged re-apply."""
    import celpy

    errors: list[str] = []

    def walk(schema: dict[str, Any], value: Any, path: str) -> None:
        for check in schema.get("x-kubernetes-validations", []):
            cel_value = celpy.json_to_cel(value)
            result = _program(check["rule"]).evaluate({"self": cel_value, "oldSelf": cel_value})
            if result is not True and not (
                isinstance(result, celpy.celtypes.BoolType) and bool(result)
            ):
                errors.append(f"{path}: {check.get('message', check['rule'])}")
        if isinstance(value, dict):
            for key, sub in value.items():
                if key in schema.get("properties", {}):
                    walk(schema["properties"][key], sub, f"{path}/{key}")
                elif isinstance(schema.get("additionalProperties"), dict):
                    walk(schema["additionalProperties"], sub, f"{path}/{key}")
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, sub in enumerate(value):
                walk(schema["items"], sub, f"{path}/{i}")

    walk(_crd_schema(obj["kind"]), obj, "")
    return errors


def _kuberay_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in KUBERAY_KINDS] + embedded_rayjobs(docs)


@needs_schemas
def test_crd_cel_rules_hold(ci):
    """The CRDs' CEL rules (deletionStrategy and its conditions, managedBy, the GCS FT backend),
    as the API server evaluates them."""
    _, docs = ci
    objects = _kuberay_objects(docs)
    assert objects
    for obj in objects:
        assert cel_errors(obj) == [], obj["kind"]


@needs_schemas
def test_cel_rules_catch_a_broken_object():
    """The evaluation does reach nested rules: a condition with both statuses, a deletion
    strategy with legacy and rules, and a foreign managedBy fail."""
    (job,) = embedded_rayjobs(render(load_values(DEFAULT)))
    rules = job["spec"]["deletionStrategy"]["deletionRules"]
    rules[0]["condition"]["jobDeploymentStatus"] = "Failed"
    job["spec"]["deletionStrategy"]["onSuccess"] = {"policy": "DeleteCluster"}
    job["spec"]["managedBy"] = "someone-else"
    errors = cel_errors(job)
    assert any("cannot be used together within the same deletion condition" in e for e in errors)
    assert any("cannot be used together within the same deletionStrategy" in e for e in errors)
    assert any("managedBy field value" in e for e in errors)
