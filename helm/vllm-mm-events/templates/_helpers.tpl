{{/* ---------------------------------------------------------------- names */}}

{{- define "vmme.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vmme.fullname" -}}
{{- include "vmme.fullname.uncut" . | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of the release's object names before any cut (vmme.validate keeps every name whole). */}}
{{- define "vmme.fullname.uncut" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vmme.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vmme.vllm.fullname" -}}
{{- printf "%s-vllm" (include "vmme.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of a consumer's objects; args: (dict "root" $ "name" <consumer name>) */}}
{{- define "vmme.consumer.fullname" -}}
{{- printf "%s-consumer-%s" (include "vmme.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* ServiceAccounts: one per component; args: (dict "root" $ "component" "vllm"|"consumer") */}}
{{- define "vmme.serviceAccountName" -}}
{{- $sa := get .root.Values.serviceAccount .component }}
{{- if $sa.create }}
{{- default (printf "%s-%s" (include "vmme.fullname" .root) .component | trunc 63 | trimSuffix "-") $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{/* The ServiceAccount's annotations, as JSON: its own, plus the IRSA role with source=irsa
(an eks.amazonaws.com/role-arn of its own wins, e.g. a read-only role for the consumers). */}}
{{- define "vmme.serviceAccountAnnotations" -}}
{{- $a := deepCopy ((get .root.Values.serviceAccount .component).annotations | default dict) }}
{{- $o := .root.Values.objectStore.credentials }}
{{- if and (eq $o.source "irsa") (not (get $a "eks.amazonaws.com/role-arn")) }}
{{- $_ := set $a "eks.amazonaws.com/role-arn" $o.irsaRoleArn }}
{{- end }}
{{- toJson $a }}
{{- end }}

{{/* Whether any consumer Deployment is rendered. */}}
{{- define "vmme.consumers.any" -}}
{{- range $e := .Values.consumers }}
{{- if (include "vmme.consumer.merged" (dict "root" $ "entry" $e) | fromJson).enabled }}true{{ end }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- labels
Kubernetes recommended labels. Selector labels are the stable subset. */}}

{{- define "vmme.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vmme.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vmme.labels" -}}
helm.sh/chart: {{ include "vmme.chart" . }}
{{ include "vmme.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vllm-mm-events
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vmme.vllm.selectorLabels" -}}
{{ include "vmme.selectorLabels" . }}
app.kubernetes.io/component: vllm
{{- end }}

{{- define "vmme.vllm.labels" -}}
{{ include "vmme.labels" . }}
app.kubernetes.io/component: vllm
{{- end }}

{{/* args: (dict "root" $ "name" <consumer name>) */}}
{{- define "vmme.consumer.selectorLabels" -}}
{{ include "vmme.selectorLabels" .root }}
app.kubernetes.io/component: consumer
vllm-mm-events/consumer: {{ .name }}
{{- end }}

{{- define "vmme.consumer.labels" -}}
{{ include "vmme.labels" .root }}
app.kubernetes.io/component: consumer
vllm-mm-events/consumer: {{ .name }}
{{- end }}

{{/* ---------------------------------------------------------------- images */}}

{{/* args: (dict "image" <image values> "root" $) */}}
{{- define "vmme.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* ---------------------------------------------------------------- Kafka */}}

{{- define "vmme.kafka.bootstrap" -}}
{{- join "," .Values.kafka.bootstrapServers }}
{{- end }}

{{- define "vmme.kafka.sourceUri" -}}
{{- printf "kafka://%s/%s" (include "vmme.kafka.bootstrap" .) .Values.kafka.topic }}
{{- end }}

{{- define "vmme.kafka.sasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}true{{ end }}
{{- end }}

{{- define "vmme.kafka.tls" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{- define "vmme.mounts.kafkaCa" -}}/etc/vllm-mm-events/kafka/ca{{- end }}
{{- define "vmme.mounts.kafkaClient" -}}/etc/vllm-mm-events/kafka/client{{- end }}
{{- define "vmme.mounts.registryCa" -}}/etc/vllm-mm-events/schema-registry/ca{{- end }}
{{- define "vmme.mounts.pgCa" -}}/etc/vllm-mm-events/pgvector/ca{{- end }}

{{/* Non-secret librdkafka settings, as JSON (templates return strings; callers use fromJson).
Secret ones reach the pods as VLLM_MM_EVENTS_KAFKA__<SETTING> env vars from Secrets. */}}
{{- define "vmme.kafka.clientConfig" -}}
{{- $k := .Values.kafka }}
{{- $c := dict "security.protocol" $k.securityProtocol }}
{{- if include "vmme.kafka.sasl" . }}
{{- $_ := set $c "sasl.mechanism" $k.sasl.mechanism }}
{{- end }}
{{- if include "vmme.kafka.tls" . }}
{{- if $k.tls.caSecret.secretName }}
{{- $_ := set $c "ssl.ca.location" (printf "%s/ca.crt" (include "vmme.mounts.kafkaCa" .)) }}
{{- end }}
{{- if $k.tls.clientCertSecret.secretName }}
{{- $_ := set $c "ssl.certificate.location" (printf "%s/tls.crt" (include "vmme.mounts.kafkaClient" .)) }}
{{- $_ := set $c "ssl.key.location" (printf "%s/tls.key" (include "vmme.mounts.kafkaClient" .)) }}
{{- end }}
{{- end }}
{{- range $key, $value := $k.config }}
{{- $_ := set $c $key $value }}
{{- end }}
{{- toJson $c }}
{{- end }}

{{/* Non-secret Schema Registry client settings, as JSON. */}}
{{- define "vmme.schemaRegistry.clientConfig" -}}
{{- $r := .Values.kafka.schemaRegistry }}
{{- $c := dict }}
{{- if $r.caSecret.secretName }}
{{- $_ := set $c "ssl.ca.location" (printf "%s/ca.crt" (include "vmme.mounts.registryCa" .)) }}
{{- end }}
{{- range $key, $value := $r.config }}
{{- $_ := set $c $key $value }}
{{- end }}
{{- toJson $c }}
{{- end }}

{{/* ---------------------------------------------------------------- object store */}}

{{- define "vmme.objectStoreUri" -}}
{{- $o := .Values.objectStore }}
{{- if $o.prefix }}
{{- printf "s3://%s/%s" $o.bucket $o.prefix }}
{{- else }}
{{- printf "s3://%s" $o.bucket }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- publisher config
The --ec-transfer-config of vLLM, built as a dict and serialized with toJson: never
hand-written, never holding a secret. Keys of ec_connector_extra_config are exactly those of
publisher.config.KEYS; unset optional ones are left out so the publisher's own defaults
(AWS_ENDPOINT_URL, AWS_REGION, ...) apply. */}}
{{- define "vmme.ecTransferConfig" -}}
{{- $p := .Values.publisher }}
{{- $extra := dict
      "object_store" (include "vmme.objectStoreUri" .)
      "event_sink" (include "vmme.kafka.sourceUri" .)
      "kafka" (include "vmme.kafka.clientConfig" . | fromJson)
      "storage_dtype" $p.storageDtype
      "backpressure" $p.backpressure
      "max_inflight_bytes" (int64 $p.maxInflightBytes)
      "max_pending_events" (int64 $p.maxPendingEvents)
      "upload_threads" (int64 $p.uploadThreads)
      "durability_timeout_s" $p.durabilityTimeoutS
      "shutdown_timeout_s" $p.shutdownTimeoutS
      "publish_text_only" $p.publishTextOnly
      "allow_client_embeddings" $p.allowClientEmbeddings
      "fsync" $p.fsync
      "topic_partitions" (int64 $p.topicPartitions)
      "spool_dir" (include "vmme.spool.dir" .)
      "max_spool_bytes" (int64 $p.spool.maxBytes)
      "metrics_port" (int64 $p.metricsPort) }}
{{- with $p.sidecarCpus }}
{{- $_ := set $extra "sidecar_cpus" . }}
{{- end }}
{{- with .Values.objectStore.endpointUrl }}
{{- $_ := set $extra "s3_endpoint_url" . }}
{{- end }}
{{- with .Values.objectStore.region }}
{{- $_ := set $extra "s3_region" . }}
{{- end }}
{{- with .Values.kafka.schemaRegistry.url }}
{{- $_ := set $extra "schema_registry_url" . }}
{{- $_ := set $extra "schema_registry" (include "vmme.schemaRegistry.clientConfig" $ | fromJson) }}
{{- end }}
{{- toJson (dict
      "ec_connector" "MMEmbeddingPublisher"
      "ec_role" "ec_both"
      "ec_connector_extra_config" $extra) }}
{{- end }}

{{/* ---------------------------------------------------------------- secret env
Every credential is an env var from a secretKeyRef. Shared by vLLM and the consumers. */}}

{{- define "vmme.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .secretKey }}
{{- end }}

{{/* The Secrets each component's container gets: the object store (the consumers' own keys
when objectStore.credentials.consumerExistingSecret is set), Kafka, the Schema Registry.
vLLM adds HF_TOKEN and VLLM_API_KEY, a consumer its own sink's Secret; nothing else.
args: (dict "root" $ "component" "vllm"|"consumer") */}}
{{- define "vmme.env.credentials" -}}
{{- $consumer := eq .component "consumer" }}
{{- $o := .root.Values.objectStore.credentials }}
{{- if eq $o.source "static" }}
{{- $secret := ternary (default $o.existingSecret $o.consumerExistingSecret) $o.existingSecret $consumer }}
{{ include "vmme.secretEnv" (dict "name" "AWS_ACCESS_KEY_ID" "secretName" $secret "secretKey" $o.accessKeyIdKey) }}
{{ include "vmme.secretEnv" (dict "name" "AWS_SECRET_ACCESS_KEY" "secretName" $secret "secretKey" $o.secretAccessKeyKey) }}
{{- if $o.sessionTokenKey }}
{{ include "vmme.secretEnv" (dict "name" "AWS_SESSION_TOKEN" "secretName" $secret "secretKey" $o.sessionTokenKey) }}
{{- end }}
{{- end }}
{{- $k := .root.Values.kafka }}
{{- if include "vmme.kafka.sasl" .root }}
{{- $secret := include "vmme.kafka.saslSecret" . }}
{{ include "vmme.secretEnv" (dict "name" "VLLM_MM_EVENTS_KAFKA__SASL_USERNAME" "secretName" $secret "secretKey" $k.sasl.usernameKey) }}
{{ include "vmme.secretEnv" (dict "name" "VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD" "secretName" $secret "secretKey" $k.sasl.passwordKey) }}
{{- end }}
{{- if and (include "vmme.kafka.tls" .root) $k.tls.keyPassword.secretName }}
{{ include "vmme.secretEnv" (dict "name" "VLLM_MM_EVENTS_KAFKA__SSL_KEY_PASSWORD" "secretName" $k.tls.keyPassword.secretName "secretKey" $k.tls.keyPassword.secretKey) }}
{{- end }}
{{- if and $k.schemaRegistry.url $k.schemaRegistry.basicAuth.secretName }}
{{ include "vmme.secretEnv" (dict "name" "VLLM_MM_EVENTS_SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO" "secretName" $k.schemaRegistry.basicAuth.secretName "secretKey" $k.schemaRegistry.basicAuth.secretKey) }}
{{- end }}
{{- end }}

{{/* The Kafka SASL Secret of a component; args: (dict "root" $ "component" "vllm"|"consumer") */}}
{{- define "vmme.kafka.saslSecret" -}}
{{- $s := .root.Values.kafka.sasl }}
{{- if eq .component "consumer" }}
{{- default $s.existingSecret $s.consumerExistingSecret }}
{{- else }}
{{- $s.existingSecret }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- TLS volumes */}}

{{- define "vmme.tlsVolumes" -}}
{{- $k := .Values.kafka }}
{{- if include "vmme.kafka.tls" . }}
{{- if $k.tls.caSecret.secretName }}
- name: kafka-ca
  secret:
    secretName: {{ $k.tls.caSecret.secretName }}
    defaultMode: 0440
    items:
      - key: {{ $k.tls.caSecret.secretKey }}
        path: ca.crt
{{- end }}
{{- if $k.tls.clientCertSecret.secretName }}
- name: kafka-client-cert
  secret:
    secretName: {{ $k.tls.clientCertSecret.secretName }}
    defaultMode: 0440
    items:
      - key: {{ $k.tls.clientCertSecret.certKey }}
        path: tls.crt
      - key: {{ $k.tls.clientCertSecret.keyKey }}
        path: tls.key
{{- end }}
{{- end }}
{{- if and $k.schemaRegistry.url $k.schemaRegistry.caSecret.secretName }}
- name: schema-registry-ca
  secret:
    secretName: {{ $k.schemaRegistry.caSecret.secretName }}
    defaultMode: 0440
    items:
      - key: {{ $k.schemaRegistry.caSecret.secretKey }}
        path: ca.crt
{{- end }}
{{- end }}

{{- define "vmme.tlsVolumeMounts" -}}
{{- $k := .Values.kafka }}
{{- if include "vmme.kafka.tls" . }}
{{- if $k.tls.caSecret.secretName }}
- name: kafka-ca
  mountPath: {{ include "vmme.mounts.kafkaCa" . }}
  readOnly: true
{{- end }}
{{- if $k.tls.clientCertSecret.secretName }}
- name: kafka-client-cert
  mountPath: {{ include "vmme.mounts.kafkaClient" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- if and $k.schemaRegistry.url $k.schemaRegistry.caSecret.secretName }}
- name: schema-registry-ca
  mountPath: {{ include "vmme.mounts.registryCa" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- consumers
A consumer entry merged over the shared `consumer` settings, as JSON (use with fromJson).
Keys of the entry replace the shared ones; `keda`, `dlq` and `pdb` merge one level deeper.
`set` is used rather than mergeOverwrite so that false and 0 in an entry win. */}}
{{- define "vmme.consumer.merged" -}}
{{- $shared := omit .root.Values.consumer "image" "metricsPort" "logFormat" "terminationGracePeriodSeconds" "tmpSizeLimit" "podSecurityContext" "securityContext" "probes" }}
{{- $m := deepCopy $shared }}
{{- range $key, $value := .entry }}
{{- if and (has $key (list "keda" "dlq" "pdb")) (kindIs "map" $value) }}
{{- $inner := deepCopy (get $shared $key) }}
{{- range $k2, $v2 := $value }}
{{- $_ := set $inner $k2 $v2 }}
{{- end }}
{{- $_ := set $m $key $inner }}
{{- else }}
{{- $_ := set $m $key $value }}
{{- end }}
{{- end }}
{{- if not (hasKey $m "enabled") }}
{{- $_ := set $m "enabled" true }}
{{- end }}
{{- if not $m.group }}
{{- $_ := set $m "group" (printf "%s-%s" (include "vmme.fullname" .root) $m.name) }}
{{- end }}
{{- toJson $m }}
{{- end }}

{{/* Cross-field checks the schema cannot express; a failure names the entry and the fix. */}}
{{- define "vmme.validate" -}}
{{- /* Every object name whole: a Kubernetes name holds at most 63 characters, and two names cut
short alike (a long release name, consumers differing only past the cut) would be one object. */}}
{{- $full := include "vmme.fullname.uncut" . }}
{{- $longest := printf "%s-vllm-metrics" $full }}
{{- if gt (len $longest) 63 }}
{{- fail (printf "release name: the chart's object names start with %q, and the longest, %q, has %d characters, more than the 63 a Kubernetes name may hold; use a release name or fullnameOverride of at most 50 characters" $full $longest (len $longest)) }}
{{- end }}
{{- $names := list }}
{{- range $i, $e := .Values.consumers }}
{{- $object := printf "%s-consumer-%s" $full $e.name }}
{{- if gt (len $object) 63 }}
{{- fail (printf "consumers[%d].name: %q makes the object name %q, of %d characters, more than the 63 a Kubernetes name may hold (names cut short collide); use a shorter consumer name, release name or fullnameOverride" $i $e.name $object (len $object)) }}
{{- end }}
{{- if has $e.name $names }}
{{- fail (printf "consumers[%d].name: %q is used twice; consumer names must be unique" $i $e.name) }}
{{- end }}
{{- $names = append $names $e.name }}
{{- $c := include "vmme.consumer.merged" (dict "root" $ "entry" $e) | fromJson }}
{{- if eq $c.sink.type "lancedb" }}
{{- if or (gt (int $c.replicas) 1) $c.keda.enabled }}
{{- fail (printf "consumers[%d] (%s): a lancedb sink writes one local directory; run 1 replica (replicas: 1, keda.enabled: false)" $i $e.name) }}
{{- end }}
{{- $mount := trimSuffix "/" (dig "storage" "mountPath" "/data/lancedb" $c.sink) }}
{{- if not (hasPrefix (printf "lancedb://%s/" $mount) $c.sink.uri) }}
{{- fail (printf "consumers[%d].sink.uri: %q must be a table under sink.storage.mountPath (lancedb://%s/<table>)" $i $c.sink.uri $mount) }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq .Values.objectStore.credentials.source "irsa" }}
{{- range $component, $used := dict "vllm" .Values.vllm.enabled "consumer" (include "vmme.consumers.any" $) }}
{{- if and $used (not (get $.Values.serviceAccount $component).create) }}
{{- fail (printf "objectStore.credentials.source=irsa: the chart annotates the ServiceAccounts it creates, so serviceAccount.%s.create must be true (or use source=chain and annotate your own ServiceAccount)" $component) }}
{{- end }}
{{- end }}
{{- end }}
{{- include "vmme.validate.publisher" . }}
{{- $tgp := .Values.vllm.terminationGracePeriodSeconds }}
{{- $needed := int (include "vmme.vllm.engineShutdownTimeout" .) }}
{{- if and (not (kindIs "invalid" $tgp)) (le (int $tgp) $needed) }}
{{- fail (printf "vllm.terminationGracePeriodSeconds: %d must be larger than vLLM's --shutdown-timeout = vllm.shutdownTimeoutSeconds + 2 x (publisher.shutdownTimeoutS + 5) = %d, or the publisher's flush is cut short" (int $tgp) $needed) }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- publisher outbox
spool_dir: the spool volume's mount path, or "" (no outbox) with publisher.spool.enabled=false. */}}
{{- define "vmme.spool.dir" -}}
{{- if .Values.publisher.spool.enabled }}
{{- trimSuffix "/" .Values.publisher.spool.mountPath }}
{{- end }}
{{- end }}

{{- define "vmme.spool.claimName" -}}
{{- $c := .Values.publisher.spool.persistentVolumeClaim }}
{{- default (printf "%s-spool" (include "vmme.vllm.fullname" .) | trunc 63 | trimSuffix "-") $c.existingClaim }}
{{- end }}

{{/* Engines whose slots share one spool volume: vllm.replicaCount on a ReadWriteMany claim, else 1. */}}
{{- define "vmme.spool.engines" -}}
{{- $s := .Values.publisher.spool }}
{{- if and (eq $s.volume "persistentVolumeClaim") (has "ReadWriteMany" $s.persistentVolumeClaim.accessModes) }}
{{- max 1 (int64 .Values.vllm.replicaCount) }}
{{- else }}1
{{- end }}
{{- end }}

{{/* The smallest volume an engine's slot needs: maxBytes plus the acks file, the record that
crosses the cap and filesystem overhead. */}}
{{- define "vmme.spool.minBytes" -}}
{{- add (int64 .Values.publisher.spool.maxBytes) 16777216 }}
{{- end }}

{{/* The default volume size, in Mi: per engine maxBytes + 25%, at least maxBytes + 64Mi. */}}
{{- define "vmme.spool.defaultSize" -}}
{{- $max := int64 .Values.publisher.spool.maxBytes }}
{{- $per := max (div (mul $max 5) 4) (add $max 67108864) }}
{{- printf "%dMi" (div (add (mul $per (include "vmme.spool.engines" . | int64)) 1048575) 1048576) }}
{{- end }}

{{- define "vmme.spool.emptyDirSize" -}}
{{- $q := .Values.publisher.spool.emptyDir.sizeLimit }}
{{- if or (kindIs "invalid" $q) (eq (toString $q) "") }}{{ include "vmme.spool.defaultSize" . }}
{{- else if kindIs "string" $q }}{{ $q }}
{{- else }}{{ int64 $q }}
{{- end }}
{{- end }}

{{- define "vmme.spool.claimSize" -}}
{{- $q := .Values.publisher.spool.persistentVolumeClaim.size }}
{{- if or (kindIs "invalid" $q) (eq (toString $q) "") }}{{ include "vmme.spool.defaultSize" . }}
{{- else if kindIs "string" $q }}{{ $q }}
{{- else }}{{ int64 $q }}
{{- end }}
{{- end }}

{{/* A Kubernetes quantity (a string like 1280Mi, 1.5Gi, 2G, or a number) in bytes. */}}
{{- define "vmme.quantityBytes" -}}
{{- if kindIs "string" . }}
{{- $mult := dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18
      "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0
      "Ei" 1152921504606846976.0 }}
{{- $num := regexReplaceAll "^([0-9.]+).*$" . "${1}" }}
{{- $suffix := regexReplaceAll "^[0-9.]+" . "" }}
{{- mulf (float64 $num) (get $mult $suffix) | floor | int64 }}
{{- else }}
{{- int64 . }}
{{- end }}
{{- end }}

{{/* The outbox volume and the metrics port (vmme.validate). */}}
{{- define "vmme.validate.publisher" -}}
{{- $p := .Values.publisher }}
{{- $v := .Values.vllm }}
{{- if and $v.enabled (gt (int64 $p.metricsPort) 0) (eq (int64 $p.metricsPort) (int64 $v.port)) }}
{{- fail (printf "publisher.metricsPort: %d is vllm.port; the publisher's metrics need a port of their own" (int64 $p.metricsPort)) }}
{{- end }}
{{- $s := $p.spool }}
{{- if and $v.enabled $s.enabled }}
{{- $dir := include "vmme.spool.dir" . }}
{{- $taken := list "/dev/shm" "/home/vllm" "/tmp" (trimSuffix "/" $v.modelCache.mountPath) (include "vmme.mounts.kafkaCa" .) (include "vmme.mounts.kafkaClient" .) (include "vmme.mounts.registryCa" .) }}
{{- if has $dir $taken }}
{{- fail (printf "publisher.spool.mountPath: %s is already a mount of the vLLM container; choose a path of its own, e.g. /var/lib/vllm-mm-events/spool" $dir) }}
{{- end }}
{{- $need := include "vmme.spool.minBytes" . | int64 }}
{{- $engines := include "vmme.spool.engines" . | int64 }}
{{- if eq $s.volume "emptyDir" }}
{{- $size := include "vmme.quantityBytes" (include "vmme.spool.emptyDirSize" .) | int64 }}
{{- if lt $size $need }}
{{- fail (printf "publisher.spool.emptyDir.sizeLimit: %s (%d bytes) must be larger than publisher.spool.maxBytes (%d) by at least 16Mi, i.e. >= %d bytes: a publisher may fill its slot up to maxBytes plus its acks file, and an emptyDir over its sizeLimit gets the pod evicted and the spool deleted (left empty it is sized from maxBytes)" (include "vmme.spool.emptyDirSize" .) $size (int64 $s.maxBytes) $need) }}
{{- end }}
{{- else }}
{{- $c := $s.persistentVolumeClaim }}
{{- if not $c.existingClaim }}
{{- if and (gt (int64 $v.replicaCount) 1) (not (has "ReadWriteMany" $c.accessModes)) }}
{{- fail (printf "publisher.spool.persistentVolumeClaim.accessModes: %s: vllm.replicaCount is %d, but one ReadWriteOnce/ReadWriteOncePod claim cannot be mounted by pods on different nodes; use [ReadWriteMany] (each engine takes its own slot in the shared spool) or volume: emptyDir" (join "," $c.accessModes) (int64 $v.replicaCount)) }}
{{- end }}
{{- $size := include "vmme.quantityBytes" (include "vmme.spool.claimSize" .) | int64 }}
{{- if lt $size (mul $need $engines) }}
{{- fail (printf "publisher.spool.persistentVolumeClaim.size: %s (%d bytes) must hold %d engine slot(s) of publisher.spool.maxBytes (%d) plus 16Mi each, i.e. >= %d bytes (left empty it is sized from maxBytes)" (include "vmme.spool.claimSize" .) $size $engines (int64 $s.maxBytes) (mul $need $engines)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* vLLM flushes its connector halves inside --shutdown-timeout (then SIGKILLs the engine core):
worker half first, then scheduler half, each waiting up to publisher.shutdownTimeoutS + 5 s for
its sidecar's report. So vLLM's --shutdown-timeout is the drain time plus that flush budget. */}}
{{- define "vmme.vllm.flushBudgetSeconds" -}}
{{- mul 2 (add (int (ceil .Values.publisher.shutdownTimeoutS)) 5) }}
{{- end }}

{{- define "vmme.vllm.engineShutdownTimeout" -}}
{{- add (int .Values.vllm.shutdownTimeoutSeconds) (int (include "vmme.vllm.flushBudgetSeconds" .)) }}
{{- end }}

{{- define "vmme.vllm.terminationGracePeriodSeconds" -}}
{{- $tgp := .Values.vllm.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $tgp }}
{{- add (int (include "vmme.vllm.engineShutdownTimeout" .)) 15 }}
{{- else }}
{{- int $tgp }}
{{- end }}
{{- end }}

{{/* The consumers' non-secret settings (env through envFrom); their checksum rolls the pods. */}}
{{- define "vmme.consumer.configData" -}}
VLLM_MM_EVENTS_KAFKA: {{ include "vmme.kafka.clientConfig" . | quote }}
{{- with .Values.objectStore.endpointUrl }}
VLLM_MM_EVENTS_S3_ENDPOINT_URL: {{ . | quote }}
{{- end }}
{{- with .Values.objectStore.region }}
VLLM_MM_EVENTS_S3_REGION: {{ . | quote }}
{{- end }}
{{- with .Values.kafka.schemaRegistry.url }}
VLLM_MM_EVENTS_SCHEMA_REGISTRY_URL: {{ . | quote }}
VLLM_MM_EVENTS_SCHEMA_REGISTRY: {{ include "vmme.schemaRegistry.clientConfig" $ | quote }}
{{- end }}
{{- end }}


{{/* ---------------------------------------------------------------- sink TLS
Defaults when the entry leaves them out: TLS on. */}}
{{- define "vmme.sink.qdrantHttps" -}}
{{- ternary "true" "false" (ne (toString (dig "https" true .)) "false") }}
{{- end }}

{{- define "vmme.sink.pgSslMode" -}}
{{- dig "sslMode" "require" . }}
{{- end }}

{{/* ---------------------------------------------------------------- NetworkPolicy
The port of a URL: its own, else the scheme's (http 80, https 443), else .default.
args: (dict "url" <url> "default" <port>) */}}
{{- define "vmme.np.urlPort" -}}
{{- $u := urlParse .url }}
{{- $port := regexFind ":[0-9]+$" $u.host | trimPrefix ":" }}
{{- if $port }}{{ $port }}
{{- else if eq $u.scheme "https" }}443
{{- else if eq $u.scheme "http" }}80
{{- else }}{{ .default }}
{{- end }}
{{- end }}

{{/* One egress rule: to the peers of a destination ([]: any address) on its ports ([]: the
derived ones). args: (dict "comment" <text> "dest" <{to, ports}> "derived" <list of ports>) */}}
{{- define "vmme.np.egressRule" -}}
# {{ .comment }}
- ports:
    {{- if .dest.ports }}
    {{- toYaml .dest.ports | nindent 4 }}
    {{- else }}
    {{- range .derived | uniq }}
    - port: {{ int . }}
      protocol: TCP
    {{- end }}
    {{- end }}
  {{- with .dest.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The egress rules vLLM and the consumers share: DNS, the object store, Kafka, the Schema
Registry. */}}
{{- define "vmme.np.commonEgress" -}}
{{- $np := .Values.networkPolicy }}
{{- $store := list 443 }}
{{- with .Values.objectStore.endpointUrl }}
{{- $store = list (include "vmme.np.urlPort" (dict "url" . "default" 443)) }}
{{- end }}
{{- $kafka := list }}
{{- range .Values.kafka.bootstrapServers }}
{{- $kafka = append $kafka (regexFind "[0-9]+$" .) }}
{{- end }}
# DNS
- ports:
    {{- toYaml $np.dns.ports | nindent 4 }}
  {{- with $np.dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{ include "vmme.np.egressRule" (dict "comment" "Object store" "dest" $np.objectStore "derived" $store) }}
{{ include "vmme.np.egressRule" (dict "comment" "Kafka" "dest" $np.kafka "derived" $kafka) }}
{{- with .Values.kafka.schemaRegistry.url }}
{{ include "vmme.np.egressRule" (dict "comment" "Schema Registry" "dest" $np.schemaRegistry "derived" (list (include "vmme.np.urlPort" (dict "url" . "default" 443)))) }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- Grafana dashboards
The dashboards (dashboards/<name>.json) rendered with metrics.grafanaDashboards.enabled, as a
JSON list: the publisher's with vLLM and its metrics port, the consumers' with a consumer. */}}
{{- define "vmme.grafanaDashboards" -}}
{{- $boards := list }}
{{- if .Values.metrics.grafanaDashboards.enabled }}
{{- if and .Values.vllm.enabled (gt (int64 .Values.publisher.metricsPort) 0) }}
{{- $boards = append $boards "publisher" }}
{{- end }}
{{- if include "vmme.consumers.any" . }}
{{- $boards = append $boards "consumer" }}
{{- end }}
{{- end }}
{{- toJson $boards }}
{{- end }}
