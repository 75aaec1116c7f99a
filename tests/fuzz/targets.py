"""Fuzz targets: one function per input parser, ``bytes -> None``.

Each target feeds the bytes to one parser and allows only that parser's typed error. Anything
else -- another exception, an input that never finishes, an event-log source that never
catches up -- raises ``Finding`` (an ``AssertionError``) naming the exception, the product
frame it escaped from and the input's repr.

Used by ``run.py`` (atheris, coverage-guided) and by ``test_fuzz.py`` (corpus replay, no
atheris needed). ``KNOWN_FINDINGS`` lists what crashes today; ``run.py`` tolerates those
(unless ``--strict``) so a run can look for new ones, and the replay tests xfail exactly the
crash files listed there.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fastavro

import schemas
from consumers import config as consumer_config
from consumers import errors as consumer_errors
from consumers.decoder import EventDecoder
from consumers.sources import event_log
from consumers.sources.base import SourceUnreadable
from publisher import config as publisher_config
from publisher.settings import ConfigError
from schemas import codec as codec_mod
from schemas import objects

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
SEED_EVENTS = HERE / "seed_events.json"  # two real events (tests/support/synth.py), written by make_corpus.py
PRODUCT_ROOT = Path(schemas.__file__).resolve().parent.parent
PRODUCT_DIRS = ("schemas", "consumers", "publisher")

# One input may use at most this much CPU (a backstop for loops that never end; inputs take ~ms).
CPU_LIMIT_S = 2.0
# The event log's fixed sync marker, so block seeds (which end with it) fit the header we write.
LOG_SYNC = b"vllm-mm-events\x00\x01"
LOG_POLL_RECORDS = 64
SCRATCH_ENV = "VLLM_MM_EVENTS_FUZZ_SCRATCH"  # where the event-log targets write their file (default: $TMPDIR)


# ---- findings -------------------------------------------------------------------------------

def short_repr(data: bytes, limit: int = 4096) -> str:
    r = repr(data)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(data)} bytes in all)"


class Finding(AssertionError):
    """A disallowed outcome: ``kind`` (the exception's type, ``Hang`` or ``Stall``) escaped at ``site``."""

    def __init__(self, target: str, kind: str, site: str, message: str, data: bytes):
        self.target, self.kind, self.site, self.message = target, kind, site, message
        super().__init__(f"[{target}] {kind} escaped at {site}: {message}\n"
                         f"input ({len(data)} bytes): {short_repr(data)}")


class _OutOfTime(BaseException):
    """Raised into a runaway input; a BaseException so product ``except Exception`` cannot hide it."""


def escape_site(exc: BaseException) -> str:
    """The innermost product frame (``schemas``, ``consumers``, ``publisher``) the exception passed."""
    site = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename)
        try:
            rel = path.resolve().relative_to(PRODUCT_ROOT)
        except ValueError:
            continue
        if rel.parts and rel.parts[0] in PRODUCT_DIRS:
            site = f"{rel.as_posix()}:{frame.name}"
    return site


@contextmanager
def cpu_guard(seconds: float = CPU_LIMIT_S):
    """Interrupt the body after ``seconds`` of process CPU time (main thread only; else no guard)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _OutOfTime(f"still running after {seconds}s of CPU")

    old = signal.signal(signal.SIGVTALRM, on_alarm)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)


def expect(target: str, data: bytes, call: Callable[[], Any], allowed: Callable[[BaseException], bool]) -> Any:
    """``call()``'s result; None if it raised an allowed error; a ``Finding`` for anything else."""
    try:
        with cpu_guard():
            return call()
    except Finding:
        raise
    except _OutOfTime as e:
        raise Finding(target, "Hang", escape_site(e), str(e), data) from None
    except Exception as e:  # noqa: BLE001 - sorting allowed from disallowed is the point
        if allowed(e):
            return None
        raise Finding(target, type(e).__name__, escape_site(e), str(e)[:500], data) from e


def of(*types: type) -> Callable[[BaseException], bool]:
    return lambda e: isinstance(e, types)


def nothing(e: BaseException) -> bool:
    return False


# ---- 1. the event codec -----------------------------------------------------------------------

_CODEC = codec_mod.AvroCodec()
_EVENT_SCHEMA_TEXT = schemas.event_schema_text()


def codec(data: bytes) -> None:
    """``AvroCodec().decode``: single-object framing; Confluent framing without a registry."""
    expect("codec", data, lambda: _CODEC.decode(data), of(codec_mod.EventDecodeError))


