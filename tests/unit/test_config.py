import json

import pytest

from publisher.config import ConfigError, PublisherConfig


def load(extra=None, env=None):
    return PublisherConfig.load(extra or {}, environ=env or {})


def test_defaults_need_no_server(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    c = PublisherConfig.load({}, environ={})
    assert c.object_store == (tmp_path / "vllm-mm-events" / "objects").as_uri()
    assert c.event_sink.startswith("file:///") and c.event_sink.endswith("events.avro")
    assert c.storage_dtype == "native" and c.publish_text_only is False
    assert c.allow_client_embeddings is False and c.backpressure == "block"


def test_precedence_file_env_extra(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"storage_dtype": "float16", "max_pending_events": 7, "upload_threads": 3}))
    env = {"VLLM_MM_EVENTS_CONFIG_FILE": str(f), "VLLM_MM_EVENTS_STORAGE_DTYPE": "bfloat16",
           "VLLM_MM_EVENTS_PUBLISH_TEXT_ONLY": "true"}
    c = load({"upload_threads": 5}, env)
    assert c.storage_dtype == "bfloat16"  # env beats file
    assert c.max_pending_events == 7  # file beats default
    assert c.upload_threads == 5  # extra_config beats all
    assert c.publish_text_only is True


def test_env_dict_is_json():
    c = load(env={"VLLM_MM_EVENTS_KAFKA": '{"compression.type": "zstd"}'})
    assert c.kafka == {"compression.type": "zstd"}


@pytest.mark.parametrize("key,value,needle", [
    ("object_store", "gs://bucket", "object_store: expected s3://bucket/prefix or file:///dir"),
    ("object_store", "s3:///prefix", "object_store: expected s3://bucket/prefix, the bucket is missing"),
    ("object_store", "file://relative/dir", "object_store: expected file:///absolute/dir"),
    ("event_sink", "kafka://broker:9092", "event_sink: expected kafka://host:port[,host:port]/topic"),
    ("event_sink", "kafka://broker/topic", "event_sink: expected host:port in the broker list"),
    ("event_sink", "kafka://b:9092/bad topic!", "event_sink: Kafka topic"),
    ("event_sink", "http://x/y", "event_sink: expected kafka://host:port/topic or file:///path/events.avro"),
    ("storage_dtype", "int8", "storage_dtype: expected one of native, float32, float16, bfloat16"),
    ("publish_text_only", "maybe", "publish_text_only: expected a boolean"),
    ("max_inflight_bytes", 10, "max_inflight_bytes: expected a int >= 1048576"),
    ("upload_threads", "two", "upload_threads: expected a int from 1 to 64"),
    ("durability_timeout_s", -1, "durability_timeout_s: expected a float from 0.1 to 86400.0"),
    # An explicit null (or an empty YAML value) is a value, checked as any other: it used to pass unchecked,
    # and broke the sidecar's loop (max_pending_events), the scheduler's path (max_metadata_bytes), or
    # turned fsync off.
    ("max_pending_events", None, "max_pending_events: expected a int >= 1, got null"),
    ("max_metadata_bytes", None, "max_metadata_bytes: expected a int >= 0, got null"),
    ("fsync", None, "fsync: expected a boolean"),
    ("object_store", None, "object_store: expected a non-empty string"),
    # Durations have a ceiling: 1e300 s overflowed the sidecars' timers at shutdown.
    ("shutdown_timeout_s", 1e300, "shutdown_timeout_s: expected a float from 0.0 to 3600.0"),
    ("schema_registry", {"timeout": "soon"}, "schema_registry.timeout: expected a float"),
    ("backpressure", "spill", "backpressure: expected one of block, drop"),
    ("kafka", "[1]", "kafka: expected a mapping"),
    ("kafka", {"acks": [1]}, "kafka.acks: expected a string, number or boolean"),
    ("s3_endpoint_url", "minio:9000", "s3_endpoint_url: expected an http(s):// URL"),
    ("no_such_key", 1, "no_such_key: unknown key"),
    ("sidecar_cpus", "2-", "sidecar_cpus: expected a CPU list such as 2-3,8; '2-' is not a CPU number or range"),
    ("sidecar_cpus", "3-1", "sidecar_cpus: expected a CPU list such as 2-3,8; '3-1' is not a range"),
    ("sidecar_cpus", "0-99999", "sidecar_cpus: expected a CPU list"),
    ("sidecar_cpus", "all", "sidecar_cpus: expected a CPU list"),
])
def test_errors_name_the_key_and_expectation(key, value, needle):
    with pytest.raises(ConfigError) as e:
        load({key: value})
    assert needle in str(e.value)


def test_env_errors_name_the_key_too():
    with pytest.raises(ConfigError, match="storage_dtype: expected one of"):
        load(env={"VLLM_MM_EVENTS_STORAGE_DTYPE": "fp8"})


