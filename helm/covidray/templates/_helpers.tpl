{{/* vim: set filetype=mustache: */}}
{{/*
Names. The full name is capped at 28 characters: KubeRay caps RayService and RayJob names at
47 and RayCronJob names at 36, and this chart appends "-nightly", "-train" and "-gan".
*/}}
{{- define "covidray.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "covidray.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 28 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 28 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 28 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "covidray.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "covidray.labels" -}}
helm.sh/chart: {{ include "covidray.chart" . }}
{{ include "covidray.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of the release's objects (not of its pods: see covidray.podLabels). */}}
{{- define "covidray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "covidray.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Labels every pod of the release carries; the NetworkPolicy, PodMonitor and PDBs select them.
Not app.kubernetes.io/name: KubeRay labels Ray pods app.kubernetes.io/name=kuberay and its
RayService and RayJob head Services select that value (common/pod.go labelPod,
common/service.go HeadServiceLabels); a pod template that overrides it leaves them empty.
*/}}
{{- define "covidray.podLabels" -}}
app.kubernetes.io/part-of: {{ include "covidray.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "covidray.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "covidray.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A shell word (Ray job entrypoints are shell commands): single-quoted unless plain. */}}
{{- define "covidray.shquote" -}}
{{- $s := toString . -}}
{{- if regexMatch "^[A-Za-z0-9_./:=@%+,-]+$" $s -}}
{{- $s -}}
{{- else -}}
{{- printf "'%s'" (replace "'" "'\"'\"'" $s) -}}
{{- end -}}
{{- end -}}

{{/*
Pod and container security: the image's non-root user (ray, uid 1000, group users 100), no
privilege escalation, no capabilities, RuntimeDefault seccomp, a read-only root filesystem
with the writable emptyDirs of "covidray.volumes".
*/}}
{{- define "covidray.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "covidray.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Writable places on the read-only root filesystem, each with a size limit: /tmp (Python's
tempfile), /tmp/ray (Ray's session directory: logs and spilled objects; named ray-logs like
KubeRay's own volume so that the autoscaler sidecar shares it) and HOME (not /home/ray: the
image's Python lives in /home/ray/anaconda3). No /dev/shm: KubeRay mounts a memory-backed
one sized to the container's memory limit (common/pod.go BuildPod), above Ray's object store
(30 % of memory); a smaller one would push the object store to disk. Argument: dict root,
group (ephemeralStorage: the Ray session directory's limit).
*/}}
{{- define "covidray.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.storage.tmpSizeLimit | quote }}
- name: ray-logs
  emptyDir:
    sizeLimit: {{ .group.ephemeralStorage | quote }}
- name: home
  emptyDir:
    sizeLimit: {{ .root.Values.storage.homeSizeLimit | quote }}
{{- end -}}

{{- define "covidray.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: ray-logs
  mountPath: /tmp/ray
- name: home
  mountPath: {{ include "covidray.home" . }}
{{- end -}}

{{- define "covidray.home" -}}
/opt/covidray/home
{{- end -}}

{{/* Environment of every covidray container: HOME, matplotlib, Ray's auth mode, S3. */}}
{{- define "covidray.env" -}}
- name: HOME
  value: {{ include "covidray.home" . }}
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: RAY_AUTH_MODE
  value: {{ ternary "token" "disabled" .Values.rayAuth.enabled }}
{{- include "covidray.s3Env" . }}
{{- end -}}

{{/*
The site's pseudonym key (COVIDRAY_PSEUDONYM_KEY), only from an existing Secret: never in
values, in the rendered manifests or in a Ray runtime env.
*/}}
{{- define "covidray.pseudonymKeyEnv" -}}
{{- with .Values.pseudonymKeySecret }}
{{- if .name }}
- name: COVIDRAY_PSEUDONYM_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The PACS archive's credentials (jobs/nightly.py reads them from the environment only): HTTP
basic (keys username + password) or a bearer token (key token) of one existing Secret; each
key optional, so the Secret holds either form.
*/}}
{{- define "covidray.pacsEnv" -}}
{{- with .Values.nightly.pacs.credentialsSecret }}
{{- range $env, $key := dict "COVIDRAY_DICOMWEB_USER" "username" "COVIDRAY_DICOMWEB_PASSWORD" "password" "COVIDRAY_DICOMWEB_TOKEN" "token" }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.nightly.pacs.credentialsSecret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end }}
{{- end -}}

{{/* Where the PACS CA bundle is mounted, and the file passed as --ca-bundle. */}}
{{- define "covidray.pacsCaDir" -}}
/etc/covidray/pacs-ca
{{- end -}}

{{- define "covidray.pacsCaVolume" -}}
{{- with .Values.nightly.pacs.caBundle }}
{{- if .configMap }}
- name: pacs-ca
  configMap:
    name: {{ .configMap }}
    items: [{key: {{ .key }}, path: {{ .key }}}]
{{- else if .secret }}
- name: pacs-ca
  secret:
    secretName: {{ .secret }}
    items: [{key: {{ .key }}, path: {{ .key }}}]
{{- end }}
{{- end }}
{{- end -}}

{{/* S3 settings: endpoint and region as values, keys only from an existing Secret. */}}
{{- define "covidray.s3Env" -}}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.credentialsSecret }}
{{- if .name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The Serve config (serveConfigV2): the chart's copy of serving/config.yaml with the
application args overridden from values (model.uri always; serve.app.* unless null).
*/}}
{{- define "covidray.serveConfig" -}}
{{- $cfg := .Files.Get "files/serve-config.yaml" | fromYaml -}}
{{- if or (not $cfg) (hasKey $cfg "Error") -}}
{{- fail "files/serve-config.yaml is missing or invalid: run python scripts/sync_serve_config.py" -}}
{{- end -}}
{{- $overrides := dict "model" .Values.model.uri -}}
{{- $names := dict "maxBatchSize" "max_batch_size" "batchWaitTimeoutS" "batch_wait_timeout_s" "minReplicas" "min_replicas" "maxReplicas" "max_replicas" "targetOngoingRequests" "target_ongoing_requests" "maxQueuedRequests" "max_queued_requests" "numCpus" "num_cpus" "numGpus" "num_gpus" "maxBodyBytes" "max_body_bytes" -}}
{{- range $key, $arg := $names -}}
{{- $value := index $.Values.serve.app $key -}}
{{- if not (kindIs "invalid" $value) -}}
{{- $_ := set $overrides $arg $value -}}
{{- end -}}
{{- end -}}
{{- $apps := list -}}
{{- range $cfg.applications -}}
{{- $app := deepCopy . -}}
{{- $_ := set $app "args" (merge (deepCopy $overrides) (default dict $app.args)) -}}
{{- $apps = append $apps $app -}}
{{- end -}}
{{- $_ := set $cfg "applications" $apps -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The Serve HTTP port (http_options.port of the Serve config). */}}
{{- define "covidray.servePort" -}}
{{- $cfg := .Files.Get "files/serve-config.yaml" | fromYaml -}}
{{- int64 (dig "http_options" "port" 8000 $cfg) -}}
{{- end -}}

{{/* The endpoint's body limit in bytes (max_body_bytes of the first application). */}}
{{- define "covidray.maxBodyBytes" -}}
{{- $cfg := include "covidray.serveConfig" . | fromYaml -}}
{{- $app := first $cfg.applications -}}
{{- int64 $app.args.max_body_bytes -}}
{{- end -}}

{{/*
A Ray pod template. Argument: dict root, group (head or worker group values), component
(label), type (head or worker), gpu (bool), serve (bool: the Serve port; the API token on
workers, where the ingress replicas run), sa (mount the service account token: the head's
autoscaler needs it), pacs (bool: the nightly PACS pull's credentials and CA bundle).
No readiness or liveness probe: KubeRay injects its own when none is set (the raylet, the
GCS on the head, the local Serve proxy on RayService workers with failure threshold 1:
common/pod.go initLivenessAndReadinessProbe); /readyz is for monitoring.
*/}}
{{- define "covidray.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
{{- $servePort := include "covidray.servePort" $root -}}
{{- $head := eq .type "head" -}}
metadata:
  labels:
    {{- include "covidray.podLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  serviceAccountName: {{ include "covidray.serviceAccountName" $root }}
  automountServiceAccountToken: {{ .sa }}
  securityContext:
    {{- include "covidray.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" $head }}
      image: "{{ $root.Values.image.repository }}:{{ ternary $root.Values.image.gpuTag $root.Values.image.tag .gpu }}"
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      env:
        {{- include "covidray.env" $root | nindent 8 }}
        {{- /* Every Ray container may read or write data: job drivers (the nightly job's,
        `covidray submit`'s) run on the head, their tasks on the workers. */}}
        {{- include "covidray.pseudonymKeyEnv" $root | nindent 8 }}
        {{- if .pacs }}
        {{- include "covidray.pacsEnv" $root | nindent 8 }}
        {{- end }}
        {{- if and .serve (not $head) $root.Values.serve.apiTokenSecret.name }}
        - name: COVIDRAY_API_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $root.Values.serve.apiTokenSecret.name }}
              key: {{ $root.Values.serve.apiTokenSecret.key }}
        {{- end }}
      ports:
        {{- if $head }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        # The autoscaler's and the dashboard's own metrics (KubeRay's reference PodMonitor).
        - {name: as-metrics, containerPort: 44217}
        - {name: dash-metrics, containerPort: 44227}
        {{- end }}
        {{- if .serve }}
        - {name: serve, containerPort: {{ $servePort }}}
        {{- end }}
        - {name: metrics, containerPort: 8080}
      {{- $res := deepCopy (default dict $g.resources) }}
      {{- $extra := dict "ephemeral-storage" $g.ephemeralStorage }}
      {{- if .gpu }}
      {{- $_ := set $extra "nvidia.com/gpu" $g.gpus }}
      {{- end }}
      {{- $_ := set $res "limits" (merge (deepCopy $extra) (default dict $res.limits)) }}
      {{- $_ := set $res "requests" (merge (deepCopy $extra) (default dict $res.requests)) }}
      resources:
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- include "covidray.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        {{- include "covidray.volumeMounts" $root | nindent 8 }}
        {{- if and .pacs (include "covidray.pacsCaVolume" $root) }}
        - name: pacs-ca
          mountPath: {{ include "covidray.pacsCaDir" $root }}
          readOnly: true
        {{- end }}
  volumes:
    {{- include "covidray.volumes" (dict "root" $root "group" $g) | nindent 4 }}
    {{- if .pacs }}
    {{- include "covidray.pacsCaVolume" $root | nindent 4 }}
    {{- end }}
{{- end -}}

{{/*
A RayCluster spec. Argument: dict root, cluster (values: autoscaling, head, cpuWorkers,
gpuWorkers, and for the RayService gcsFaultTolerance), component (label prefix), serve
(bool), pacs (bool).
*/}}
{{- define "covidray.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $c := .cluster -}}
{{- $serve := .serve -}}
{{- $pacs := default false .pacs -}}
rayVersion: {{ $root.Values.rayVersion | quote }}
enableInTreeAutoscaling: {{ $c.autoscaling.enabled }}
{{- if $c.autoscaling.enabled }}
autoscalerOptions:
  # Valid with autoscaler v1 and v2 (a worker group's idleTimeoutSeconds needs v2:
  # utils/validation.go validateWorkerGroupIdleTimeout).
  idleTimeoutSeconds: {{ $c.autoscaling.idleTimeoutSeconds }}
  upscalingMode: Default
  resources:
    requests: {cpu: 200m, memory: 512Mi, ephemeral-storage: 256Mi}
    limits: {cpu: 500m, memory: 512Mi, ephemeral-storage: 1Gi}
  env:
    - name: HOME
      value: {{ include "covidray.home" $root }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: home
      mountPath: {{ include "covidray.home" $root }}
  securityContext:
    {{- include "covidray.containerSecurityContext" $root | nindent 4 }}
{{- end }}
{{- with $c.gcsFaultTolerance }}
{{- if .enabled }}
gcsFaultToleranceOptions:
  redisAddress: {{ .redisAddress | quote }}
  {{- if .redisPasswordSecret.name }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ .redisPasswordSecret.name }}
        key: {{ .redisPasswordSecret.key }}
  {{- end }}
  {{- with .externalStorageNamespace }}
  externalStorageNamespace: {{ . | quote }}
  {{- end }}
{{- end }}
{{- end }}
authOptions:
  mode: {{ ternary "token" "disabled" $root.Values.rayAuth.enabled }}
  {{- if and $root.Values.rayAuth.enabled $root.Values.rayAuth.secretName }}
  secretName: {{ $root.Values.rayAuth.secretName }}
  {{- end }}
headGroupSpec:
  rayStartParams:
    # Nothing of the workload on the head: no CPU (Serve replicas, training workers) and no
    # "memory" resource, so that zero-CPU tasks that request memory (the scoring job's reads
    # and writes) stay on the workers. KubeRay sets dashboard-host itself.
    num-cpus: "0"
    memory: "0"
  template:
    {{- include "covidray.rayPodTemplate" (dict "root" $root "group" $c.head "component" (printf "%s-head" .component) "type" "head" "gpu" false "serve" $serve "sa" $c.autoscaling.enabled "pacs" $pacs) | nindent 4 }}
{{- if not (or $c.cpuWorkers.enabled $c.gpuWorkers.enabled) }}
workerGroupSpecs: []
{{- else }}
workerGroupSpecs:
  {{- range $kind := list "cpu" "gpu" }}
  {{- $g := index $c (printf "%sWorkers" $kind) }}
  {{- if $g.enabled }}
  {{- if or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
  {{- fail (printf "%s %sWorkers: need minReplicas <= replicas <= maxReplicas" $.component $kind) }}
  {{- end }}
  - groupName: {{ $kind }}
    replicas: {{ $g.replicas }}
    minReplicas: {{ $g.minReplicas }}
    maxReplicas: {{ $g.maxReplicas }}
    rayStartParams: {}
    template:
      {{- include "covidray.rayPodTemplate" (dict "root" $root "group" $g "component" (printf "%s-worker" $.component) "type" "worker" "gpu" (eq $kind "gpu") "serve" $serve "sa" false "pacs" $pacs) | nindent 6 }}
  {{- end }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
A RayJob spec: the job's own RayCluster, deleted by deletionRules ttlSecondsAfterFinished
after the job succeeds or fails (utils/validation.go validateDeletionConfiguration: rules
exclude shutdownAfterJobFinishes; beta gate RayJobDeletionPolicy, on by default in 1.7), and
the RayJob itself deleteAfterSeconds later when set (the nightly runs; not the Helm-owned
one-off RayJobs, which the next upgrade would re-create and re-run). Argument: dict root, job
(values: cluster, activeDeadlineSeconds, ttlSecondsAfterFinished, deleteAfterSeconds),
component, entrypoint, pacs (bool).
*/}}
{{- define "covidray.rayJobSpec" -}}
{{- $root := .root -}}
{{- $job := .job -}}
entrypoint: {{ .entrypoint | quote }}
submissionMode: K8sJobMode
activeDeadlineSeconds: {{ $job.activeDeadlineSeconds }}
backoffLimit: 0
deletionStrategy:
  deletionRules:
    {{- $policies := list (list "DeleteCluster" $job.ttlSecondsAfterFinished) }}
    {{- if $job.deleteAfterSeconds }}
    {{- if lt (int $job.deleteAfterSeconds) (int $job.ttlSecondsAfterFinished) }}
    {{- fail (printf "%s: deleteAfterSeconds must be >= ttlSecondsAfterFinished (the RayJob goes after its cluster)" .component) }}
    {{- end }}
    {{- $policies = append $policies (list "DeleteSelf" $job.deleteAfterSeconds) }}
    {{- end }}
    {{- range $policies }}
    {{- $policy := index . 0 }}
    {{- $ttl := index . 1 }}
    {{- range $status := list "SUCCEEDED" "FAILED" }}
    - policy: {{ $policy }}
      condition: {jobStatus: {{ $status }}, ttlSeconds: {{ $ttl }}}
    {{- end }}
    # The job never ran to an end (deadline, submitter failure).
    - policy: {{ $policy }}
      condition: {jobDeploymentStatus: Failed, ttlSeconds: {{ $ttl }}}
    {{- end }}
submitterPodTemplate:
  metadata:
    labels:
      {{- include "covidray.podLabels" $root | nindent 6 }}
      app.kubernetes.io/component: {{ .component }}-submitter
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "covidray.serviceAccountName" $root }}
    automountServiceAccountToken: false
    securityContext:
      {{- include "covidray.podSecurityContext" $root | nindent 6 }}
    {{- with $root.Values.image.pullSecrets }}
    imagePullSecrets:
      {{- range . }}
      - name: {{ . }}
      {{- end }}
    {{- end }}
    containers:
      - name: ray-job-submitter
        image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
        imagePullPolicy: {{ $root.Values.image.pullPolicy }}
        env:
          - name: HOME
            value: {{ include "covidray.home" $root }}
          - name: RAY_AUTH_MODE
            value: {{ ternary "token" "disabled" $root.Values.rayAuth.enabled }}
        resources:
          requests: {cpu: 200m, memory: 256Mi, ephemeral-storage: 128Mi}
          limits: {cpu: "1", memory: 1Gi, ephemeral-storage: 512Mi}
        securityContext:
          {{- include "covidray.containerSecurityContext" $root | nindent 10 }}
        volumeMounts:
          - name: tmp
            mountPath: /tmp
          - name: home
            mountPath: {{ include "covidray.home" $root }}
    volumes:
      - name: tmp
        emptyDir: {sizeLimit: 256Mi}
      - name: home
        emptyDir: {sizeLimit: 64Mi}
rayClusterSpec:
  {{- include "covidray.rayClusterSpec" (dict "root" $root "cluster" $job.cluster "component" .component "serve" false "pacs" .pacs) | nindent 2 }}
{{- end -}}

{{/*
The nightly entrypoint: `covidray score` through jobs/rescore.py, or, with nightly.pacs.source,
the PACS pull + score + publish of jobs/nightly.py (`covidray nightly`) growing nightly.data.
*/}}
{{- define "covidray.nightlyEntrypoint" -}}
{{- $n := .Values.nightly -}}
{{- $p := $n.pacs -}}
{{- $model := default .Values.model.uri $n.model -}}
{{- $words := list "python" "/app/jobs/rescore.py" -}}
{{- $args := list "--model" $model "--data" $n.data "--out" $n.out -}}
{{- if $p.source -}}
{{- $words = list "python" "/app/jobs/nightly.py" -}}
{{- $args = list "--source" $p.source -}}
{{- with $p.destination }}{{ $args = concat $args (list "--to" .) }}{{ end -}}
{{- $args = concat $args (list "--data" $n.data "--links" $p.links "--model" $model "--out" $n.out) -}}
{{- range $p.modalities }}{{ $args = concat $args (list "--modality" .) }}{{ end -}}
{{- if include "covidray.pacsCaVolume" . -}}
{{- $args = concat $args (list "--ca-bundle" (printf "%s/%s" (include "covidray.pacsCaDir" .) $p.caBundle.key)) -}}
{{- end -}}
{{- end -}}
{{- range (concat $args $n.extraArgs) }}{{ $words = append $words (include "covidray.shquote" .) }}{{ end -}}
{{- join " " $words -}}
{{- end -}}

{{/* A training entrypoint. Argument: dict script (under /app/jobs), job (data, out, extraArgs). */}}
{{- define "covidray.trainEntrypoint" -}}
{{- $words := list "python" (printf "/app/jobs/%s" .script) -}}
{{- range (concat (list "--data" .job.data "--out" .job.out) .job.extraArgs) }}{{ $words = append $words (include "covidray.shquote" .) }}{{ end -}}
{{- join " " $words -}}
{{- end -}}

{{/* Resources, security and mounts of the fallback CronJob's containers. */}}
{{- define "covidray.creatorContainer" -}}
resources:
  requests: {cpu: 50m, memory: 64Mi, ephemeral-storage: 16Mi}
  limits: {cpu: 200m, memory: 128Mi, ephemeral-storage: 64Mi}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
volumeMounts:
  - name: rayjob
    mountPath: /etc/covidray
    readOnly: true
  - name: tmp
    mountPath: /tmp
  - name: work
    mountPath: /work
{{- end -}}
