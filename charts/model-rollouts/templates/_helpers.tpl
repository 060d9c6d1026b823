{{/* Chart name. */}}
{{- define "model-rollouts.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, with the chart name unless the release name contains it. */}}
{{- define "model-rollouts.fullname" -}}
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

{{- define "model-rollouts.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "model-rollouts.selectorLabels" -}}
app.kubernetes.io/name: {{ include "model-rollouts.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "model-rollouts.labels" -}}
helm.sh/chart: {{ include "model-rollouts.chart" . }}
{{ include "model-rollouts.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: model-rollouts
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "model-rollouts.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "model-rollouts.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "model-rollouts.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The namespaces watched in namespaced mode (the release namespace when none is listed). */}}
{{- define "model-rollouts.watchedNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- toJson (uniq .Values.watch.namespaces) }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{- define "model-rollouts.validate" -}}
{{- if and .Values.watch.clusterWide .Values.watch.namespaces }}
{{- fail "watch.namespaces is only used with watch.clusterWide=false" }}
{{- end }}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicas > 1 needs leaderElection.enabled=true (two active operators would both write weights)" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not (and .Values.metrics.enabled .Values.metrics.service.enabled)) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled and metrics.service.enabled" }}
{{- end }}
{{- end }}

{{/*
What the operator does in each watched namespace: its own resources and their status, HTTPRoute
and Istio VirtualService weights (get and patch only; only on routes that opt in with the mlrollouts.io/managed-by annotation: RBAC cannot grant
by annotation, so the operator checks it before every write), Events, candidate readiness
(Services; EndpointSlices, watched), the namespace's MetricTemplates, and the ConfigMaps that archive each
object's analyses (create and patch only: the operator never reads them; they carry an
ownerReference to their object and the label mlrollouts.io/series-of). No Secrets: those are read only in
the release namespace (model-rollouts.secretsRole). Shared by the ClusterRole (cluster-wide mode)
and each Role (namespaced mode).
*/}}
{{- define "model-rollouts.namespacedRules" -}}
- apiGroups: [mlrollouts.io]
  resources: [modelrollouts, modelexperiments]
  verbs: [get, list, watch, patch, update]
- apiGroups: [mlrollouts.io]
  resources: [modelrollouts/status, modelexperiments/status]
  verbs: [get, patch, update]
- apiGroups: [mlrollouts.io]
  resources: [metrictemplates]
  verbs: [get, list, watch]
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes]
  verbs: [get, list, watch, patch]
- apiGroups: [networking.istio.io]
  resources: [virtualservices]
  verbs: [get, patch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, patch]
{{- end }}

{{/* The platform's cluster-scoped metric and notification kinds, read only. */}}
{{- define "model-rollouts.clusterMetricRules" -}}
- apiGroups: [mlrollouts.io]
  resources: [clustermetricproviders, clustermetrictemplates, clusternotificationproviders]
  verbs: [get, list, watch]
{{- end }}
