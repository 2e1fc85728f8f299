{{/* Names and labels shared by every template. */}}

{{/* The release's name if it holds "configbus", else "<release>-configbus". */}}
{{- define "configbus.fullname" -}}
{{- if contains "configbus" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-configbus" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* What selectors match on (never changes across upgrades). */}}
{{- define "configbus.selectorLabels" -}}
app.kubernetes.io/name: configbus
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Every object's labels. */}}
{{- define "configbus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{ include "configbus.selectorLabels" . }}
app.kubernetes.io/part-of: configbus
{{- end -}}

{{- define "configbus.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* A git-sync container (dict "root" $ "name" NAME "oneTime" BOOL). */}}
{{- define "configbus.gitSync" -}}
{{- $root := .root -}}
- name: {{ .name }}
  image: {{ $root.Values.tree.gitSync.image }}
  {{- if .oneTime }}
  env:
    - name: GITSYNC_ONE_TIME
      value: "true"
  {{- end }}
  envFrom:
    - configMapRef:
        name: {{ include "configbus.fullname" $root }}-git-sync
    {{- if $root.Values.secrets.git }}
    - secretRef:
        name: {{ $root.Values.secrets.git }}
        optional: true
    {{- end }}
  resources:
    {{- toYaml $root.Values.tree.gitSync.resources | nindent 4 }}
  securityContext:
    runAsUser: {{ $root.Values.tree.gitSync.runAsUser }}
    runAsGroup: {{ $root.Values.tree.gitSync.runAsUser }}
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tree
      mountPath: /tree
    - name: git-sync-tmp
      mountPath: /tmp
{{- end -}}

{{/* The probes of a configbus container: /healthz (startup, liveness), and the
readiness path given (the daemon's is /healthz: its /readyz is the writer's alone). */}}
{{- define "configbus.probes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: {{ . }}
    port: http
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}
