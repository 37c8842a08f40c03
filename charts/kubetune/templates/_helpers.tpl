{{/* Names and labels shared by every object of the chart. */}}

{{- define "kubetune.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; a release called "kubetune" is not repeated ("kubetune", not "kubetune-kubetune"). */}}
{{- define "kubetune.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: the digest pins it when set, else the tag,
else the chart's appVersion. Call with (dict "image" .Values.x.image "default" $fallback "chart" .Chart).
*/}}
{{- define "kubetune.image" -}}
{{- $repository := .image.repository | default .default.repository -}}
{{- $tag := .image.tag | default .default.tag | default .chart.AppVersion -}}
{{- $digest := .image.digest | default "" -}}
{{- if $digest -}}
{{- printf "%s@%s" $repository $digest -}}
{{- else -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}
{{- end }}

{{- define "kubetune.operatorImage" -}}
{{- include "kubetune.image" (dict "image" .Values.image "default" (dict) "chart" .Chart) -}}
{{- end }}

{{/* The collector defaults to the operator's own image: one image holds both. */}}
{{- define "kubetune.collectorImage" -}}
{{- if or .Values.collector.image.repository .Values.collector.image.tag .Values.collector.image.digest -}}
{{- include "kubetune.image" (dict "image" .Values.collector.image "default" .Values.image "chart" .Chart) -}}
{{- else -}}
{{- include "kubetune.operatorImage" . -}}
{{- end -}}
{{- end }}

{{- define "kubetune.trainerImage" -}}
{{- include "kubetune.image" (dict "image" .Values.trainer.image "default" (dict) "chart" .Chart) -}}
{{- end }}

{{/* The permissions the operator needs, and nothing more (rendered into a ClusterRole or Roles). */}}
{{- define "kubetune.operatorRules" -}}
# Exactly the requests the operator makes (tests/operator/test_rbac.py checks the API server's
# record of them against these rules). FineTuneJobs: read and watched; kopf adds no finalizer or
# annotation (only event handlers), so no patch of the object itself.
- apiGroups: [kubetune.dev]
  resources: [finetunejobs]
  verbs: [get, list, watch]
- apiGroups: [kubetune.dev]
  resources: [finetunejobs/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion, which needs update on the owner's
# finalizers (the OwnerReferencesPermissionEnforcement admission check on create).
- apiGroups: [kubetune.dev]
  resources: [finetunejobs/finalizers]
  verbs: [update]
# The collector and trainer Jobs: created, listed and watched, suspended/resumed and annotated
# (patch); with Kueue, an ended attempt's Job is deleted so that it holds no quota.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, list, watch, patch, delete]
# Kueue's Workloads of queued Jobs (runPolicy.queueName): read by the job-uid label (admitted,
# evicted), and spec.active patched to stop or resume a queued Job (Kueue owns its suspend).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, patch]
# The headless Service that gives trainer pods stable hostnames: created once, looked up by name.
- apiGroups: [""]
  resources: [services]
  verbs: [create, get]
# Pods are only read: exit codes and termination messages (preempted or failed).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Secrets: only `get` by name (check that a referenced Secret exists, read S3 credentials for
# progress.json). Never list or watch: the operator must not be able to enumerate Secrets.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}

{{- define "kubetune.leaderElectionRules" -}}
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [create]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  resourceNames: [{{ include "kubetune.fullname" . }}]
  verbs: [get, update]
{{- end }}
