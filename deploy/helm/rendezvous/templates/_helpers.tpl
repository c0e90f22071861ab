{{/*
Names, labels, images, and what every component's pod shares: the RDV_<SERVICE>_* settings
(the same pydantic-settings objects the local mesh sets), mounted Secrets, probes.
*/}}

{{- define "rdv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rdv.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "rdv.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "rdv.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A component's resource name: <fullname>-<component>, at most 63 characters. */}}
{{- define "rdv.component" -}}
{{- printf "%s-%s" (include "rdv.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The in-cluster DNS name of a component's Service (TLS certificates name *.<ns>.svc). */}}
{{- define "rdv.host" -}}
{{- printf "%s.%s.svc" (include "rdv.component" .) .root.Release.Namespace -}}
{{- end -}}

{{- define "rdv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rdv.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "rdv.labels" -}}
{{ include "rdv.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: rendezvous
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* image reference of a runtime (python, go, node). */}}
{{- define "rdv.image" -}}
{{- $image := index .root.Values.image .runtime -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The user each image runs as (its Dockerfile's USER). */}}
{{- define "rdv.uid" -}}
{{- $uids := dict "python" 10001 "go" 65532 "node" 1000 -}}
{{- index $uids .runtime -}}
{{- end -}}

{{- define "rdv.containerSecurityContext" -}}
{{- $context := deepCopy .root.Values.containerSecurityContext -}}
{{- $uid := include "rdv.uid" . | int -}}
{{- $_ := set $context "runAsUser" $uid -}}
{{- $_ := set $context "runAsGroup" $uid -}}
{{- toYaml $context -}}
{{- end -}}

{{/*
Pod annotations: Prometheus's, the user's, and for pods that read the mesh file at start only
(control plane, decoys: `mesh` true) its checksum, so that a changed file restarts them.
Runner hosts read the model directory live: adding a model restarts nothing.
*/}}
{{- define "rdv.podAnnotations" -}}
{{- if .mesh }}
checksum/mesh: {{ toYaml .root.Values.mesh | sha256sum }}
{{- end }}
{{- if and .root.Values.metrics.enabled .root.Values.metrics.annotations .metrics }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .root.Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .root.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
What every pod shares: placement (a component's own values win), security, and no Service
links: Kubernetes would put <SERVICE>_PORT variables for every Service of the namespace in
the environment, and a Service named like rdv-rendezvous-... becomes RDV_RENDEZVOUS_...,
the very prefix the settings read. No pod calls the Kubernetes API: no token either.
*/}}
{{- define "rdv.placement" -}}
{{- $spec := .spec | default dict -}}
enableServiceLinks: false
automountServiceAccountToken: false
{{- with (default .root.Values.nodeSelector $spec.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.tolerations $spec.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.affinity $spec.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/*
The settings every Python component shares, as RDV_<SERVICE>_* variables: where it listens,
the broker (token and TLS as files), gRPC TLS, bearer-token auth (public servers only),
metrics, logs, traces; then the component's own `settings` map (keys are field names, nested
ones joined by "__", e.g. pulsar__send_timeout_s).
Arguments: root, prefix (RDV_RENDEZVOUS_), port, public (bool), metricsPort (0: none),
settings (map), extra (list of env entries set by the chart).
*/}}
{{- define "rdv.env" -}}
{{- $v := .root.Values -}}
{{- $p := .prefix -}}
- name: {{ $p }}LISTEN
  value: {{ printf "0.0.0.0:%v" .port | quote }}
- name: {{ $p }}LOG_LEVEL
  value: {{ $v.logLevel | quote }}
- name: {{ $p }}PULSAR__SERVICE_URL
  value: {{ $v.pulsar.serviceUrl | quote }}
- name: {{ $p }}PULSAR__ADMIN_URL
  value: {{ $v.pulsar.adminUrl | quote }}
- name: {{ $p }}PULSAR__TENANT_NAMESPACE
  value: {{ $v.pulsar.tenantNamespace | quote }}
{{- if $v.pulsar.auth.enabled }}
- name: {{ $p }}PULSAR__TOKEN_FILE
  value: /etc/rendezvous/pulsar-token/token
{{- end }}
{{- if $v.pulsar.tls.enabled }}
- name: {{ $p }}PULSAR__TLS_TRUST_CERTS_FILE
  value: /etc/rendezvous/pulsar-ca/ca.crt
- name: {{ $p }}PULSAR__TLS_VALIDATE_HOSTNAME
  value: {{ $v.pulsar.tls.validateHostname | quote }}
{{- end }}
{{- if $v.grpcTls.enabled }}
- name: {{ $p }}TLS__CERT_FILE
  value: /etc/rendezvous/grpc-tls/tls.crt
- name: {{ $p }}TLS__KEY_FILE
  value: /etc/rendezvous/grpc-tls/tls.key
- name: {{ $p }}TLS__CA_FILE
  value: /etc/rendezvous/grpc-tls/ca.crt
{{- if $v.grpcTls.mutual }}
- name: {{ $p }}TLS__CLIENT_CA_FILE
  value: /etc/rendezvous/grpc-tls/ca.crt
- name: {{ $p }}TLS__CLIENT_CERT_FILE
  value: /etc/rendezvous/grpc-tls/tls.crt
- name: {{ $p }}TLS__CLIENT_KEY_FILE
  value: /etc/rendezvous/grpc-tls/tls.key
{{- end }}
{{- end }}
{{- if and .public $v.auth.enabled }}
- name: {{ $p }}AUTH__ENABLED
  value: "true"
{{- if $v.auth.hs256Key }}
- name: {{ $p }}AUTH__SECRET_FILE
  value: /etc/rendezvous/jwt/secret
{{- end }}
{{- if $v.auth.publicKeyKey }}
- name: {{ $p }}AUTH__PUBLIC_KEY_FILE
  value: /etc/rendezvous/jwt/public.pem
{{- end }}
- name: {{ $p }}AUTH__ISSUER
  value: {{ $v.auth.issuer | quote }}
- name: {{ $p }}AUTH__AUDIENCE
  value: {{ $v.auth.audience | quote }}
{{- end }}
{{- if and $v.metrics.enabled .metricsPort }}
- name: {{ $p }}METRICS_PORT
  value: {{ .metricsPort | quote }}
- name: {{ $p }}METRICS_HOST
  value: "0.0.0.0"
{{- end }}
{{- include "rdv.otelEnv" . }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- range $key, $value := .settings }}
- name: {{ printf "%s%s" $p (upper $key) }}
  value: {{ ternary ($value | toJson) ($value | toString) (or (kindIs "map" $value) (kindIs "slice" $value)) | quote }}
{{- end }}
{{- end -}}

{{- define "rdv.otelEnv" -}}
{{- with .root.Values.tracing.otlpEndpoint }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $.root.Values.tracing.sampleRatio | quote }}
{{- end }}
{{- end -}}

{{/* The pod's own name: a unique, stable-for-the-pod instance (the return address). */}}
{{- define "rdv.podNameEnv" -}}
- name: {{ .prefix }}INSTANCE
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end -}}

{{/* Volumes of the Secrets a Python pod reads (public: the JWT key too), and /tmp. */}}
{{- define "rdv.secretVolumes" -}}
{{- $v := .root.Values -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if $v.pulsar.auth.enabled }}
- name: pulsar-token
  secret:
    secretName: {{ $v.pulsar.auth.tokenSecret.name }}
    items:
      - {key: {{ $v.pulsar.auth.tokenSecret.key }}, path: token}
{{- end }}
{{- if $v.pulsar.tls.enabled }}
- name: pulsar-ca
  secret:
    secretName: {{ $v.pulsar.tls.caSecret.name }}
    items:
      - {key: {{ $v.pulsar.tls.caSecret.key }}, path: ca.crt}
{{- end }}
{{- if $v.grpcTls.enabled }}
- name: grpc-tls
  secret:
    secretName: {{ $v.grpcTls.secretName }}
{{- end }}
{{- if and .public $v.auth.enabled }}
- name: jwt
  secret:
    secretName: {{ $v.auth.secretName }}
    items:
      {{- if $v.auth.hs256Key }}
      - {key: {{ $v.auth.hs256Key }}, path: secret}
      {{- end }}
      {{- if $v.auth.publicKeyKey }}
      - {key: {{ $v.auth.publicKeyKey }}, path: public.pem}
      {{- end }}
{{- end }}
{{- end -}}

{{- define "rdv.secretMounts" -}}
{{- $v := .root.Values -}}
- {name: tmp, mountPath: /tmp}
{{- if $v.pulsar.auth.enabled }}
- {name: pulsar-token, mountPath: /etc/rendezvous/pulsar-token, readOnly: true}
{{- end }}
{{- if $v.pulsar.tls.enabled }}
- {name: pulsar-ca, mountPath: /etc/rendezvous/pulsar-ca, readOnly: true}
{{- end }}
{{- if $v.grpcTls.enabled }}
- {name: grpc-tls, mountPath: /etc/rendezvous/grpc-tls, readOnly: true}
{{- end }}
{{- if and .public $v.auth.enabled }}
- {name: jwt, mountPath: /etc/rendezvous/jwt, readOnly: true}
{{- end }}
{{- end -}}

{{/*
A gRPC health probe on `port` (service ""): kubelet's own gRPC probe, or, on a TLS mesh,
grpc-health-probe (in every image, at this path) with the mesh's certificate: kubelet's
speaks no TLS. Arguments: root, port.
*/}}
{{- define "rdv.grpcProbe" -}}
{{- if .root.Values.grpcTls.enabled -}}
exec:
  command:
    - /usr/local/bin/grpc-health-probe
    - {{ printf "-addr=127.0.0.1:%v" .port }}
    - -tls
    - -tls-ca-cert=/etc/rendezvous/grpc-tls/ca.crt
    {{- if .root.Values.grpcTls.mutual }}
    - -tls-client-cert=/etc/rendezvous/grpc-tls/tls.crt
    - -tls-client-key=/etc/rendezvous/grpc-tls/tls.key
    {{- end }}
    - {{ printf "-tls-server-name=%s.%s.svc" (include "rdv.fullname" .root) .root.Release.Namespace }}
{{- else -}}
grpc:
  port: {{ .port }}
{{- end }}
{{- end -}}

{{/* Readiness and liveness of a component that is SERVING once started. */}}
{{- define "rdv.probes" -}}
readinessProbe:
  {{- include "rdv.grpcProbe" . | nindent 2 }}
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 3
livenessProbe:
  {{- include "rdv.grpcProbe" . | nindent 2 }}
  initialDelaySeconds: 10
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 6
{{- end -}}

{{/* A PodDisruptionBudget. Arguments: root, name, pdb. */}}
{{- define "rdv.pdb" -}}
{{- if .pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "rdv.component" . }}
  labels:
    {{- include "rdv.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "rdv.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* The runner hosts' shared subscription of a replica group (services/runner/settings.py). */}}
{{- define "rdv.runnerSubscription" -}}
{{- if le (int .) 1 -}}runners{{- else -}}{{ printf "runners-x%d" (int .) }}{{- end -}}
{{- end -}}

{{/* The refusals that make a release fail to render instead of failing at run time. */}}
{{- define "rdv.validate" -}}
{{- $v := .Values -}}
{{- if and $v.auth.enabled (not (or $v.auth.hs256Key $v.auth.publicKeyKey)) -}}
{{- fail "auth.enabled needs auth.hs256Key or auth.publicKeyKey" -}}
{{- end -}}
{{- end -}}

{{/* NetworkPolicy ingress rule: Prometheus scrapes metrics. */}}
{{- define "rdv.metricsIngress" -}}
{{- if .Values.metrics.enabled -}}
- ports:
    - {port: {{ .Values.metrics.port }}}
    - {port: {{ add .Values.metrics.port 1 }}}
  from:
    - namespaceSelector:
        {{- toYaml .Values.networkPolicy.metricsNamespaceSelector | nindent 8 }}
{{- end -}}
{{- end -}}
