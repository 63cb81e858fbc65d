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

{{/* Labels every pod of the release carries; the NetworkPolicy and PodMonitor select them. */}}
{{- define "covidray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "covidray.name" . }}
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
Writable places on the read-only root filesystem. /tmp (Python's tempfile), /tmp/ray (Ray's
session directory; named ray-logs like KubeRay's own volume so that the autoscaler sidecar
shares it), HOME (not /home/ray: the image's Python lives in /home/ray/anaconda3), and a
memory-backed /dev/shm for Ray's object store. Argument: the shm size limit.
*/}}
{{- define "covidray.volumes" -}}
- name: tmp
  emptyDir: {}
- name: ray-logs
  emptyDir: {}
- name: home
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . | quote }}
{{- end -}}

{{- define "covidray.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: ray-logs
  mountPath: /tmp/ray
- name: home
  mountPath: {{ include "covidray.home" . }}
- name: dshm
  mountPath: /dev/shm
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
(label), type (head or worker), gpu (bool), serve (bool: Serve ports, API token, readiness on
/readyz for workers), sa (mount the service account token: the head's autoscaler needs it).
*/}}
{{- define "covidray.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
{{- $servePort := include "covidray.servePort" $root -}}
metadata:
  labels:
    {{- include "covidray.selectorLabels" $root | nindent 4 }}
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
    - name: {{ ternary "ray-head" "ray-worker" (eq .type "head") }}
      image: "{{ $root.Values.image.repository }}:{{ ternary $root.Values.image.gpuTag $root.Values.image.tag .gpu }}"
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      env:
        {{- include "covidray.env" $root | nindent 8 }}
        {{- if and .serve $root.Values.serve.apiTokenSecret.name }}
        - name: COVIDRAY_API_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $root.Values.serve.apiTokenSecret.name }}
              key: {{ $root.Values.serve.apiTokenSecret.key }}
        {{- end }}
      ports:
        {{- if eq .type "head" }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        {{- if .serve }}
        - {name: serve, containerPort: {{ $servePort }}}
        {{- end }}
        - {name: metrics, containerPort: 8080}
      {{- $res := deepCopy (default dict $g.resources) }}
      {{- if .gpu }}
      {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $g.gpus) (default dict $res.limits)) }}
      {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" $g.gpus) (default dict $res.requests)) }}
      {{- end }}
      {{- with $res }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if and .serve (eq .type "worker") }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: {{ $servePort }}
        {{- toYaml $root.Values.serve.readinessProbe | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "covidray.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        {{- include "covidray.volumeMounts" $root | nindent 8 }}
  volumes:
    {{- include "covidray.volumes" $g.shmSize | nindent 4 }}
{{- end -}}

{{/*
A RayCluster spec. Argument: dict root, cluster (values: autoscaling, head, cpuWorkers,
gpuWorkers), component (label prefix), serve (bool).
*/}}
{{- define "covidray.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $c := .cluster -}}
{{- $serve := .serve -}}
rayVersion: {{ $root.Values.rayVersion | quote }}
enableInTreeAutoscaling: {{ $c.autoscaling.enabled }}
{{- if $c.autoscaling.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ $c.autoscaling.idleTimeoutSeconds }}
  upscalingMode: Default
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
authOptions:
  mode: {{ ternary "token" "disabled" $root.Values.rayAuth.enabled }}
  {{- if and $root.Values.rayAuth.enabled $root.Values.rayAuth.secretName }}
  secretName: {{ $root.Values.rayAuth.secretName }}
  {{- end }}
headGroupSpec:
  rayStartParams:
    # No Serve replicas or training workers on the head.
    num-cpus: "0"
    dashboard-host: "0.0.0.0"
  template:
    {{- include "covidray.rayPodTemplate" (dict "root" $root "group" $c.head "component" (printf "%s-head" .component) "type" "head" "gpu" false "serve" $serve "sa" $c.autoscaling.enabled) | nindent 4 }}
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
    {{- if $c.autoscaling.enabled }}
    idleTimeoutSeconds: {{ $c.autoscaling.idleTimeoutSeconds }}
    {{- end }}
    rayStartParams: {}
    template:
      {{- include "covidray.rayPodTemplate" (dict "root" $root "group" $g "component" (printf "%s-worker" $.component) "type" "worker" "gpu" (eq $kind "gpu") "serve" $serve "sa" false) | nindent 6 }}
  {{- end }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
A RayJob spec: the job's own RayCluster, deleted when the job is done. Argument: dict root,
job (values: cluster, activeDeadlineSeconds, ttlSecondsAfterFinished), component, entrypoint.
*/}}
{{- define "covidray.rayJobSpec" -}}
{{- $root := .root -}}
{{- $job := .job -}}
entrypoint: {{ .entrypoint | quote }}
submissionMode: K8sJobMode
shutdownAfterJobFinishes: true
ttlSecondsAfterFinished: {{ $job.ttlSecondsAfterFinished }}
activeDeadlineSeconds: {{ $job.activeDeadlineSeconds }}
backoffLimit: 0
submitterPodTemplate:
  metadata:
    labels:
      {{- include "covidray.selectorLabels" $root | nindent 6 }}
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
          requests: {cpu: 200m, memory: 256Mi}
          limits: {cpu: "1", memory: 1Gi}
        securityContext:
          {{- include "covidray.containerSecurityContext" $root | nindent 10 }}
        volumeMounts:
          - name: tmp
            mountPath: /tmp
          - name: home
            mountPath: {{ include "covidray.home" $root }}
    volumes:
      - name: tmp
        emptyDir: {}
      - name: home
        emptyDir: {}
rayClusterSpec:
  {{- include "covidray.rayClusterSpec" (dict "root" $root "cluster" $job.cluster "component" .component "serve" false) | nindent 2 }}
{{- end -}}

{{/* The nightly entrypoint: `covidray score` through jobs/rescore.py. */}}
{{- define "covidray.nightlyEntrypoint" -}}
{{- $n := .Values.nightly -}}
{{- $args := list "--model" (default .Values.model.uri $n.model) "--data" $n.data "--out" $n.out -}}
{{- $words := list "python" "/app/jobs/rescore.py" -}}
{{- range (concat $args $n.extraArgs) }}{{ $words = append $words (include "covidray.shquote" .) }}{{ end -}}
{{- join " " $words -}}
{{- end -}}

{{/* A training entrypoint. Argument: dict script (under /app/jobs), job (data, out, extraArgs). */}}
{{- define "covidray.trainEntrypoint" -}}
{{- $words := list "python" (printf "/app/jobs/%s" .script) -}}
{{- range (concat (list "--data" .job.data "--out" .job.out) .job.extraArgs) }}{{ $words = append $words (include "covidray.shquote" .) }}{{ end -}}
{{- join " " $words -}}
{{- end -}}
