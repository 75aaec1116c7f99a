"""One typed configuration for the publisher.

Sources, later ones winning: built-in defaults < a JSON/YAML file (``config_file`` key or
``VLLM_MM_EVENTS_CONFIG_FILE``) < ``VLLM_MM_EVENTS_<KEY>`` env vars < vLLM's
``ec_connector_extra_config``. Everything is validated once, at engine start; an error
names the key and what it expected. ``redacted()`` is the only form that may be logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

ENV_PREFIX = "VLLM_MM_EVENTS_"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
BACKPRESSURE_POLICIES = ("block", "drop")

# Keys inside the `kafka` / `schema_registry` dicts whose values are secrets.
_SECRET_KEY_RE = re.compile(r"(password|secret|token|credential|user\.info|private|sasl\.oauthbearer\.config)", re.I)


class ConfigError(ValueError):
    """Raised for invalid publisher configuration; the message names the key."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "vllm-mm-events"


# ---- value parsers: (raw value, key) -> typed value, raising ConfigError ---------------

def _as_str(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key}: expected a non-empty string, got {type(v).__name__} {_short(v)}")
    return v


def _as_opt_str(v: Any, key: str) -> str | None:
    return None if v in (None, "") else _as_str(v, key)


def _as_bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected a boolean (true/false), got {_short(v)}")


