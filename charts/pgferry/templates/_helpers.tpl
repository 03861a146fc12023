{{/* Chart name. */}}
{{- define "pgferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name. */}}
{{- define "pgferry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "pgferry.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "pgferry.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "pgferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The Secret holding the PostgreSQL superuser password (standalone mode). */}}
{{- define "pgferry.postgresSecret" -}}
{{- .Values.postgres.existingSecret | default (printf "%s-postgres" (include "pgferry.fullname" .)) }}
{{- end }}

{{- define "pgferry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pgferry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The pgferry container. Standalone mode uses it in the chart's StatefulSet; in sidecar mode,
add it to your own PostgreSQL pod:
  containers:
    {{- include "pgferry.sidecar" . | nindent 4 }}
  volumes:
    {{- include "pgferry.sidecarVolumes" . | nindent 4 }}
*/}}
{{- define "pgferry.sidecar" -}}
- name: pgferry
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run", "--config", "/etc/pgferry/config.yaml"]
  ports:
    - name: metrics
      containerPort: {{ .Values.metrics.port }}
      protocol: TCP
  {{- with .Values.pgferry.existingSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  {{- with .Values.pgferry.extraEnv }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: pgferry-config
      mountPath: /etc/pgferry
      readOnly: true
    {{- range .Values.pgferry.secretMounts }}
    - name: secret-{{ .name }}
      mountPath: /etc/pgferry/secrets/{{ .name }}
      readOnly: true
    {{- end }}
    {{- if .Values.postgres.enabled }}
    # The superuser password, for `password_file` in the config.
    - name: postgres-secret
      mountPath: /var/run/secrets/postgres
      readOnly: true
    {{- end }}
  livenessProbe:
    {{- toYaml .Values.pgferry.livenessProbe | nindent 4 }}
  readinessProbe:
    {{- toYaml .Values.pgferry.readinessProbe | nindent 4 }}
  resources:
    {{- toYaml .Values.pgferry.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.pgferry.securityContext | nindent 4 }}
{{- end }}

{{/* Volumes the sidecar needs. */}}
{{- define "pgferry.sidecarVolumes" -}}
- name: pgferry-config
  configMap:
    name: {{ include "pgferry.fullname" . }}
{{- range .Values.pgferry.secretMounts }}
- name: secret-{{ .name }}
  secret:
    secretName: {{ .secretName }}
    defaultMode: {{ .defaultMode | default 288 }}
{{- end }}
{{- if .Values.postgres.enabled }}
- name: postgres-secret
  secret:
    secretName: {{ include "pgferry.postgresSecret" . }}
    items:
      - key: postgres-password
        path: postgres-password
{{- end }}
{{- end }}
