"""A finished request's snapshot -> ``MMEmbeddingEvent`` record -> Avro bytes.

Nothing here knows vLLM: ``connector.py`` turns a vLLM ``Request`` into a
``FinishedRequest`` snapshot, so this module is tested without an engine.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import fastavro

from publisher.avro_fast import compile_encoder
from publisher.schemas import event_schema

CONTENT_TYPE_SINGLE_OBJECT = "application/avro"  # Avro single-object encoding
CONTENT_TYPE_CONFLUENT = "application/vnd.confluent.avro"  # 0x00 + schema id
CE_TYPE = "io.vllm.mm_embeddings.request_finished.v1"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"


@dataclass(frozen=True)
class MediaItem:
    mm_hash: str
    modality: str
    item_index: int
    placeholder_offset: int
    placeholder_length: int
    source: str = "ENCODER"  # or CLIENT: the caller sent embeddings, no encoder ran


@dataclass(frozen=True)
class FinishedRequest:
    """What the scheduler knew when the request finished: plain values only."""
    request_id: str
    internal_request_id: str
    model: str
    finish_reason: str | None
    stop_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    metadata: dict[str, str]
    items: tuple[MediaItem, ...]
    lora_name: str | None
    arrival_time: float | None  # unix seconds
    finished_time: float  # unix seconds
    traceparent: str | None = None
    tracestate: str | None = None
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class StoredItem:
    """An object the store confirmed durable, with what its head said."""
    uri: str
    sha256: str
    size_bytes: int
    dtype: str
    shape: tuple[int, ...]


def stringify_metadata(extra_args: Mapping[str, Any] | None) -> dict[str, str]:
    """``SamplingParams.extra_args`` -> map<string>: strings as-is, the rest JSON-encoded."""
    out: dict[str, str] = {}
    for k, v in (extra_args or {}).items():
        out[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return out


def producer_info(engine_version: str, storage_dtype: str) -> dict[str, str]:
    from publisher import __version__

    return {"engine": "vllm", "engine_version": engine_version, "publisher_version": __version__,
            "hostname": socket.gethostname(), "storage_dtype": storage_dtype}


def build_event(req: FinishedRequest, stored: Mapping[str, StoredItem], producer: Mapping[str, str],
                published_time: float | None = None) -> dict[str, Any]:
    """The Avro record. Items whose object is not in ``stored`` go to ``missing_embeddings``."""
    embeddings, missing = [], []
    for item in req.items:
        obj = stored.get(item.mm_hash)
        if obj is None:
            missing.append(item.mm_hash)
            continue
        embeddings.append({
            "mm_hash": item.mm_hash, "modality": item.modality, "item_index": item.item_index,
            "placeholder_offset": item.placeholder_offset, "placeholder_length": item.placeholder_length,
            "uri": obj.uri, "sha256": obj.sha256, "size_bytes": obj.size_bytes, "dtype": obj.dtype,
            "shape": list(obj.shape), "source": item.source,
        })
    finished_ms = int(req.finished_time * 1000)
    published_time = time.time() if published_time is None else published_time
    trace = None
    if req.traceparent or req.tracestate:
        trace = {"traceparent": req.traceparent, "tracestate": req.tracestate}
    return {
        "event_id": req.event_id,
        "event_time": finished_ms,
        "request_id": req.request_id,
        "internal_request_id": req.internal_request_id,
        "model": req.model,
        "finish_reason": req.finish_reason,
        "stop_reason": req.stop_reason,
        "num_prompt_tokens": req.num_prompt_tokens,
        "num_output_tokens": req.num_output_tokens,
        "metadata": dict(req.metadata),
        "embeddings": embeddings,
        "missing_embeddings": missing,
        "lora_name": req.lora_name,
        "timings": {
            "arrival_time_ms": int(req.arrival_time * 1000) if req.arrival_time else None,
            "finished_time_ms": finished_ms,
            "e2e_latency_ms": (req.finished_time - req.arrival_time) * 1000 if req.arrival_time else None,
            "publish_latency_ms": max(0.0, (published_time - req.finished_time) * 1000),
        },
        "producer": dict(producer),
        "trace": trace,
    }


# ---- Avro ------------------------------------------------------------------------------

_EMPTY64 = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_CRC64 = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Avro spec's CRC-64-AVRO (Rabin) fingerprint of a schema's canonical form."""
    fp = _EMPTY64
    for b in data:
        fp = (fp >> 8) ^ _CRC64[(fp ^ b) & 0xFF]
    return fp


class AvroCodec:
    """Encodes and decodes ``MMEmbeddingEvent`` values.

    Without a registry: Avro single-object encoding (0xC3 0x01 + 8-byte little-endian
    CRC-64-AVRO fingerprint + body). With a registry client: the Confluent wire format
    (0x00 + 4-byte big-endian schema id + body); the schema is registered once, under
    ``<topic>-value``.
    """

    def __init__(self, schema: dict | None = None):
        self.schema_dict = schema or event_schema()
        self.parsed = fastavro.parse_schema(self.schema_dict)
        canonical = fastavro.schema.to_parsing_canonical_form(self.parsed)
        self.fingerprint = crc64_avro(canonical.encode())
        self.single_object_header = SINGLE_OBJECT_MAGIC + struct.pack("<Q", self.fingerprint)
        self.schema_id: int | None = None
        self._header = self.single_object_header
        self._encode_body = compile_encoder(self.schema_dict)

    def use_registry(self, client, subject: str) -> None:
        from confluent_kafka.schema_registry import Schema

        self.schema_id = client.register_schema(subject, Schema(json.dumps(self.schema_dict), "AVRO"))
        self._header = b"\x00" + struct.pack(">I", self.schema_id)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPE_SINGLE_OBJECT if self.schema_id is None else CONTENT_TYPE_CONFLUENT

    def encode(self, record: Mapping[str, Any]) -> bytes:
        out = bytearray(self._header)
        self._encode_body(out, record)
        return bytes(out)

    def decode(self, data: bytes, writer_schema: dict | None = None) -> dict[str, Any]:
        """Either framing. A registry-framed value is read with ``writer_schema`` (or ours)."""
        if data[:2] == SINGLE_OBJECT_MAGIC:
            (fp,) = struct.unpack("<Q", data[2:10])
            if fp != self.fingerprint:
                raise ValueError(f"unknown schema fingerprint {fp:#018x}; this reader knows {self.fingerprint:#018x}")
            body = data[10:]
            writer = self.parsed
        elif data[:1] == b"\x00" and len(data) >= 5:
            body = data[5:]
            writer = fastavro.parse_schema(writer_schema) if writer_schema else self.parsed
        else:
            raise ValueError("not an Avro single-object or Confluent-framed value")
        return fastavro.schemaless_reader(io.BytesIO(body), writer, self.parsed)


def cloudevent_headers(event: Mapping[str, Any], content_type: str) -> list[tuple[str, bytes]]:
    """CloudEvents Kafka binding, binary mode: attributes as ``ce_*`` headers."""
    t = time.gmtime(event["event_time"] / 1000)
    ce_time = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{event['event_time'] % 1000:03d}Z"
    h = [
        ("content-type", content_type),
        ("ce_specversion", "1.0"),
        ("ce_id", event["event_id"]),
        ("ce_source", f"/vllm-mm-events/{event['producer']['hostname']}"),
        ("ce_type", CE_TYPE),
        ("ce_time", ce_time),
        ("ce_subject", event["request_id"]),
        ("ce_partitionkey", event["request_id"]),
    ]
    return [(k, v.encode()) for k, v in h]
