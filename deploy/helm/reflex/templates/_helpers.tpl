{{- define "reflex.name" -}}reflex{{- end -}}

{{- define "reflex.fullname" -}}
{{- if contains "reflex" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-reflex" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "reflex.labels" -}}
app.kubernetes.io/name: reflex
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "reflex.selector" -}}
app.kubernetes.io/name: reflex
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "reflex.serviceAccount" -}}
{{- default (include "reflex.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "reflex.ha" -}}
{{- if .Values.store.url -}}true{{- end -}}
{{- end -}}

{{/* Refuses what cannot work: several replicas on one SQLite file. */}}
{{- define "reflex.check" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.store.url) -}}
{{- fail "replicaCount > 1 needs store.url (PostgreSQL): replicas cannot share an SQLite file" -}}
{{- end -}}
{{- if not (has .Values.rbac.scope (list "cluster" "namespaced")) -}}
{{- fail "rbac.scope must be cluster or namespaced" -}}
{{- end -}}
{{- end -}}

{{/* reflex.yaml: what the chart knows, with .Values.config merged over it. */}}
{{- define "reflex.config" -}}
{{- $cfg := dict "listen" "0.0.0.0:9095" "playbooks_dir" "/etc/reflex/playbooks" "data_dir" "/var/lib/reflex" -}}
{{- if .Values.publicUrl }}{{ $_ := set $cfg "public_url" .Values.publicUrl }}{{ end -}}
{{- $tokens := list -}}
{{- range .Values.tokens.list }}{{ $tokens = append $tokens (dict "name" .name "role" .role "file" (printf "/etc/reflex/tokens/%s" .name)) }}{{ end -}}
{{- $_ := set $cfg "auth" (dict "tokens" $tokens) -}}
{{- $_ := set $cfg "kubernetes" (dict "clusters" (dict "in-cluster" (dict "in_cluster" true))) -}}
{{- if .Values.store.url -}}
{{- $_ := set $cfg "store" (dict "url" .Values.store.url "password_file" "/etc/reflex/postgres/password" "pool_size" (int .Values.store.poolSize)) -}}
{{- end -}}
{{- if .Values.ssh.existingSecret -}}
{{- $_ := set $cfg "ssh" (dict "user" .Values.ssh.user "identity_file" "/etc/reflex/ssh/id_ed25519" "known_hosts_file" "/etc/reflex/ssh/known_hosts" "config_file" "/dev/null" "control_dir" "/tmp/ssh" "hosts" .Values.ssh.hosts) -}}
{{- end -}}
{{- toYaml (mergeOverwrite $cfg (deepCopy .Values.config)) -}}
{{- end -}}
