"""One typed configuration for the consumer (``vllm-mm-events consume``).

Sources, later ones winning: defaults < a JSON/YAML file (``--config`` or
``VLLM_MM_EVENTS_CONSUMER_CONFIG_FILE``) < ``VLLM_MM_EVENTS_<KEY>`` env vars < command-line
flags. The connection keys (``kafka``, ``s3_endpoint_url``, ``schema_registry*``) read the
same env vars as the publisher, including ``VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD``-style
secrets, so one Kubernetes Secret serves both. Errors name the key; ``redacted()`` is the
only form that may be logged.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from publisher.config import KEYS as PUBLISHER_KEYS
from publisher.config import (
    ConfigError, Key, _as_bool, _as_opt_str, _as_str, _choice, _number, _read_file, as_event_uri, env_layer,
    merge_layers, parse_keys, redact_mapping, redact_url,
)

ENV_CONFIG_FILE = "VLLM_MM_EVENTS_CONSUMER_CONFIG_FILE"
POOLINGS = ("mean", "first", "max", "none")
DISTANCES = ("cosine", "dot", "l2")
SINK_SCHEMES = ("qdrant", "pgvector", "milvus", "lancedb")
LOG_FORMATS = ("text", "json")

__all__ = ["ConfigError", "ConsumerConfig", "KEYS", "POOLINGS", "DISTANCES", "SINK_SCHEMES"]


def _as_sink(v: Any, key: str) -> str:
    v = _as_str(v, key)
    u = urlsplit(v)
    if u.scheme not in SINK_SCHEMES:
        raise ConfigError(f"{key}: unknown sink {u.scheme + '://' if u.scheme else redact_url(v)!r}; expected one of "
                          + ", ".join(f"{s}://" for s in SINK_SCHEMES))
    if u.password:
        raise ConfigError(f"{key}: put no password in the sink URI ({redact_url(v)!r}); use PGPASSWORD, "
                          "QDRANT_API_KEY or MILVUS_TOKEN")
    parts = [p for p in unquote(u.path).split("/") if p]
    if u.scheme == "pgvector":
        if not u.hostname or len(parts) != 2:
            raise ConfigError(f"{key}: expected pgvector://user@host:port/database/table, got {redact_url(v)!r}")
    elif u.scheme in ("qdrant", "milvus"):
        if not u.netloc and len(parts) < 2:
            raise ConfigError(f"{key}: expected {u.scheme}://host:port/collection or "
                              f"{u.scheme}:///absolute/path/collection (local mode), got {v!r}")
        if u.netloc and len(parts) != 1:
            raise ConfigError(f"{key}: expected {u.scheme}://host:port/collection, got {redact_url(v)!r}")
    elif u.scheme == "lancedb":
        if u.netloc or len(parts) < 2:
            raise ConfigError(f"{key}: expected lancedb:///absolute/dir/table, got {v!r}")
    name = parts[-1] if parts else ""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
        raise ConfigError(f"{key}: collection/table name {name!r} must be letters, digits and '_' "
                          "(not starting with a digit), at most 63 characters")
    return v


def _as_sinks(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [s for s in (x.strip() for x in v.split(",")) if s] if "://" in v else v
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f"{key}: expected at least one sink URI (qdrant://, pgvector://, milvus://, lancedb://)")
    return tuple(_as_sink(s, f"{key}[{i}]") for i, s in enumerate(v))


def _as_dlq(v: Any, key: str) -> str | None:
    v = _as_opt_str(v, key)
    if v is None or v == "none":
        return v
    return as_event_uri(v, key)


def _as_port(v: Any, key: str) -> int:
    n = _number(int, 0)(v, key)
    if n > 65535:
        raise ConfigError(f"{key}: expected a TCP port 0-65535 (0: no metrics server), got {n}")
    return n


# The one table of settings: flags, env vars, file keys, defaults and docs all come from it.
KEYS: dict[str, Key] = {
    "source": Key(lambda: None, as_event_uri, "kafka://host:port[,host:port]/topic or file:///path/events.avro."),
    "sinks": Key(lambda: None, _as_sinks, "One or more vector stores: qdrant://, pgvector://, milvus://, lancedb://."),
    "group": Key(lambda: "vllm-mm-events-indexer", _as_str,
                 "Kafka consumer group; for a file source, names its checkpoint."),
    "pooling": Key(lambda: "mean", _choice(POOLINGS),
                   "(num_features, hidden) -> indexed vector: mean, first, max, or none (multi-vector)."),
    "normalize": Key(lambda: False, _as_bool, "L2-normalise vectors before indexing (and searching)."),
    "distance": Key(lambda: "cosine", _choice(DISTANCES), "Distance of a collection the consumer creates."),
    "dlq": Key(lambda: None, _as_dlq,
               "Dead letters: kafka://.../topic or file:///path.jsonl (default: <topic>.dlq, or <events>.dlq.jsonl)."),
    "checkpoint": Key(lambda: None, _as_opt_str,
                      "File source: where the committed position is kept (default: next to the log)."),
    "batch_max_records": Key(lambda: 256, _number(int, 1), "A batch closes at this many events..."),
    "batch_max_bytes": Key(lambda: 64 << 20, _number(int, 1 << 10), "...or this many embedding bytes..."),
    "batch_linger_ms": Key(lambda: 200, _number(int, 0), "...or when its first event is this old."),
    "fetch_threads": Key(lambda: 8, _number(int, 1), "Parallel object fetches."),
    "poll_timeout_s": Key(lambda: 1.0, _number(float, 0.01), "How long one poll waits for new events."),
    "shutdown_timeout_s": Key(lambda: 25.0, _number(float, 0.0), "SIGTERM: time to finish the batch in flight."),
    "metrics_port": Key(lambda: 9400, _as_port, "Prometheus /metrics and /healthz (0: off)."),
    "progress_interval_s": Key(lambda: 10.0, _number(float, 0.1), "How often a progress line is logged."),
    "log_format": Key(lambda: "text", _choice(LOG_FORMATS), "text, or json (one object per line)."),
    # Connections: the publisher's own entries (same env vars, same defaults).
    **{k: PUBLISHER_KEYS[k] for k in ("s3_endpoint_url", "s3_region", "kafka", "schema_registry_url",
                                      "schema_registry")},
}


@dataclasses.dataclass(frozen=True)
class ConsumerConfig:
    source: str
    sinks: tuple[str, ...]
    group: str
    pooling: str
    normalize: bool
    distance: str
    dlq: str | None
    checkpoint: str | None
    batch_max_records: int
    batch_max_bytes: int
    batch_linger_ms: int
    fetch_threads: int
    poll_timeout_s: float
    shutdown_timeout_s: float
    metrics_port: int
    progress_interval_s: float
    log_format: str
    s3_endpoint_url: str | None
    s3_region: str | None
    kafka: dict
    schema_registry_url: str | None
    schema_registry: dict

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
             config_file: str | None = None, required: tuple[str, ...] = ("source", "sinks")) -> "ConsumerConfig":
        environ = os.environ if environ is None else environ
        config_file = config_file or environ.get(ENV_CONFIG_FILE)
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        raw = merge_layers([_read_file(config_file) if config_file else {}, env_layer(KEYS, environ), flags])
        for key in required:
            if raw.get(key) in (None, "", [], ()):
                env = "VLLM_MM_EVENTS_" + key.upper()
                raise ConfigError(f"{key}: required; pass --{key.rstrip('s').replace('_', '-')} or set {env}")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ConsumerConfig":
        return cls(**parse_keys(KEYS, raw))

    def redacted(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kafka"] = redact_mapping(self.kafka)
        d["schema_registry"] = redact_mapping(self.schema_registry)
        d["source"] = redact_url(self.source) if self.source else None
        d["sinks"] = [redact_url(s) for s in self.sinks or ()]
        d["dlq"] = redact_url(self.dlq) if self.dlq else None
        if self.schema_registry_url:
            d["schema_registry_url"] = redact_url(self.schema_registry_url)
        return d

    def __repr__(self) -> str:
        return f"ConsumerConfig({self.redacted()!r})"
