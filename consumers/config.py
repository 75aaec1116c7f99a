"""The consumer's typed configuration (``vllm-mm-events consume|search``).

Layers, later ones winning: defaults < a JSON/YAML file (``--config`` or
``VLLM_MM_EVENTS_CONSUMER_CONFIG_FILE``) < ``VLLM_MM_EVENTS_<KEY>`` env vars < command-line
flags. The connection keys (``kafka``, ``s3_endpoint_url``, ``schema_registry*``) are the
publisher's own, read from the same env vars, including
``VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD``-style secrets, so one Kubernetes Secret serves both.
The framework is ``publisher.settings``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Mapping
from urllib.parse import quote, unquote

from consumers.vectors import POOLINGS
from publisher.config import KEYS as PUBLISHER_KEYS
from publisher.config import default_data_dir
from publisher.settings import (
    DAY,
    ENV_PREFIX,
    HOUR,
    ConfigError,
    Key,
    Settings,
    as_bind_host,
    as_bool,
    as_event_uri,
    as_object_store,
    as_opt_str,
    as_port,
    as_str,
    choice,
    number,
    redact_url,
    setting,
    setting_from,
    split_url,
)

ENV_CONFIG_FILE = "VLLM_MM_EVENTS_CONSUMER_CONFIG_FILE"
DISTANCES = ("cosine", "dot", "l2")
SINK_SCHEMES = ("qdrant", "pgvector", "milvus", "lancedb")
LOG_FORMATS = ("text", "json")

DEFAULT_TABLE = "mm_embeddings"
GROUP_PREFIX = "vllm-mm-events-"

__all__ = ["ConfigError", "ConsumerConfig", "KEYS", "POOLINGS", "DISTANCES", "SINK_SCHEMES", "Key",
           "default_source", "default_sink", "default_group"]


def default_source() -> str:
    """The publisher's embedded event log: ``file://<data dir>/events.avro`` (its own default ``event_sink``)."""
    return (default_data_dir() / "events.avro").as_uri()


def default_sink() -> str:
    """The embedded vector store: LanceDB beside the log, ``lancedb://<data dir>/lancedb/mm_embeddings``."""
    return "lancedb://" + quote(str(default_data_dir() / "lancedb" / DEFAULT_TABLE))


def _without_user(uri: str) -> str:
    """``scheme://user@host/path`` -> ``scheme://host/path`` (the path as it is, an ``@`` in it included)."""
    scheme, sep, rest = uri.partition("://")
    authority, slash, path = rest.partition("/")
    return scheme + sep + authority.rpartition("@")[2] + slash + path


def default_group(sinks: tuple[str, ...] | list[str]) -> str:
    """The consumer group of a set of sinks when none is named: each new set starts from the beginning.

    ``vllm-mm-events-<scheme>-<table>[-<scheme>-<table>...]-<hash>``: the readable part names each
    sink's scheme and collection (never a host, user or password); the hash (SHA-256, 10 hex digits)
    is of the sorted, de-duplicated sink URIs with any ``user:password@`` removed from the authority,
    so it is stable across runs and credential changes, independent of flag order, and differs per
    set of stores.
    """
    uris = sorted({_without_user(s) for s in sinks})  # no user, no password
    digest = hashlib.sha256("\n".join(uris).encode()).hexdigest()[:10]
    names = []
    for u in uris:
        scheme, _, rest = u.partition("://")
        name = unquote(rest.split("?", 1)[0]).rstrip("/").rpartition("/")[2]
        names.append(f"{scheme}-{name}" if name else scheme)
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", "-".join(names))[:80].rstrip("-")
    return f"{GROUP_PREFIX}{slug}-{digest}"


def _as_sink(v: Any, key: str) -> str:
    v = as_str(v, key)
    u = split_url(v, key)
    try:
        u.port  # noqa: B018 - the sink's client reads it; a bad one is a config error here
    except ValueError:  # its message quotes the text after the ':', a password's head where one holds a '/'
        raise ConfigError(f"{key}: the port in {redact_url(v)!r} is not a number from 0 to 65535") from None
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


def _as_object_stores(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f"{key}: expected one or more object stores (s3://bucket/prefix or file:///dir)")
    return tuple(as_object_store(s, f"{key}[{i}]") for i, s in enumerate(v))


def _as_dlq(v: Any, key: str) -> str | None:
    v = as_opt_str(v, key)
    if v is None or v == "none":
        return v
    return as_event_uri(v, key)