def _number(kind: type, minimum: float) -> Callable[[Any, str], Any]:
    def parse(v: Any, key: str):
        if isinstance(v, bool):
            raise ConfigError(f"{key}: expected a {kind.__name__} >= {minimum}, got a boolean")
        try:
            n = kind(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a {kind.__name__} >= {minimum}, got {_short(v)}") from None
        if kind is int and isinstance(v, float) and v != n:
            raise ConfigError(f"{key}: expected an integer, got {v}")
        if n < minimum:
            raise ConfigError(f"{key}: expected a {kind.__name__} >= {minimum}, got {n}")
        return n
    return parse


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(v: Any, key: str) -> str:
        if v not in options:
            raise ConfigError(f"{key}: expected one of {', '.join(options)}; got {_short(v)}")
        return v
    return parse


def _as_dict(v: Any, key: str) -> dict[str, Any]:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: expected a JSON object, could not parse it ({e.msg})") from None
    if not isinstance(v, Mapping):
        raise ConfigError(f"{key}: expected a mapping of settings, got {type(v).__name__}")
    for k, item in v.items():
        if not isinstance(k, str):
            raise ConfigError(f"{key}: setting names must be strings, got {k!r}")
        if not isinstance(item, (str, int, float, bool)):
            raise ConfigError(f"{key}.{k}: expected a string, number or boolean, got {type(item).__name__}")
    return dict(v)


def _as_object_store(v: Any, key: str) -> str:
    v = _as_str(v, key)
    u = urlsplit(v)
    if u.scheme == "s3":
        if not u.netloc:
            raise ConfigError(f"{key}: expected s3://bucket/prefix, the bucket is missing in {v!r}")
        return v
    if u.scheme == "file":
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise ConfigError(f"{key}: expected file:///absolute/dir, got {v!r}")
        return v
    raise ConfigError(f"{key}: expected s3://bucket/prefix or file:///dir, got {v!r}")


def as_event_uri(v: Any, key: str) -> str:
    """An event stream: where the publisher writes and the consumer reads."""
    v = _as_str(v, key)
    u = urlsplit(v)
    if u.scheme == "kafka":
        topic = u.path.lstrip("/")
        if not u.netloc or not topic or "/" in topic:
            raise ConfigError(f"{key}: expected kafka://host:port[,host:port]/topic, got {redact_url(v)!r}")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", topic):
            raise ConfigError(f"{key}: Kafka topic {topic!r} may only hold letters, digits, '.', '_' and '-'")
        for hostport in u.netloc.split(","):
            if not re.fullmatch(r"[^:@/\s]+:\d{1,5}", hostport):
                raise ConfigError(f"{key}: expected host:port in the broker list, got {hostport!r}")
        return v
    if u.scheme == "file":
        if u.netloc not in ("", "localhost") or not u.path.startswith("/") or u.path.endswith("/"):
            raise ConfigError(f"{key}: expected file:///path/events.avro, got {v!r}")
        return v
    raise ConfigError(f"{key}: expected kafka://host:port/topic or file:///path/events.avro, got {redact_url(v)!r}")


def _as_http_url(v: Any, key: str) -> str | None:
    v = _as_opt_str(v, key)
    if v is None:
        return None
    u = urlsplit(v)
    if u.scheme not in ("http", "https", "mock") or not u.netloc:
        raise ConfigError(f"{key}: expected an http(s):// URL, got {redact_url(v)!r}")
    return v


@dataclasses.dataclass(frozen=True)
class Key:
    default: Callable[[], Any]
    parse: Callable[[Any, str], Any]
    doc: str


# The one table of settings: parsing, defaults and env vars all come from it.
KEYS: dict[str, Key] = {
    "object_store": Key(lambda: (default_data_dir() / "objects").as_uri(), _as_object_store,
                        "Where embeddings go: s3://bucket/prefix or file:///dir."),
    "s3_endpoint_url": Key(lambda: os.environ.get("AWS_ENDPOINT_URL") or None, _as_http_url,
                           "S3 endpoint for MinIO and other S3-compatible stores."),
    "s3_region": Key(lambda: os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
                     _as_opt_str, "S3 region."),
    "event_sink": Key(lambda: (default_data_dir() / "events.avro").as_uri(), as_event_uri,
                      "Where events go: kafka://host:port[,host:port]/topic or file:///path/events.avro."),
    "kafka": Key(dict, _as_dict, "librdkafka settings passed through (security, SASL, TLS, compression)."),
    "schema_registry_url": Key(lambda: None, _as_http_url,
                               "Confluent-compatible Schema Registry; when set values use its wire format."),
    "schema_registry": Key(dict, _as_dict, "Extra Schema Registry client settings (basic.auth.user.info, ssl.*)."),
    "storage_dtype": Key(lambda: "float32", _choice(STORAGE_DTYPES), "dtype of the stored tensors."),
    "publish_text_only": Key(lambda: False, _as_bool, "Also publish events for requests without media."),
    "allow_client_embeddings": Key(lambda: False, _as_bool,
                                   "Accept media sent as client-computed embeddings (events mark them CLIENT)."),
    "backpressure": Key(lambda: "block", _choice(BACKPRESSURE_POLICIES),
                        "When in-flight limits are hit: block the engine until there is room, or drop and count."),
    "max_inflight_bytes": Key(lambda: 512 << 20, _number(int, 1 << 20),
                              "Worker: bytes of captured tensors waiting for upload."),
    "max_pending_events": Key(lambda: 10000, _number(int, 1), "Scheduler: events waiting for objects or the sink."),
    "upload_threads": Key(lambda: 2, _number(int, 1), "Worker: parallel object uploads."),
    "durability_timeout_s": Key(lambda: 60.0, _number(float, 0.1),
                                "How long an event waits for its objects before it is published without them."),
    "shutdown_timeout_s": Key(lambda: 15.0, _number(float, 0.0), "Bounded flush on engine shutdown."),
    "fsync": Key(lambda: True, _as_bool, "Local store and event log: fsync before calling an object durable."),
    "topic_partitions": Key(lambda: 0, _number(int, 0),
                            "Create the Kafka topic with this many partitions if missing (0: leave to the broker)."),
}


@dataclasses.dataclass(frozen=True)
class PublisherConfig:
    object_store: str
    s3_endpoint_url: str | None
    s3_region: str | None
    event_sink: str
    kafka: dict
    schema_registry_url: str | None
    schema_registry: dict
    storage_dtype: str
    publish_text_only: bool
    allow_client_embeddings: bool
    backpressure: str
    max_inflight_bytes: int
    max_pending_events: int
    upload_threads: int
    durability_timeout_s: float
    shutdown_timeout_s: float
    fsync: bool
    topic_partitions: int

    @classmethod
    def load(cls, extra_config: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> "PublisherConfig":
        environ = os.environ if environ is None else environ
        extra = dict(extra_config or {})
        cfg_file = extra.pop("config_file", None) or environ.get(ENV_PREFIX + "CONFIG_FILE")
        layers = [_read_file(cfg_file) if cfg_file else {}, env_layer(KEYS, environ), extra]
        return cls.from_dict(merge_layers(layers))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "PublisherConfig":
        return cls(**parse_keys(KEYS, raw))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def redacted(self) -> dict[str, Any]:
        """The config with every secret masked: the only form fit for logs."""
        d = self.to_dict()
        d["kafka"] = redact_mapping(self.kafka)
        d["schema_registry"] = redact_mapping(self.schema_registry)
        d["event_sink"] = redact_url(self.event_sink)
        if self.schema_registry_url:
            d["schema_registry_url"] = redact_url(self.schema_registry_url)
        return d

    def __repr__(self) -> str:  # never leak secrets through a stray repr()
        return f"PublisherConfig({self.redacted()!r})"


def parse_keys(keys: Mapping[str, Key], raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``raw`` against a key table: unknown keys and bad values raise, naming the key."""
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; expected one of {', '.join(keys)}")
    values = {}
    for key, spec in keys.items():
        value = raw[key] if key in raw else spec.default()
        values[key] = None if value is None else spec.parse(value, key)
    return values


# Settings dicts merge across sources per setting, so a Kubernetes Secret can supply
# `sasl.password` as an env var while the rest of the Kafka settings sit in extra_config.
DICT_KEYS = ("kafka", "schema_registry")


def env_layer(keys: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``VLLM_MM_EVENTS_<KEY>`` values, plus ``VLLM_MM_EVENTS_<DICTKEY>__<SETTING>`` entries.

    ``VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD`` becomes ``kafka["sasl.password"]``: the setting
    is lower-cased with ``_`` read as ``.`` (librdkafka and registry settings use dots only).
    """
    raw: dict[str, Any] = {}
    for key in keys:
        env = environ.get(ENV_PREFIX + key.upper())
        if env is not None:
            raw[key] = env
    for key in DICT_KEYS:
        if key not in keys:
            continue
        prefix = f"{ENV_PREFIX}{key.upper()}__"
        settings = {name[len(prefix):].lower().replace("_", "."): value
                    for name, value in environ.items() if name.startswith(prefix) and len(name) > len(prefix)}
        if settings:
            raw[f"{key}__settings"] = settings
    return raw


def merge_layers(layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Later layers win; the settings dicts merge setting by setting."""
    raw: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key.endswith("__settings"):
                key = key[: -len("__settings")]
                raw[key] = {**_as_dict(raw.get(key) or {}, key), **value}
            elif key in DICT_KEYS and key in raw:
                raw[key] = {**_as_dict(raw[key], key), **_as_dict(value, key)}
            else:
                raw[key] = value
    return raw


def redact_mapping(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("***" if _SECRET_KEY_RE.search(k) else v) for k, v in m.items()}


def redact_url(url: str) -> str:
    """Drop any user:password@ from a URL."""
    return re.sub(r"(?<=//)[^/@]*@", "***@", url)


def _read_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"config_file: cannot read {path}: {e.strerror}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml  # optional; only needed for YAML files

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is a config error
        raise ConfigError(f"config_file: {path} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config_file: {path} must hold a mapping of keys")
    return data


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
