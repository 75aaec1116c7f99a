"""The config framework shared by the publisher's and the consumer's typed configs.

A config is a frozen dataclass whose fields are declared with ``setting(default, parse, doc)``:
the field list is written once, and the key table (``keys()``), env var names, parsing,
defaults and redaction all derive from it. Layers, later ones winning: defaults < a JSON/YAML
file < ``VLLM_MM_EVENTS_<KEY>`` env vars < the caller's own (vLLM's extra config, or flags).
Every error is a ``ConfigError`` naming the key; ``redacted()`` is the only form fit for logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping
from urllib.parse import urlsplit

ENV_PREFIX = "VLLM_MM_EVENTS_"
# Settings dicts (librdkafka, registry client) merge across layers setting by setting, so a
# Kubernetes Secret can supply `sasl.password` as an env var while the rest sit elsewhere.
DICT_KEYS = ("kafka", "schema_registry")
# Keys inside settings dicts whose values are secrets.
# librdkafka's inline key material (ssl.key.pem, ssl.keystore.*) counts too.
_SECRET_KEY_RE = re.compile(r"(password|secret|token|credential|user\.info|private|sasl\.oauthbearer\.config"
                            r"|key\.pem|keystore|\.key$)", re.I)


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and what it expected."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One setting: its default (a callable, as defaults may read the environment), parser and doc."""

    default: Callable[[], Any]
    parse: Callable[[Any, str], Any]  # (raw value, key) -> typed value, raising ConfigError
    doc: str


def setting(default: Callable[[], Any], parse: Callable[[Any, str], Any], doc: str) -> Any:
    """Declare a config field; ``Settings.keys()`` reads it back."""
    return dataclasses.field(metadata={"key": Key(default, parse, doc)})


def setting_from(key: Key) -> Any:
    """Declare a field with another config's key (shared connection settings)."""
    return dataclasses.field(metadata={"key": key})


class Settings:
    """Base of the typed configs: derive keys from fields, parse layers, redact."""

    # The file layer's env var when the caller names none.
    CONFIG_FILE_ENV: ClassVar[str] = ENV_PREFIX + "CONFIG_FILE"

    @classmethod
    def keys(cls) -> dict[str, Key]:
        """The key table, in field order."""
        return {f.name: f.metadata["key"] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]):
        """Validate ``raw`` (unknown keys and bad values raise, naming the key); defaults fill the rest."""
        return cls(**parse_keys(cls.keys(), raw))

    @classmethod
    def merged(cls, top: Mapping[str, Any], environ: Mapping[str, str] | None = None,
               config_file: str | None = None) -> dict[str, Any]:
        """file < env < ``top``, unparsed (``from_dict`` parses)."""
        environ = os.environ if environ is None else environ
        config_file = config_file or environ.get(cls.CONFIG_FILE_ENV)
        return merge_layers([read_config_file(config_file) if config_file else {},
                             env_layer(cls.keys(), environ), top])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def redacted(self) -> dict[str, Any]:
        """Every settings dict masked, every URL stripped of userinfo: the only form fit for logs."""
        out = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                v = redact_mapping(v)
            elif isinstance(v, str) and "://" in v:
                v = redact_url(v)
            elif isinstance(v, (list, tuple)):
                v = [redact_url(x) if isinstance(x, str) else x for x in v]
            out[k] = v
        return out

    def __repr__(self) -> str:  # never leak secrets through a stray repr()
        return f"{type(self).__name__}({self.redacted()!r})"


# ---- layers ---------------------------------------------------------------------------------

