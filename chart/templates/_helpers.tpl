{{/* Chart name, shortened to fit a label value. */}}
{{- define "dkron-ha.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the namespaced objects: the release name, with the chart name in front unless the
release name already contains it. 63 characters at most (it becomes a Service name).
*/}}
{{- define "dkron-ha.fullname" -}}
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

{{- define "dkron-ha.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dkron-ha.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dkron-ha.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dkron-ha.labels" -}}
helm.sh/chart: {{ include "dkron-ha.chart" . }}
{{ include "dkron-ha.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "dkron-ha.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dkron-ha.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from a dict of repository, tag and digest: REPOSITORY@DIGEST when a digest
is given (it wins over the tag), REPOSITORY:TAG otherwise.
*/}}
{{- define "dkron-ha.imageReference" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/* The dkron-ha image: `image`, its tag defaulting to the chart's appVersion. */}}
{{- define "dkron-ha.image" -}}
{{- include "dkron-ha.imageReference" (dict "repository" .Values.image.repository "tag" (default .Chart.AppVersion .Values.image.tag) "digest" .Values.image.digest) }}
{{- end }}

{{/*
What the webhook injects into Dkron pods: `injectImage`, following `image` where it is empty.
Its repository defaults to image's; its version is its own tag or digest if it gives either,
otherwise image's (so an image.digest never overrides an injectImage.tag).
*/}}
{{- define "dkron-ha.injectImage" -}}
{{- $repository := default .Values.image.repository .Values.injectImage.repository }}
{{- if or .Values.injectImage.tag .Values.injectImage.digest }}
{{- include "dkron-ha.imageReference" (dict "repository" $repository "tag" .Values.injectImage.tag "digest" .Values.injectImage.digest) }}
{{- else }}
{{- include "dkron-ha.imageReference" (dict "repository" $repository "tag" (default .Chart.AppVersion .Values.image.tag) "digest" .Values.image.digest) }}
{{- end }}
{{- end }}

{{- define "dkron-ha.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "dkron-ha.fullname" .)) .Values.certs.secretName }}
{{- end }}

{{- define "dkron-ha.fleetlockConfigMapName" -}}
{{- printf "%s-fleetlock" (include "dkron-ha.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* DNS names the API server uses for the webhook Service; the serving certificate holds all. */}}
{{- define "dkron-ha.serviceDNSNames" -}}
{{- $service := include "dkron-ha.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.%s" $service $ns .Values.clusterDomain) | toJson }}
{{- end }}