def test_secrets_never_in_redacted_form_or_repr(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"kafka": {"sasl.password": "hunter2", "ssl.key.password": "k3y"},
                                "schema_registry": {"basic.auth.user.info": "u:p4ss"}}))
    c = load({"event_sink": "kafka://b:9092/t", "config_file": str(file), "kafka": {"sasl.username": "svc"}},
             env={"VLLM_MM_EVENTS_SCHEMA_REGISTRY_URL": "https://user:regpass@registry:8081"})
    assert c.kafka["sasl.password"] == "hunter2" and c.schema_registry_url.endswith("@registry:8081")
    text = json.dumps(c.redacted()) + repr(c)
    for secret in ("hunter2", "k3y", "regpass", "p4ss"):
        assert secret not in text
    assert "svc" in text  # non-secret settings stay visible


@pytest.mark.parametrize("extra,key,instead", [
    ({"kafka": {"sasl.password": "hunter2"}}, "kafka.sasl.password", "VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD"),
    ({"kafka": {"ssl.key.pem": "hunter2"}}, "kafka.ssl.key.pem", "VLLM_MM_EVENTS_KAFKA__SSL_KEY_PEM"),
    ({"schema_registry": {"basic.auth.user.info": "u:hunter2"}}, "schema_registry.basic.auth.user.info",
     "VLLM_MM_EVENTS_SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO"),
    ({"schema_registry_url": "https://u:hunter2@registry:8081"}, "schema_registry_url",
     "VLLM_MM_EVENTS_SCHEMA_REGISTRY_URL"),
])
def test_secrets_in_extra_config_are_refused_naming_where_they_go(extra, key, instead):
    """vLLM logs ec_connector_extra_config in clear at start ("non-default args"), before the connector can
    mask anything; secrets there were accepted."""
    with pytest.raises(ConfigError) as e:
        load({"event_sink": "kafka://b:9092/t", **extra})
    assert str(e.value).startswith(f"{key}: ") and instead in str(e.value) and "hunter2" not in str(e.value)
    env = {instead: "u:hunter2" if "USER_INFO" in instead else "hunter2"}
    if key == "schema_registry_url":
        env = {instead: "https://u:hunter2@registry:8081"}
    assert load({"event_sink": "kafka://b:9092/t"}, env=env)  # where it goes instead
    assert load({"event_sink": "kafka://b:9092/t", "kafka": {"sasl.username": "svc"}})  # not a secret


@pytest.mark.parametrize("key,uri", [
    ("object_store", "s3://AKIAEXAMPLE:topsecret@bucket/prefix"),  # accepted before: the secret in every event
    ("object_store", "file://user:topsecret@host/dir"),
    ("event_sink", "kafka://user:topsecret@broker:9092/events"),
    ("event_sink", "file://user:topsecret@host/events.avro"),
    ("object_store", "s3://AKIAEXAMPLE:x9q/topsecret@bucket/prefix"),  # a '/' in the secret ends the authority
    ("object_store", "s3://AKIAEXAMPLE:x9q?topsecret@bucket/prefix"),
    ("event_sink", "kafka://user:x9q/topsecret@broker:9092/events"),
    ("event_sink", "kafka://user:x9q/topsecret@broker:9092"),  # the tail was echoed as the topic
])
def test_credentials_in_a_store_or_stream_uri_are_refused_and_not_echoed(key, uri):
    with pytest.raises(ConfigError, match=key) as e:
        load({key: uri})
    assert "topsecret" not in str(e.value) and "x9q" not in str(e.value)


def test_null_leaves_a_key_that_may_be_unset_unset():
    c = load({"spool_dir": None, "schema_registry_url": None, "kafka": None, "sidecar_cpus": None})
    assert (c.spool_dir, c.schema_registry_url, c.kafka, c.sidecar_cpus) == (None, None, {}, None)


def test_registry_numbers_from_env_are_numbers_its_client_takes():
    """``VLLM_MM_EVENTS_SCHEMA_REGISTRY__TIMEOUT=5`` (as the README shows) arrives as text; Confluent's client
    refused it at every registration (a TypeError, retried for good: no event was ever published)."""
    from schemas.codec import registry_client

    env = {"VLLM_MM_EVENTS_SCHEMA_REGISTRY__TIMEOUT": "5", "VLLM_MM_EVENTS_SCHEMA_REGISTRY__MAX_RETRIES": "2",
           "VLLM_MM_EVENTS_SCHEMA_REGISTRY__CACHE_CAPACITY": "500"}
    c = load({"schema_registry_url": "http://registry:8081"}, env)
    assert c.schema_registry == {"timeout": 5.0, "max.retries": 2, "cache.capacity": 500}
    client = registry_client(c.schema_registry_url, c.schema_registry)  # builds; no request is made
    assert client._rest_client.timeout == 5.0 and client._rest_client.max_retries == 2


