import io
import struct

import fastavro
import pytest

from publisher.sidecar.events import (
    FinishedRequest,
    MediaItem,
    StoredItem,
    build_event,
    producer_info,
    stringify_metadata,
)
from schemas import event_schema
from schemas.cloudevents import cloudevent_headers
from schemas.codec import AvroCodec, schema_fingerprint

REQUIRED = {"event_id": "string", "event_time": "long", "request_id": "string", "model": "string",
            "finish_reason": ["null", "string"], "num_prompt_tokens": "int", "num_output_tokens": "int"}
REF_FIELDS = ["mm_hash", "modality", "item_index", "placeholder_offset", "placeholder_length", "uri", "sha256",
              "size_bytes", "dtype", "shape"]


def snapshot(items=(), **kw):
    base = dict(request_id="req-1", internal_request_id="req-1-0a1b2c3d", model="m", finish_reason="stop",
                stop_reason=None, num_prompt_tokens=40, num_output_tokens=8,
                metadata=stringify_metadata({"tenant": "acme", "k": [1, 2]}), items=tuple(items),
                lora_name=None, arrival_time=1700000000.0, finished_time=1700000000.5,
                traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    base.update(kw)
    return FinishedRequest(**base)


def test_schema_has_the_contract_fields():
    s = event_schema()
    assert s["name"] == "MMEmbeddingEvent"
    fields = {f["name"]: f["type"] for f in s["fields"]}
    for name, typ in REQUIRED.items():
        t = fields[name]
        assert (t if isinstance(t, (str, list)) else t["type"]) == typ, name
    assert fields["event_time"]["logicalType"] == "timestamp-millis"
    assert fields["metadata"] == {"type": "map", "values": "string"}
    ref = fields["embeddings"]["items"]
    assert ref["name"] == "MMEmbeddingRef"
    assert [f["name"] for f in ref["fields"]][:len(REF_FIELDS)] == REF_FIELDS
    # every field added beyond the contract has a default, so old readers keep working
    for f in s["fields"]:
        if f["name"] not in REQUIRED and f["name"] not in ("embeddings", "metadata", "producer",
                                                          "internal_request_id"):
            assert "default" in f, f["name"]


def test_metadata_is_stringified():
    assert stringify_metadata({"a": "x", "b": 3, "c": {"z": 1}}) == {"a": "x", "b": "3", "c": '{"z": 1}'}
    assert stringify_metadata(None) == {}


def test_build_event_names_only_stored_objects():
    items = [MediaItem("h1", "image", 0, 1, 16), MediaItem("h2", "image", 1, 17, 16)]
    stored = {"h1": StoredItem("s3://b/k1", "ab" * 32, 8528, "float32", (16, 128))}
    e = build_event(snapshot(items), stored, producer_info("0.32.0", "float32"), published_time=1700000001.0)
    assert [x["mm_hash"] for x in e["embeddings"]] == ["h1"]
    assert e["missing_embeddings"] == ["h2"]
    assert e["embeddings"][0]["shape"] == [16, 128] and e["embeddings"][0]["source"] == "ENCODER"
    assert e["event_time"] == 1700000000500
    assert e["timings"]["e2e_latency_ms"] == pytest.approx(500.0)
    assert e["timings"]["publish_latency_ms"] == pytest.approx(500.0)
    assert e["trace"]["traceparent"].startswith("00-0af7")
    assert e["producer"]["engine"] == "vllm" and e["producer"]["engine_version"] == "0.32.0"


def test_single_object_encoding_roundtrip_and_header():
    codec = AvroCodec()
    items = [MediaItem("h1", "image", 0, 1, 16)]
    stored = {"h1": StoredItem("file:///x", "00" * 32, 1, "float16", (16, 128))}
    e = build_event(snapshot(items), stored, producer_info("v", "float16"))
    data = codec.encode(e)
    assert data[:2] == b"\xc3\x01"
    assert struct.unpack("<Q", data[2:10])[0] == codec.fingerprint
    back = codec.decode(data)
    assert back["request_id"] == "req-1" and back["embeddings"][0]["dtype"] == "float16"
    assert back["metadata"] == {"tenant": "acme", "k": "[1, 2]"}
    # The body is plain Avro binary: any reader with the .avsc decodes it.
    plain = fastavro.schemaless_reader(io.BytesIO(data[10:]), fastavro.parse_schema(event_schema()))
    assert plain["event_id"] == e["event_id"]


def test_fingerprint_matches_the_avro_spec():
    # Spec test vector: the fingerprint of the canonical form of "null" is 0x63dd24e7cc258f8a.
    assert schema_fingerprint("null") == 0x63DD24E7CC258F8A
    from fastavro.schema import fingerprint, to_parsing_canonical_form

    codec = AvroCodec()
    canonical = to_parsing_canonical_form(codec.parsed)
    fa = fingerprint(canonical, "CRC-64-AVRO")
    # fastavro prints the fingerprint's little-endian bytes: exactly what follows 0xC3 0x01.
    assert bytes.fromhex(fa) == codec.single_object_header[2:]


def test_unknown_fingerprint_and_garbage_are_refused():
    codec = AvroCodec()
    with pytest.raises(ValueError, match="unknown schema fingerprint"):
        codec.decode(b"\xc3\x01" + b"\x00" * 8 + b"\x00")
    with pytest.raises(ValueError, match="not an Avro"):
        codec.decode(b"{json}")


def test_cloudevents_headers():
    e = build_event(snapshot(), {}, producer_info("v", "float32"))
    h = dict(cloudevent_headers(e, "application/avro"))
    assert h["ce_specversion"] == b"1.0" and h["ce_id"] == e["event_id"].encode()
    assert h["ce_subject"] == b"req-1" and h["content-type"] == b"application/avro"
    assert h["ce_time"] == b"2023-11-14T22:13:20.500Z"
    assert h["ce_type"].startswith(b"io.vllm.") and h["ce_source"].startswith(b"/vllm-mm-events/")


def test_compiled_encoder_matches_fastavro_byte_for_byte():
    """The fast encoder must write exactly what the reference writer writes, for every shape."""
    import random

    codec = AvroCodec()
    rng = random.Random(7)
    for n in range(50):
        items = [MediaItem(f"h{i}", rng.choice(["image", "audio", "video"]), i, rng.randrange(1 << 20),
                           rng.randrange(1 << 12), rng.choice(["ENCODER", "CLIENT"])) for i in range(rng.randrange(4))]
        stored = {it.mm_hash: StoredItem(f"s3://b/ü/{it.mm_hash}", "ab" * 32, rng.randrange(1 << 40), "bfloat16",
                                         (rng.randrange(1 << 20), 4096)) for it in items if rng.random() < 0.8}
        req = snapshot(items, finish_reason=rng.choice([None, "stop", "length"]),
                       stop_reason=rng.choice([None, "2", "</s>"]), lora_name=rng.choice([None, "adapter-ä"]),
                       arrival_time=rng.choice([None, 1700000000.25]), traceparent=rng.choice([None, "00-x"]),
                       metadata={f"k{j}": "v" * j for j in range(rng.randrange(5))},
                       num_prompt_tokens=rng.randrange(-5, 1 << 30))
        e = build_event(req, stored, producer_info("v", "float32"))
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, codec.parsed, e)
        assert codec.encode(e)[10:] == buf.getvalue(), n