class _RegistryCodec:
    """A codec whose writer-schema lookup returns the event schema for every id.

    The codec caches writer schemas per id; a fresh codec every 256 inputs bounds that cache.
    """

    def __init__(self):
        self.codec, self.uses = None, 0

    def get(self) -> codec_mod.AvroCodec:
        if self.codec is None or self.uses >= 256:
            self.codec, self.uses = codec_mod.AvroCodec(), 0
        self.uses += 1
        return self.codec


_REGISTRY = _RegistryCodec()


def _lookup(schema_id: int) -> dict:
    return json.loads(_EVENT_SCHEMA_TEXT)


def codec_registry(data: bytes) -> None:
    """``AvroCodec().decode(data, lookup)``: the Confluent framing (0x00 + 4-byte id) with a registry."""
    c = _REGISTRY.get()
    expect("codec_registry", data, lambda: c.decode(data, _lookup), of(codec_mod.EventDecodeError))


# ---- 2. the consumer's decoder ------------------------------------------------------------------

_DECODER = EventDecoder()


def decoder(data: bytes) -> None:
    """``consumers.decoder.EventDecoder().decode``: every failure must be ``Poison``."""
    expect("decoder", data, lambda: _DECODER.decode(data), of(consumer_errors.Poison))


# ---- 3. stored objects ----------------------------------------------------------------------------

def object_bytes(data: bytes) -> bytes:
    """The object a fuzz input stands for: the input itself, or, for an input starting with ``{``,
    ``<JSON header>\\n<tensor bytes>`` framed with the header's length (so byte mutations of the
    header keep the frame valid). Real objects never start with ``{``: their header length is a
    multiple of 8, and ``{`` is 0x7b."""
    if data[:1] != b"{":
        return data
    header, _, body = data.partition(b"\n")
    return struct.pack("<Q", len(header)) + header + body


def objects_reader(data: bytes) -> None:
    """``read_metadata`` and ``read_object`` (``BadObject`` only); a tensor read must convert to float32."""
    obj = object_bytes(data)
    expect("objects", data, lambda: objects.read_metadata(obj), of(objects.BadObject))
    tensor = expect("objects", data, lambda: objects.read_object(obj), of(objects.BadObject))
    if tensor is not None:
        expect("objects", data, tensor.to_float32, nothing)


# ---- 4. the embedded event log ------------------------------------------------------------------

def seed_events() -> list[dict]:
    return json.loads(SEED_EVENTS.read_text())


def log_file(events: list[dict], codec: str = "null") -> bytes:
    """An event-log file as the publisher writes it (fastavro), with the fixed sync marker."""
    out = io.BytesIO()
    fastavro.writer(out, _CODEC.parsed, events, codec=codec, sync_marker=LOG_SYNC)
    return out.getvalue()


def _log_prefixes() -> dict[int, bytes]:
    """Mode (first input byte & 3) -> what precedes the fuzzed blocks: bit 0 deflate, bit 1 a real block."""
    events = seed_events()
    return {mode: log_file(events if mode & 2 else [], "deflate" if mode & 1 else "null") for mode in range(4)}


_LOG_PREFIXES: dict[int, bytes] | None = None
_LOG_DIR: Path | None = None
_READER_SCHEMA = schemas.event_schema()


def _log_dir() -> Path:
    """One scratch directory per process for the log file the event-log targets write."""
    global _LOG_DIR
    if _LOG_DIR is None:
        # run.py names a directory it removes itself: atheris ends the process without atexit handlers.
        _LOG_DIR = Path(tempfile.mkdtemp(prefix="vllm-mm-events-fuzz-", dir=os.environ.get(SCRATCH_ENV)))
        atexit.register(shutil.rmtree, _LOG_DIR, True)
    return _LOG_DIR


@contextmanager
def _bounded_block_scan(budget: int):
    """Count the source's block-header reads; a scan that makes no progress exceeds any budget.

    Every block the reader steps over is at least 16 bytes (its sync marker), so an honest
    reading of N bytes reads far fewer than ``budget`` headers. A no-op where the reader has
    no ``_read_long`` (the CPU guard still bounds it).
    """
    orig = getattr(event_log, "_read_long", None)
    if orig is None:
        yield
        return
    calls = 0

    def counted(buf, pos):
        nonlocal calls
        calls += 1
        if calls > budget:
            raise _OutOfTime(f"read {calls} block headers of a {len(buf)}-byte log without finishing")
        return orig(buf, pos)

    event_log._read_long = counted
    try:
        yield
    finally:
        event_log._read_long = orig


