"""The publisher's typed configuration (``PublisherConfig``), validated once at engine start.

Layers, later ones winning: defaults < a JSON/YAML file (``config_file`` key or
``VLLM_MM_EVENTS_CONFIG_FILE``) < ``VLLM_MM_EVENTS_<KEY>`` env vars < vLLM's
``ec_connector_extra_config``. The framework is ``publisher.settings``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from publisher.settings import (
    DAY,
    DICT_KEYS,
    ENV_PREFIX,
    HOUR,
    ConfigError,
    Key,
    Settings,
    as_bind_host,
    as_bool,
    as_cpu_list,
    as_dict,
    as_endpoint_url,
    as_event_uri,
    as_http_url,
    as_object_store,
    as_opt_str,
    as_port,
    as_registry_settings,
    choice,
    is_secret_setting,
    number,
    redact_mapping,
    redact_url,
    setting,
)

# What objects are stored in: ``native`` is what the model runs in (resolved at engine start, below).
STORED_DTYPES = ("float32", "float16", "bfloat16")
STORAGE_DTYPES = ("native", *STORED_DTYPES)
BACKPRESSURE_POLICIES = ("block", "drop")

__all__ = ["PublisherConfig", "KEYS", "ConfigError", "Key", "default_data_dir", "redact_mapping", "redact_url",
           "resolve_storage_dtype"]


def resolve_storage_dtype(storage_dtype: str, model_dtype: Any) -> str:
    """``storage_dtype`` as objects are stored: ``native`` becomes the dtype the model runs in.

    ``model_dtype`` is vLLM's ``model_config.dtype`` (a torch dtype; its name is enough, so
    this stays torch-free). The object key names the dtype and the scheduler computes keys
    without asking the worker, so both halves resolve ``native`` here, once, from the same
    config. A model dtype objects cannot hold (float64, fp8) is stored as float32.
    """
    if storage_dtype != "native":
        return storage_dtype
    name = str(model_dtype).removeprefix("torch.")
    name = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)
    return name if name in STORED_DTYPES else "float32"


def default_data_dir() -> Path:
    """Where the embedded defaults keep objects and events: ``$XDG_DATA_HOME/vllm-mm-events``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "vllm-mm-events"