@dataclasses.dataclass(frozen=True, repr=False)
class ConsumerConfig(Settings):
    CONFIG_FILE_ENV = ENV_PREFIX + "CONSUMER_CONFIG_FILE"

    source: str = setting(default_source, as_event_uri,
                          "kafka://host:port[,host:port]/topic or file:///path/events.avro (default: the "
                          "publisher's embedded log, file://<data dir>/events.avro).")
    sinks: tuple[str, ...] = setting(lambda: (default_sink(),), _as_sinks,
                                     "One or more vector stores: qdrant://, pgvector://, milvus://, lancedb:// "
                                     "(default: lancedb://<data dir>/lancedb/mm_embeddings).")
    group: str = setting(lambda: None, as_opt_str,
                         "Kafka consumer group; for a file source, names its checkpoint (default: derived from "
                         "the sinks, vllm-mm-events-<scheme>-<table>-<hash>, so a new set of sinks starts from "
                         "the beginning).")
    pooling: str = setting(lambda: "mean", choice(POOLINGS),
                           "(num_features, hidden) -> indexed vector: mean, first, max, or none (multi-vector).")
    normalize: bool = setting(lambda: False, as_bool, "L2-normalise vectors before indexing (and searching).")
    distance: str = setting(lambda: "cosine", choice(DISTANCES), "Distance of a collection the consumer creates.")
    dlq: str | None = setting(
        lambda: None, _as_dlq,
        "Dead letters: kafka://.../topic or file:///path.jsonl (default: <topic>.dlq, or <events>.dlq.jsonl).")
    checkpoint: str | None = setting(lambda: None, as_opt_str,
                                     "File source: where the committed position is kept (default: next to the log).")
    batch_max_records: int = setting(lambda: 256, number(int, 1), "A batch closes at this many events...")
    batch_max_bytes: int = setting(lambda: 64 << 20, number(int, 1 << 10), "...or this many embedding bytes...")
    batch_linger_ms: int = setting(lambda: 200, number(int, 0, 600_000), "...or when its first event is this old.")
    fetch_threads: int = setting(lambda: 8, number(int, 1, 256), "Parallel object fetches.")
    # Bounded well inside /healthz's 120 s: an idle consumer's loop turns once per poll.
    poll_timeout_s: float = setting(lambda: 1.0, number(float, 0.01, 30.0), "How long one poll waits for new events.")
    shutdown_timeout_s: float = setting(lambda: 25.0, number(float, 0.0, HOUR),
                                        "SIGTERM: time to finish the batch in flight.")
    object_store: tuple[str, ...] = setting(
        lambda: (PUBLISHER_KEYS["object_store"].default(),), _as_object_stores,
        "The store(s) objects may be read from (the publisher's form; comma-separated in env). An event "
        "naming any other object is dead-lettered (forbidden_object) and never opened.")
    max_object_bytes: int = setting(lambda: 256 << 20, number(int, 1),
                                    "Largest object read (the event's size_bytes, and while reading).")
    permanent_error_retries: int = setting(
        lambda: 5, number(int, 0),
        "Retries of a read the store refuses for good (access denied, no bucket, not a file) before dead-lettering.")
    stall_timeout_s: float = setting(
        lambda: 300.0, number(float, 1.0, DAY),
        "/healthz turns 503 when a batch has been in work this long without a call being started for it "
        "(a wedged writer; one retrying through an outage keeps trying).")
    metrics_port: int = setting(lambda: 9400, as_port, "Prometheus /metrics and /healthz (0: off).")
    metrics_host: str = setting(lambda: "0.0.0.0", as_bind_host, "Address the metrics server binds.")
    progress_interval_s: float = setting(lambda: 10.0, number(float, 0.1, DAY), "How often a progress line is logged.")
    log_format: str = setting(lambda: "text", choice(LOG_FORMATS), "text, or json (one object per line).")
    # Connections: the publisher's own keys (same env vars, same defaults).
    s3_endpoint_url: str | None = setting_from(PUBLISHER_KEYS["s3_endpoint_url"])
    s3_region: str | None = setting_from(PUBLISHER_KEYS["s3_region"])
    kafka: dict = setting_from(PUBLISHER_KEYS["kafka"])
    schema_registry_url: str | None = setting_from(PUBLISHER_KEYS["schema_registry_url"])
    schema_registry: dict = setting_from(PUBLISHER_KEYS["schema_registry"])

    def __post_init__(self) -> None:
        if self.group is None and self.sinks:
            object.__setattr__(self, "group", default_group(self.sinks))
        if (self.source or "").startswith("file:") and self.group and not self.checkpoint \
                and not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", self.group):
            # The file source keeps the group's position in <log>.<group>.checkpoint, next to the log.
            raise ConfigError(f"group: {self.group!r} names the file source's checkpoint file, so it may only hold "
                              "letters, digits, '.', '_' and '-' (or set checkpoint)")

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
             config_file: str | None = None, required: tuple[str, ...] = ()) -> "ConsumerConfig":
        """All layers; ``flags`` are the command line's (None values are not given)."""
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        raw = cls.merged(flags, environ, config_file)
        for key in required:
            if raw.get(key) in (None, "", [], ()):
                env = ENV_PREFIX + key.upper()
                raise ConfigError(f"{key}: required; pass --{key.rstrip('s').replace('_', '-')} or set {env}")
        return cls.from_dict(raw)


KEYS: dict[str, Key] = ConsumerConfig.keys()
