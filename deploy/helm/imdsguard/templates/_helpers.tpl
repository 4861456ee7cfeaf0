{{/*
Object names are fixed, not derived from the release name: the agent pins
its programs at one place per node (/sys/fs/bpf/imdsguard), so two releases
on one cluster would fight over the same pins. A second install fails on
the ClusterRole name instead.
*/}}

{{/* The selector: the same as deploy/manifests/, and immutable. */}}
{{- define "imdsguard.selectorLabels" -}}
app.kubernetes.io/name: imdsguard
{{- end }}

{{- define "imdsguard.labels" -}}
{{ include "imdsguard.selectorLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "imdsguard.image" -}}
{{- if or (not .Values.image.tag) (eq .Values.image.tag "latest") -}}
{{- fail "image.tag must be a fixed release tag, not empty or latest" -}}
{{- end -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}