def test_credentials_in_the_s3_endpoint_are_refused_and_not_echoed():
    """They were accepted: sent as the endpoint's host, and handed to every API client in ec_transfer_params."""
    for url in ("http://AKIAEXAMPLE:topsecret@minio:9000", "http://AKIAEXAMPLE:x9q/topsecret@minio:9000"):
        with pytest.raises(ConfigError, match="s3_endpoint_url: no credentials") as e:
            load({"s3_endpoint_url": url})
        assert "topsecret" not in str(e.value) and "x9q" not in str(e.value)


def test_secret_in_bad_url_not_echoed():
    with pytest.raises(ConfigError) as e:
        load({"schema_registry_url": "ftp://user:topsecret@registry"})
    assert "topsecret" not in str(e.value)


def test_settings_dicts_merge_per_setting_across_sources(tmp_path):
    # The Helm chart puts non-secret Kafka settings in extra_config and each secret in its
    # own env var from a Kubernetes Secret: both must survive, setting by setting.
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"kafka": {"compression.type": "zstd", "client.id": "from-file"}}))
    env = {
        "VLLM_MM_EVENTS_CONFIG_FILE": str(f),
        "VLLM_MM_EVENTS_KAFKA": '{"client.id": "from-env-json", "linger.ms": 7}',
        "VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD": "s3cr3t-pw",
        "VLLM_MM_EVENTS_KAFKA__SASL_USERNAME": "svc",
        "VLLM_MM_EVENTS_SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO": "u:p-secret",
    }
    cfg = PublisherConfig.load({"kafka": {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}}, env)
    assert cfg.kafka == {"compression.type": "zstd", "client.id": "from-env-json", "linger.ms": 7,
                         "sasl.password": "s3cr3t-pw", "sasl.username": "svc",
                         "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}
    assert cfg.schema_registry == {"basic.auth.user.info": "u:p-secret"}
    shown = repr(cfg)
    assert "s3cr3t-pw" not in shown and "p-secret" not in shown and "svc" in shown


# ---- storage_dtype: native ----------------------------------------------------------------

@pytest.mark.parametrize("model_dtype,expected", [
    ("torch.bfloat16", "bfloat16"), ("torch.float16", "float16"), ("torch.float32", "float32"),
    ("bfloat16", "bfloat16"), ("half", "float16"), ("float", "float32"),
    ("torch.float64", "float32"), ("torch.float8_e4m3fn", "float32"),  # nothing objects hold: float32
])
def test_native_resolves_to_the_models_dtype(model_dtype, expected):
    from publisher.config import resolve_storage_dtype

    assert resolve_storage_dtype("native", model_dtype) == expected


def test_native_resolves_from_a_torch_dtype_and_explicit_dtypes_stay():
    import torch

    from publisher.config import resolve_storage_dtype

    assert resolve_storage_dtype("native", torch.bfloat16) == "bfloat16"
    assert resolve_storage_dtype("native", torch.float16) == "float16"
    for explicit in ("float32", "float16", "bfloat16"):  # never overridden by the model's dtype
        assert resolve_storage_dtype(explicit, torch.bfloat16) == explicit


def test_resolved_config_is_concrete_everywhere_it_travels():
    """Both halves call resolved() with the same model dtype: the same keys, and the sidecars get a
    concrete dtype through to_dict()."""
    import torch

    from publisher.config import STORED_DTYPES
    from schemas.objects import object_key

    c = load()
    assert c.storage_dtype == "native"
    scheduler, worker = c.resolved(torch.bfloat16), c.resolved(torch.bfloat16)
    assert scheduler.storage_dtype == worker.storage_dtype == "bfloat16"
    assert object_key("p", "m", "ff", scheduler.storage_dtype) == object_key("p", "m", "ff", worker.storage_dtype)
    assert object_key("p", "m", "ff", scheduler.storage_dtype).endswith("/bfloat16/ff.safetensors")
    assert PublisherConfig.from_dict(worker.to_dict()).storage_dtype in STORED_DTYPES
    assert worker.to_dict() == dict(c.to_dict(), storage_dtype="bfloat16")  # nothing else changes
    explicit = load({"storage_dtype": "float16"})
    assert explicit.resolved(torch.bfloat16) is explicit


@pytest.mark.parametrize("text,cpus", [("3", {3}), ("0-2,8", {0, 1, 2, 8}), (" 4 - 5 , 7", {4, 5, 7})])
def test_sidecar_cpus_is_a_kernel_cpu_list(text, cpus):
    from publisher.settings import parse_cpu_list

    assert load({"sidecar_cpus": text}).sidecar_cpus == text and parse_cpu_list(text) == cpus
    assert load({"sidecar_cpus": 5}).sidecar_cpus == "5" and load({"sidecar_cpus": ""}).sidecar_cpus is None
