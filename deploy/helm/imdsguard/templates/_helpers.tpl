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

{{/*
The policy file: .Values.policy, or the default for a first install, which
lets the cloud's node components through (their preset) and audits every
other pod. presetAccess is allow so that the default never needs the filter
proxy and never narrows a component before its traffic has been seen.
*/}}
{{- define "imdsguard.policy" -}}
{{- if .Values.policy -}}
{{ .Values.policy }}
{{- else -}}
# The chart's default policy: the node components of the {{ .Values.cloud }}
# preset (`imdsguard presets`) may reach the metadata service; every other
# pod is {{ if eq .Values.defaultMode "audit" }}audited, that is reported and not denied{{ else }}denied{{ end }}. deploy/README.md,
# "Audit, then enforce", walks from audit to enforce.
include: [{{ .Values.cloud }}]
presetAccess: allow
defaultMode: {{ .Values.defaultMode }}
{{- end -}}
{{- end }}