def parse_keys(keys: Mapping[str, Key], raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``raw`` against a key table: unknown keys and bad values raise, naming the key."""
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; expected one of {', '.join(keys)}")
    values = {}
    for key, spec in keys.items():
        value = raw[key] if key in raw else spec.default()
        # None too (an explicit null, an empty YAML value): only a key that may be unset takes it.
        values[key] = spec.parse(value, key)
    return values


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
            if not isinstance(key, str):  # a YAML file's `1: x`
                raise ConfigError(f"{key!r}: keys are names, not {type(key).__name__}s")
            if key.endswith("__settings"):
                key = key[: -len("__settings")]
                raw[key] = {**as_dict(raw.get(key) or {}, key), **as_dict(value, key)}
            elif key in DICT_KEYS and key in raw:
                raw[key] = {**as_dict(raw[key], key), **as_dict(value, key)}
            else:
                raw[key] = value
    return raw


def read_config_file(path: str) -> dict[str, Any]:
    """A JSON or YAML (``.yaml``/``.yml``) file holding a mapping of keys."""
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


# ---- redaction --------------------------------------------------------------------------------

def is_secret_setting(name: str) -> bool:
    """Whether a librdkafka or registry setting of this name holds a secret."""
    return _SECRET_KEY_RE.search(name) is not None


def redact_mapping(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("***" if is_secret_setting(k) else v) for k, v in m.items()}


def redact_url(url: str) -> str:
    """Drop any user:password@ from a URL: everything from ``//`` to the last ``@`` (a password may hold
    ``/``, ``?`` or ``#``, which end the authority for a URL parser; masking too much is harmless)."""
    return re.sub(r"(?<=//).*@", "***@", url, flags=re.DOTALL)


# ---- value parsers: (raw value, key) -> typed value, raising ConfigError ------------------------

def short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def as_str(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key}: expected a non-empty string, got {type(v).__name__} {short(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # an unpaired surrogate (from undecodable bytes): no URI, path or name
        raise ConfigError(f"{key}: expected UTF-8 text, got {short(v)}") from None
    return v


def as_opt_str(v: Any, key: str) -> str | None:
    return None if v in (None, "") else as_str(v, key)


def as_bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected a boolean (true/false), got {short(v)}")


def number(kind: type, minimum: float, maximum: float | None = None) -> Callable[[Any, str], Any]:
    """A parser for an int or float of at least ``minimum`` (and at most ``maximum``: durations have one,
    as a wait of 1e300 s is a typo that would hang a shutdown or overflow a timer)."""
    want = f"{kind.__name__} >= {minimum}" if maximum is None else f"{kind.__name__} from {minimum} to {maximum}"

    def parse(v: Any, key: str):
        if isinstance(v, bool) or v is None:
            raise ConfigError(f"{key}: expected a {want}, got {'a boolean' if v is not None else 'null'}")
        try:
            n = kind(v)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a {want}, got {short(v)}") from None
        if kind is float and not math.isfinite(n):
            raise ConfigError(f"{key}: expected a finite {want}, got {short(v)}")
        if kind is int and isinstance(v, float) and v != n:
            raise ConfigError(f"{key}: expected an integer, got {v}")
        if n < minimum or (maximum is not None and n > maximum):
            raise ConfigError(f"{key}: expected a {want}, got {n}")
        return n
    return parse


HOUR, DAY = 3600.0, 86400.0  # bounds of durations in seconds


def as_port(v: Any, key: str) -> int:
    """A TCP port to listen on; 0 turns the server off."""
    n = number(int, 0)(v, key)
    if n > 65535:
        raise ConfigError(f"{key}: expected a TCP port 0-65535 (0: off), got {n}")
    return n


def as_bind_host(v: Any, key: str) -> str:
    """A host name or IP address to bind a server to."""
    v = as_str(v, key)
    if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", v):
        raise ConfigError(f"{key}: expected a host name or IP address to bind, got {v!r}")
    return v


MAX_CPU = 1 << 14  # past any host's CPU numbering: a typo, not a CPU


def parse_cpu_list(text: str) -> set[int]:
    """``"0-3,8"`` (the kernel's cpuset list format) as a set of CPU numbers; ValueError if malformed."""
    cpus: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d{1,5})(?:\s*-\s*(\d{1,5}))?\s*", part)
        if m is None:
            raise ValueError(f"{part.strip()!r} is not a CPU number or range")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if lo > hi or hi >= MAX_CPU:
            raise ValueError(f"{part.strip()!r} is not a range of CPU numbers below {MAX_CPU}")
        cpus.update(range(lo, hi + 1))
    return cpus


def as_cpu_list(v: Any, key: str) -> str | None:
    """A CPU list such as ``2-3,8`` (empty: none given)."""
    if v in (None, ""):
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    v = as_str(v, key)
    try:
        parse_cpu_list(v)
    except ValueError as e:
        raise ConfigError(f"{key}: expected a CPU list such as 2-3,8; {e}") from None
    return v


def choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    """A parser for one of ``options``."""
    def parse(v: Any, key: str) -> str:
        if v not in options:
            raise ConfigError(f"{key}: expected one of {', '.join(options)}; got {short(v)}")
        return v
    return parse


def as_dict(v: Any, key: str) -> dict[str, Any]:
    """A mapping of scalar settings, or its JSON text (null: none)."""
    if v is None:
        return {}
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


def split_url(v: str, key: str):
    """``urlsplit``, with its ValueError (unbalanced brackets, a bad IPv6 host) as a ConfigError."""
    try:
        return urlsplit(v)
    except ValueError as e:
        raise ConfigError(f"{key}: not a valid URI ({e}): {redact_url(v)!r}") from None


def as_object_store(v: Any, key: str) -> str:
    """``s3://bucket/prefix`` or ``file:///absolute/dir``."""
    v = as_str(v, key)
    u = split_url(v, key)
    if "@" in u.netloc:  # the bucket would be "KEY:SECRET@bucket", and every event's URI would carry it
        raise ConfigError(f"{key}: no credentials in the URI ({redact_url(v)!r}); S3 credentials come from the "
                          "standard AWS chain (environment, profile, IRSA)")
    if u.scheme == "s3":
        if not u.netloc:
            raise ConfigError(f"{key}: expected s3://bucket/prefix, the bucket is missing in {v!r}")
        # A bucket name is letters, digits, '.', '-' ('_' in old buckets): anything else (a ':' of
        # KEY:SECRET whose secret holds a '/') is not echoed.
        if not re.fullmatch(r"[A-Za-z0-9._-]{3,255}", u.netloc):
            raise ConfigError(f"{key}: expected s3://bucket/prefix with a bucket name (letters, digits, '.', '-'), "
                              f"got {redact_url(v)!r}; S3 credentials come from the standard AWS chain")
        return v
    if u.scheme == "file":
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise ConfigError(f"{key}: expected file:///absolute/dir, got {redact_url(v)!r}")
        return v
    raise ConfigError(f"{key}: expected s3://bucket/prefix or file:///dir, got {redact_url(v)!r}")


def as_event_uri(v: Any, key: str) -> str:
    """An event stream: where the publisher writes and the consumer reads."""
    v = as_str(v, key)
    u = split_url(v, key)
    if u.scheme == "kafka":
        topic = u.path.lstrip("/")
        if "@" in v:  # no host or topic holds one: user:password@ (a '/' in the password splits it elsewhere)
            raise ConfigError(f"{key}: no credentials in the URI ({redact_url(v)!r}); SASL settings go in "
                              "kafka (sasl.username, sasl.password)")
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
            raise ConfigError(f"{key}: expected file:///path/events.avro, got {redact_url(v)!r}")
        return v
    raise ConfigError(f"{key}: expected kafka://host:port/topic or file:///path/events.avro, got {redact_url(v)!r}")


def as_http_url(v: Any, key: str) -> str | None:
    v = as_opt_str(v, key)
    if v is None:
        return None
    u = split_url(v, key)
    if u.scheme not in ("http", "https", "mock") or not u.netloc:
        raise ConfigError(f"{key}: expected an http(s):// URL, got {redact_url(v)!r}")
    return v


def as_endpoint_url(v: Any, key: str) -> str | None:
    """An S3 endpoint: an http(s) URL without credentials (they would be sent as its host, and handed to
    every API client with the object URIs)."""
    v = as_http_url(v, key)
    if v is not None and "@" in v:
        raise ConfigError(f"{key}: no credentials in the URL ({redact_url(v)!r}); S3 credentials come from the "
                          "standard AWS chain (environment, profile, IRSA)")
    return v


# The Schema Registry client's numeric settings: from env vars they come as text, which it refuses
# (a TypeError at every registration, retried for good).
REGISTRY_NUMBERS = {"timeout": number(float, 0.0, HOUR), "cache.capacity": number(int, 1),
                    "cache.latest.ttl.sec": number(float, 0.0), "max.retries": number(int, 0, 100),
                    "retries.wait.ms": number(int, 0, int(HOUR * 1000)),
                    "retries.max.wait.ms": number(int, 0, int(HOUR * 1000))}


def as_registry_settings(v: Any, key: str) -> dict[str, Any]:
    """Schema Registry client settings: a mapping (``as_dict``) whose numeric settings are numbers."""
    settings = as_dict(v, key)
    for name, parse in REGISTRY_NUMBERS.items():
        if name in settings:
            settings[name] = parse(settings[name], f"{key}.{name}")
    return settings