def follow_log(target: str, content: bytes, data: bytes, allowed: Callable[[BaseException], bool],
               resume: bool = False) -> None:
    """Write ``content`` as the log, then poll a fresh source until caught up (bounded).

    Nothing grows the file, so every record handed out is new and the reader must catch up
    within ``len(content)`` records: each record takes at least one byte of the file. With
    ``resume``, everything handed out is then committed, and a new reader of the same
    checkpoint must have nothing left to hand out.
    """
    path = _log_dir() / "events.avro"
    checkpoint = path.with_name("events.avro.fuzz.checkpoint")
    path.write_bytes(content)
    checkpoint.unlink(missing_ok=True)

    def follow(commit: bool = False) -> list:
        with event_log.AvroLogSource(path.as_uri(), "fuzz", str(checkpoint), _READER_SCHEMA) as source:
            return read(source, commit)

    def read(source, commit: bool) -> list:
        handed_out: list = []
        polls = 0
        with _bounded_block_scan(4 * len(content) + 64):
            while True:
                records = source.poll(LOG_POLL_RECORDS, 0.0)
                polls += 1
                for r in records:
                    if r.error is None and r.event is None:
                        raise Finding(target, "BadRecord", "consumers/sources/event_log.py:AvroLogSource.poll",
                                      f"a record with neither an event nor an error: {r.coords}", data)
                handed_out += records
                if source.caught_up():
                    if commit and handed_out:
                        source.commit(handed_out)
                    return handed_out
                if len(handed_out) > len(content) or polls > len(content) + 8:
                    raise Finding(target, "Stall", "consumers/sources/event_log.py:AvroLogSource.poll",
                                  f"not caught up after {polls} polls and {len(handed_out)} records from a "
                                  f"{len(content)}-byte log that does not grow", data)

    def run() -> None:
        records = follow(commit=resume)
        if resume and records:
            again = follow()
            if again:
                raise Finding(target, "Redelivered", "consumers/sources/event_log.py:AvroLogSource.commit",
                              f"{len(again)} of {len(records)} records handed out again after all were committed "
                              f"(first again: {again[0].coords}, error {again[0].error!r})", data)

    expect(target, data, run, allowed)


def event_log_blocks(data: bytes) -> None:
    """A valid header (and maybe a real block) followed by fuzzed block bytes: dead letters only, no exception.

    First byte: bit 0 the deflate codec, bit 1 a block of two real events before the fuzzed bytes,
    bit 2 commit everything and check that a new reader resumes after it (an fsync per input).
    """
    global _LOG_PREFIXES
    if _LOG_PREFIXES is None:
        _LOG_PREFIXES = _log_prefixes()
    mode = data[0] if data else 0
    follow_log("event_log_blocks", _LOG_PREFIXES[mode & 3] + data[1:], data, nothing, resume=bool(mode & 4))


def _source_error(e: BaseException) -> bool:
    return type(e) is SourceUnreadable and str(e).startswith("source:")


def event_log_file(data: bytes) -> None:
    """The whole file fuzzed, header included: ``SourceUnreadable('source: ...')`` is allowed, nothing else."""
    follow_log("event_log_file", data, data, _source_error)


# ---- 5. configuration ---------------------------------------------------------------------------

_TOKENS = (
    "", " ", "true", "false", "yes", "off", "0", "1", "-1", "1.5", "1e999", "-1e999", "nan", "inf", "65535",
    "65536", "1048576", "{}", "[]", '{"acks": "all"}', '{"sasl.password": "x"}', "null",
    "kafka://", "file://", "s3://", "http://", "https://", "mock://", "qdrant://", "pgvector://", "milvus://",
    "lancedb://", "localhost", "host:9092", "h:1,h:2", ":", "/", "//", "[", "]", "[::1]", "@", "user:pw@", ",",
    "%2F", "?", "#", "\x00", "\u00a0", "\uff0f", "\ud800", "topic", "events.avro", "coll", "db/tbl",
    "float32", "float16", "bfloat16", "block", "drop", "mean", "first", "max", "none", "cosine", "dot", "l2",
    "text", "json",
    "kafka://localhost:9092/events", "file:///tmp/events.avro", "s3://bucket/prefix", "file:///tmp/objects",
    "http://localhost:8081", "qdrant://localhost:6333/coll", "pgvector://u@localhost:5432/db/tbl",
    "milvus:///tmp/milvus/coll", "lancedb:///tmp/lance/tbl", "kafka://localhost:9092/events.dlq",
)


