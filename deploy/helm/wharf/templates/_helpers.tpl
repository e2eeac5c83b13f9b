{{/* Chart name, truncated to the 63 characters Kubernetes allows in names and labels. */}}
{{- define "wharf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name, or release-chart when the release name does not contain the chart's. */}}
{{- define "wharf.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels that select wharf's pods (the Service, the PodDisruptionBudget and the DaemonSet use them). */}}
{{- define "wharf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wharf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mirror
{{- end }}

{{/* Labels on every object. */}}
{{- define "wharf.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "wharf.selectorLabels" . }}
app.kubernetes.io/part-of: wharf
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "wharf.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "wharf.priorityClassName" -}}
{{- .Values.priorityClass.name }}
{{- end }}

{{/* wharf.toml. Strings go through toJson: a JSON string is a valid TOML basic string. */}}
{{- define "wharf.config" -}}
# wharf's configuration, rendered from the chart's values; config/wharf.toml documents every key.
listen = {{ printf "%s:%d" .Values.listenAddress (int .Values.port) | toJson }}
data_dir = "/var/lib/wharf"
log_format = {{ .Values.logFormat | toJson }}
tag_ttl = {{ int .Values.tagTTL }}
default_registry = {{ .Values.defaultRegistry | toJson }}
shutdown_grace = {{ int .Values.shutdownGrace }}
{{- if .Values.credentials.existingSecret }}
credentials_file = "/etc/wharf/credentials/config.json"
{{- end }}
{{- if ne .Values.access.privateAnswer "deny" }}

[access]
private_answer = {{ .Values.access.privateAnswer | toJson }}
{{- end }}

[cache]
max_bytes = {{ int64 .Values.cache.maxBytes }}
high_watermark = {{ int .Values.cache.highWatermark }}
low_watermark = {{ int .Values.cache.lowWatermark }}
min_age = {{ int64 .Values.cache.minAge }}
max_idle_age = {{ int64 .Values.cache.maxIdleAge }}
gc_interval = {{ int64 .Values.cache.gcInterval }}

[warm]
interval = {{ int64 .Values.warm.interval }}
{{- if .Values.runtime.enabled }}
# The node's runtime, through the socket's directory mounted at the same path (runtime.socket).
runtime_endpoint = {{ printf "unix://%s" .Values.runtime.socket | toJson }}
{{- end }}
{{- range .Values.warm.images }}

[[warm.images]]
image = {{ .image | toJson }}
{{- with .platforms }}
platforms = {{ toJson . }}
{{- end }}
{{- if .intoRuntime }}
into_runtime = true
{{- end }}
{{- if .pinInRuntime }}
pin_in_runtime = true
{{- end }}
{{- end }}
{{- with .Values.bucket }}
{{- if .enabled }}

# The shared bucket. No keys here: credentials come from the environment (bucket.credentialsSecret) or the
# standard AWS chain (IRSA, Pod Identity, instance profile).
[storage.s3]
bucket = {{ .name | toJson }}
prefix = {{ .prefix | toJson }}
endpoint = {{ .endpoint | toJson }}
region = {{ .region | toJson }}
allow_http = {{ .allowHttp }}
breaker_seconds = {{ int64 .breakerSeconds }}
{{- end }}
{{- end }}
{{- range $name, $reg := .Values.registries }}

[registries.{{ $name | toJson }}]
url = {{ $reg.url | toJson }}
{{- if $reg.insecure }}
insecure = true
{{- end }}
{{- end }}
{{- with .Values.extraConfig }}

{{ . }}
{{- end }}
{{- end }}
