{{/* Names and labels shared by every template. */}}

{{- define "vramgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-vramgate, or the release name alone when it already contains the chart name. */}}
{{- define "vramgate.fullname" -}}
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

{{- define "vramgate.headlessName" -}}
{{- printf "%s-headless" (include "vramgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vramgate.routerName" -}}
{{- printf "%s-router" (include "vramgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vramgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "vramgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vramgate
{{- end }}

{{/* The gateway pods: what the StatefulSet, both Services and the anti-affinity select. */}}
{{- define "vramgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vramgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "vramgate.routerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "vramgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: router
{{- end }}

{{/* The Secret the gateway reads its keys from; empty when there is none. */}}
{{- define "vramgate.secretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if or .Values.auth.apiKeys .Values.auth.adminKey .Values.auth.hfToken }}
{{- include "vramgate.fullname" . }}
{{- end }}
{{- end }}

{{/* The key of each value in that Secret. */}}
{{- define "vramgate.secretKeys" -}}
{{- if .Values.auth.existingSecret }}
{{- toJson .Values.auth.existingSecretKeys }}
{{- else }}
{{- toJson (dict "apiKeys" "api-keys" "adminKey" "admin-key" "hfToken" "hf-token") }}
{{- end }}
{{- end }}

{{/* Every gateway pod's URL (its own name under the headless Service, the container's port 8000),
one a line: a router's static workers. */}}
{{- define "vramgate.workerUrls" -}}
{{- $fullname := include "vramgate.fullname" . }}
{{- $headless := include "vramgate.headlessName" . }}
{{- range $i := until (int .Values.replicas) }}
{{ printf "http://%s-%d.%s.%s.svc.%s:8000" $fullname $i $headless $.Release.Namespace $.Values.clusterDomain }}
{{- end }}
{{- end }}
