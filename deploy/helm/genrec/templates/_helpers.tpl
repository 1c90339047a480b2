{{/* Names and labels shared by every manifest. */}}
{{- define "genrec.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "genrec.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "genrec.labels" -}}
{{ include "genrec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The Secret holding the admin token: the user's, or the one this chart makes; empty for none. */}}
{{- define "genrec.adminSecret" -}}
{{- if .Values.existingSecret -}}
{{- .Values.existingSecret -}}
{{- else if .Values.adminToken -}}
{{- include "genrec.fullname" . -}}
{{- end -}}
{{- end -}}

{{/* preStop sleep + batcher drain + uvicorn's 5 s to close connections (service/__main__.py) + 5 s slack. */}}
{{- define "genrec.terminationGracePeriodSeconds" -}}
{{- add .Values.shutdown.preStopSleepSeconds .Values.shutdown.drainSeconds 5 5 -}}
{{- end -}}