class _Bytes:
    """Reads choices from fuzz bytes (zeros once they run out): a small, atheris-free data provider."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out.ljust(n, b"\x00")

    def left(self) -> bool:
        return self.pos < len(self.data)


def _string(p: _Bytes) -> str:
    parts = []
    for _ in range(1 + p.byte() % 4):
        b = p.byte()
        if b & 1:
            parts.append(_TOKENS[(b >> 1) % len(_TOKENS)])
        else:
            parts.append(p.take(p.byte() % 24).decode("utf-8", "surrogateescape"))
    return "".join(parts)


def _value(p: _Bytes, depth: int = 0) -> Any:
    kind = p.byte() % (10 if depth < 2 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return bool(p.byte() & 1)
    if kind == 2:
        return struct.unpack("b", p.take(1))[0]
    if kind == 3:
        return struct.unpack("<q", p.take(8))[0]
    if kind == 4:
        return struct.unpack("<d", p.take(8))[0]  # includes inf, -inf and nan
    if kind in (5, 6, 7):
        return _TOKENS[p.byte() % len(_TOKENS)] if kind == 5 else _string(p)
    if kind == 8:
        return [_value(p, depth + 1) for _ in range(p.byte() % 4)]
    return {_string(p): _value(p, depth + 1) for _ in range(p.byte() % 4)}


def config_dict(data: bytes, keys: dict) -> dict | None:
    """JSON text (input starting with ``{``), or keys from the real key table with values of any type."""
    if data[:1] == b"{":
        try:
            d = json.loads(data)
        except Exception:  # noqa: BLE001 - not JSON: not an input for this target
            return None
        return d if isinstance(d, dict) else None
    p = _Bytes(data)
    names = [*keys, "config_file", "unknown_key", "kafka__settings"]
    d = {}
    while p.left() and len(d) < 12:
        b = p.byte()
        name = names[b % len(names)] if b < 0xF0 else _string(p)
        d[name] = _value(p)
    return d


def _config_target(target: str, cls, data: bytes) -> None:
    d = config_dict(data, cls.keys())
    if d is None:
        return
    cfg = expect(target, data, lambda: cls.from_dict(d), of(ConfigError))
    if cfg is not None:  # a parsed config must be loggable (redacted() is what startup logs)
        expect(target, data, lambda: repr(cfg), nothing)


def publisher_config_target(data: bytes) -> None:
    """``PublisherConfig.from_dict``: ``ConfigError`` only."""
    _config_target("publisher_config", publisher_config.PublisherConfig, data)


def consumer_config_target(data: bytes) -> None:
    """``ConsumerConfig.from_dict``: ``ConfigError`` only."""
    _config_target("consumer_config", consumer_config.ConsumerConfig, data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "codec": codec,
    "codec_registry": codec_registry,
    "decoder": decoder,
    "objects": objects_reader,
    "event_log_blocks": event_log_blocks,
    "event_log_file": event_log_file,
    "publisher_config": publisher_config_target,
    "consumer_config": consumer_config_target,
}


# ---- what crashes today -------------------------------------------------------------------------

@dataclass(frozen=True)
class Known:
    """A finding not fixed yet. ``seeds`` (files in corpus/<target>/) reproduce it; remove the entry once fixed.

    ``kind`` and ``site`` are regexes matched in full, ``message`` a regex searched for.
    """

    target: str
    kind: str
    site: str
    message: str
    seeds: tuple[str, ...]
    reason: str

    def matches(self, f: Finding) -> bool:
        return (f.target == self.target and re.fullmatch(self.kind, f.kind) is not None
                and re.fullmatch(self.site, f.site) is not None and re.search(self.message, f.message) is not None)


_URL_SITES = r"publisher/settings\.py:as_(object_store|event_uri|http_url)|consumers/config\.py:_as_sink"
_URL_ERRORS = r"Invalid IPv6 URL|NFKC normalization|does not appear to be an IPv4 or IPv6 address"
_INT_INFINITY = r"cannot convert float (infinity|NaN) to integer"

# What crashed here once, and was fixed; each crash file stays in its corpus as a regression
# check (the replay tests run it). A new finding goes here, with its file, until it is fixed.
KNOWN_FINDINGS: list[Known] = []


def known(f: Finding) -> Known | None:
    return next((k for k in KNOWN_FINDINGS if k.matches(f)), None)


def known_seeds() -> dict[tuple[str, str], Known]:
    """(target, crash file name) -> the known finding it reproduces."""
    return {(k.target, seed): k for k in KNOWN_FINDINGS for seed in k.seeds}