@dataclasses.dataclass(frozen=True, repr=False)
class PublisherConfig(Settings):
    object_store: str = setting(lambda: (default_data_dir() / "objects").as_uri(), as_object_store,
                                "Where embeddings go: s3://bucket/prefix or file:///dir.")
    s3_endpoint_url: str | None = setting(lambda: os.environ.get("AWS_ENDPOINT_URL") or None, as_endpoint_url,
                                          "S3 endpoint for MinIO and other S3-compatible stores.")
    s3_region: str | None = setting(
        lambda: os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None, as_opt_str,
        "S3 region.")
    event_sink: str = setting(lambda: (default_data_dir() / "events.avro").as_uri(), as_event_uri,
                              "Where events go: kafka://host:port[,host:port]/topic or file:///path/events.avro.")
    kafka: dict = setting(dict, as_dict, "librdkafka settings passed through (security, SASL, TLS, compression).")
    schema_registry_url: str | None = setting(
        lambda: None, as_http_url, "Confluent-compatible Schema Registry; when set values use its wire format.")
    schema_registry: dict = setting(dict, as_registry_settings,
                                    "Extra Schema Registry client settings (basic.auth.user.info, ssl.*).")
    storage_dtype: str = setting(
        lambda: "native", choice(STORAGE_DTYPES),
        "dtype of the stored tensors: native (what the model runs in, e.g. bfloat16: no conversion, half the "
        "bytes of float32) or float32, float16, bfloat16.")
    publish_text_only: bool = setting(lambda: False, as_bool, "Also publish events for requests without media.")
    allow_client_embeddings: bool = setting(
        lambda: False, as_bool, "Accept media sent as client-computed embeddings (events mark them CLIENT).")
    max_metadata_bytes: int = setting(
        lambda: 16 << 10, number(int, 0),
        "Largest request metadata (vllm_xargs) published; a media request over it is refused up front.")
    return_params: str = setting(
        lambda: "full", choice(("full", "ids")),
        "ec_transfer_params for the caller: full (object URIs and S3 endpoint, for load_mm_embeddings) or "
        "ids (event id and item hashes only: no store locations for API clients).")
    spool_dir: str | None = setting(
        lambda: str(default_data_dir() / "spool"), as_opt_str,
        "Durable outbox: finished requests wait here until their events are delivered, and are replayed "
        "after a restart (empty: no outbox).")
    durable_before_return: bool = setting(
        lambda: False, as_bool,
        "Hold each step's responses until their requests are fsynced into the spool: no window in which a "
        "returned request's event could be lost with the node (costs one group fsync per step on vLLM's "
        "scheduler loop; see the README). Needs spool_dir.")
    max_spool_bytes: int = setting(lambda: 1 << 30, number(int, 1 << 20),
                                   "Outbox size cap; then the backpressure policy applies.")
    backpressure: str = setting(
        lambda: "block", choice(BACKPRESSURE_POLICIES),
        "When in-flight limits are hit: block the engine until there is room, or drop and count.")
    max_inflight_bytes: int = setting(lambda: 512 << 20, number(int, 1 << 20),
                                      "Worker: bytes of captured tensors waiting for upload.")
    max_pending_events: int = setting(lambda: 10000, number(int, 1),
                                      "Scheduler: events waiting for objects or the sink.")
    upload_threads: int = setting(lambda: 2, number(int, 1, 64), "Worker: parallel object uploads.")
    durability_timeout_s: float = setting(
        lambda: 60.0, number(float, 0.1, DAY),
        "How long an event waits for its objects before it is published without them.")
    shutdown_timeout_s: float = setting(lambda: 15.0, number(float, 0.0, HOUR), "Bounded flush on engine shutdown.")
    fsync: bool = setting(lambda: True, as_bool,
                          "Local store and event log: fsync before calling an object durable.")
    metrics_port: int = setting(
        lambda: 0, as_port,
        "Prometheus /metrics of the publisher's sidecars on this host, summed (0: off). The first sidecar "
        "to bind it serves every sidecar's metrics.")
    sidecar_cpus: str | None = setting(
        lambda: None, as_cpu_list,
        "CPUs the publisher's sidecars run on, as a list such as 2-3,8 (empty: every CPU the pod may use). On a "
        "GPU host, cores the engine's own threads leave free, so serialization, hashing and uploads never "
        "take a core from vLLM's loops.")
    metrics_host: str = setting(lambda: "0.0.0.0", as_bind_host, "Address the publisher's metrics server binds.")
    reuse_stored_embeddings: bool = setting(
        lambda: False, as_bool,
        "Load an item's stored encoder output instead of running the encoder when this model's encoder "
        "already stored it for the same processed input (another replica, an earlier run): checked against the "
        "object's metadata and input digest, and its SHA-256, before use. Whoever can write the object store "
        "can then change what the model sees: use only a store the operator controls (README).")
    reuse_wait_ms: float = setting(
        lambda: 200.0, number(float, 0.0, 60_000.0),
        "reuse_stored_embeddings: how long a new request waits for its items to be fetched and checked "
        "before the encoder runs them instead.")
    reuse_cache_bytes: int = setting(
        lambda: 256 << 20, number(int, 1 << 20),
        "reuse_stored_embeddings: size of the staging ring (under /dev/shm) where fetched embeddings wait to be "
        "loaded; when it is full of items promised to the engine, further items are encoded.")
    topic_partitions: int = setting(
        lambda: 0, number(int, 0),
        "Create the Kafka topic with this many partitions if missing (0: leave to the broker).")

    def __post_init__(self) -> None:
        if self.durable_before_return and not self.spool_dir:
            raise ConfigError("durable_before_return: needs spool_dir (the spool is what the response waits for)")

    def resolved(self, model_dtype: Any) -> "PublisherConfig":
        """This config with ``storage_dtype`` concrete (``resolve_storage_dtype``): what both halves of the
        connector, their sidecars and the events use."""
        dtype = resolve_storage_dtype(self.storage_dtype, model_dtype)
        return self if dtype == self.storage_dtype else dataclasses.replace(self, storage_dtype=dtype)

    @classmethod
    def load(cls, extra_config: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> "PublisherConfig":
        """All layers; ``extra_config`` is vLLM's ``ec_connector_extra_config`` (may name ``config_file``)."""
        extra = dict(extra_config or {})
        refuse_secrets_in_extra_config(extra)
        config_file = extra.pop("config_file", None)
        return cls.from_dict(cls.merged(extra, environ, config_file))


KEYS: dict[str, Key] = PublisherConfig.keys()


def refuse_secrets_in_extra_config(extra: Mapping[str, Any]) -> None:
    """vLLM logs ``ec_connector_extra_config`` in clear at start (its "non-default args" line, for ``vllm serve``
    and ``LLM(...)`` alike), before the connector can mask anything: a secret there is refused, naming where
    it goes instead. Checked before any other key, so no error of this config echoes it."""
    for key in DICT_KEYS:
        settings = extra.get(key)
        if isinstance(settings, Mapping):
            for name in settings:
                if isinstance(name, str) and is_secret_setting(name):
                    env = f"{ENV_PREFIX}{key.upper()}__{name.upper().replace('.', '_')}"
                    raise ConfigError(f"{key}.{name}: a secret in ec_connector_extra_config, which vLLM logs in "
                                      f"clear at start; set {env} (a Kubernetes Secret) or put it in config_file")
    url = extra.get("schema_registry_url")  # the one URL that may carry credentials (the other URLs refuse them)
    if isinstance(url, str) and redact_url(url) != url:
        raise ConfigError(f"schema_registry_url: credentials in ec_connector_extra_config, which vLLM logs in clear "
                          f"at start; set {ENV_PREFIX}SCHEMA_REGISTRY_URL or "
                          f"{ENV_PREFIX}SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO, or put it in config_file")

