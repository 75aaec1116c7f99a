"""Writes the seed corpora (tests/fuzz/corpus/<target>/seed-*) and tests/fuzz/seed_events.json.

Run once (and again when the wire format changes): ``python tests/fuzz/make_corpus.py``.
Seeds are valid and near-valid inputs, made with the product's own writers (the events come
from tests/support/synth.py). Files named ``crash-*`` are found inputs, kept by hand; this
script never touches them.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "support"), str(HERE.parent.parent)]

import fastavro  # noqa: E402
import numpy as np  # noqa: E402

from publisher.stores.local import LocalDirStore  # noqa: E402
from schemas.avro_encoder import encode_long  # noqa: E402
from schemas.codec import AvroCodec  # noqa: E402
from schemas.objects import encode_array  # noqa: E402

MAX_SEED = 64 << 10


def _events() -> list[dict]:
    """Two real events (synth), made deterministic: fixed ids, times and object URIs."""
    import synth

    with tempfile.TemporaryDirectory() as d:
        store = LocalDirStore(d)
        a, _ = synth.make_event(store, "p", "req-1", [synth.features(1), synth.features(2, n=2, dim=8)],
                                {"k": "v", "n": "1"})
        b, _ = synth.make_event(store, "p", "req-2", [synth.features(3, n=1, dim=4)], modality="audio")
        root = Path(d).as_uri()
    events = []
    for i, ev in enumerate((a, b)):
        ev = json.loads(json.dumps(ev).replace(root, "file:///var/lib/vllm-mm-events/objects"))
        ev["event_id"] = f"00000000-0000-4000-8000-00000000000{i}"
        ev["event_time"] = 1767225600000 + i
        ev["producer"]["hostname"] = "fuzz"
        if ev["timings"]:
            ev["timings"].update(arrival_time_ms=1767225599500, finished_time_ms=1767225600000 + i,
                                 e2e_latency_ms=500.0, publish_latency_ms=1.25)
        events.append(ev)
    events[1]["trace"] = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                          "tracestate": None}
    events[1]["missing_embeddings"] = ["deadbeef"]
    events[1]["lora_name"] = "adapter"
    return events


def _obj(header: dict | bytes, body: bytes = b"") -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def codec_seeds(events: list[dict]) -> dict[str, bytes]:
    c = AvroCodec()
    one = c.encode(events[0])
    body = one[10:]
    seeds = {f"valid-event-{i}": c.encode(ev) for i, ev in enumerate(events)}
    seeds |= {
        "truncated-body": one[:len(one) // 2],
        "trailing-bytes": one + b"\x00\x01\x02",
        "wrong-fingerprint": one[:2] + b"\x00" * 8 + body,
        "confluent-id-1": b"\x00" + struct.pack(">I", 1) + body,
        "magic-only": one[:10],
        "empty": b"",
        "json": b'{"event_id": "x"}',
        "huge-string-length": one[:10] + encode_long(1 << 40) + b"abc",
        "negative-string-length": one[:10] + encode_long(-5) + b"abc",
        "huge-array-count": one[:10] + body[:60] + encode_long(1 << 40),
    }
    return seeds


def registry_seeds(events: list[dict]) -> dict[str, bytes]:
    c = AvroCodec()
    seeds = {}
    for i, ev in enumerate(events):
        body = c.encode(ev)[10:]
        seeds[f"valid-confluent-id-{i + 1}"] = b"\x00" + struct.pack(">I", i + 1) + body
    seeds["valid-single-object"] = c.encode(events[0])
    seeds["confluent-truncated"] = seeds["valid-confluent-id-1"][:40]
    seeds["confluent-header-only"] = b"\x00\x00\x00\x00\x07"
    return seeds


def object_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((4, 8)).astype(np.float32)
    seeds = {f"valid-{dt}": encode_array(a, storage_dtype=dt, mm_hash="abc123", modality="image",
                                         model="tiny/llava-synth").data
             for dt in ("float32", "float16", "bfloat16")}
    seeds["valid-empty-rows"] = encode_array(np.zeros((0, 8), np.float32), storage_dtype="float32", mm_hash="e",
                                             modality="image", model="m").data
    raw = a.tobytes()
    t = {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, len(raw)]}
    meta = {"format": "vllm-mm-events/1", "dtype": "float32", "shape": "[4, 8]"}
    seeds |= {
        "no-metadata": _obj({"embedding": t}, raw),
        "metadata-not-mapping": _obj({"__metadata__": ["x"], "embedding": t}, raw),
        "no-tensor": _obj({"__metadata__": meta, "other": t}, raw),
        "unknown-dtype": _obj({"embedding": {**t, "dtype": "F64"}}, raw),
        "string-offsets": _obj({"embedding": {**t, "data_offsets": ["0", str(len(raw))]}}, raw),
        "offsets-mismatch": _obj({"embedding": {**t, "data_offsets": [0, 16]}}, raw),
        "negative-shape": _obj({"embedding": {**t, "shape": [-4, -8]}}, raw),
        "scalar-shape": _obj({"embedding": {**t, "shape": [], "data_offsets": [0, 4]}}, raw[:4]),
        "three-d-shape": _obj({"embedding": {**t, "shape": [2, 2, 8]}}, raw),
        "huge-shape": _obj({"embedding": {**t, "shape": [1 << 40, 1 << 40]}}, raw),
        "truncated-body": _obj({"embedding": t}, raw[:50]),
        "header-not-json": _obj(b"{not json}     "),
        "header-not-object": _obj(b"[1, 2, 3]"),
        "header-length-too-big": struct.pack("<Q", 1 << 20) + b"{}",
        "short": b"\x08\x00\x00",
        # framed by the target (targets.object_bytes): "<header JSON>\n<tensor bytes>"
        "json-valid": json.dumps({"__metadata__": meta, "embedding": t}).encode() + b"\n" + raw,
        "json-bf16": json.dumps({"embedding": {**t, "dtype": "BF16", "data_offsets": [0, 64]}}).encode()
        + b"\n" + raw[:64],
        "json-scalar": b'{"embedding":{"dtype":"F16","shape":[],"data_offsets":[0,2]}}\n\x00\x3c',
    }
    return seeds


def log_block(events: list[dict], codec: str = "null") -> bytes:
    """One block (count, size, body, sync) as the publisher's fastavro writer lays it out."""
    import targets

    head = targets.log_file([], codec)
    return targets.log_file(events, codec)[len(head):]


def event_log_block_seeds(events: list[dict]) -> dict[str, bytes]:
    import targets

    blk, blk_d = log_block(events), log_block(events, "deflate")
    one = log_block(events[:1])
    seeds = {
        "null-two-blocks": b"\x00" + one + log_block(events[1:]),
        "null-after-real-block": b"\x02" + blk,
        "deflate-block": b"\x01" + blk_d,
        "deflate-after-real-block": b"\x03" + blk_d,
        "header-only": b"\x00",
        "truncated-block": b"\x00" + blk[:len(blk) // 2],
        "wrong-sync": b"\x00" + blk[:-16] + b"\xff" * 16 + one,
        "count-too-high": b"\x00" + encode_long(5) + blk[1:],
        "zero-count": b"\x00" + encode_long(0) + blk[1:],
        "bad-deflate": b"\x01" + encode_long(2) + encode_long(4) + b"\xff\xff\xff\xff" + targets.LOG_SYNC,
        "garbage-then-block": b"\x00" + b"\x02\x06abc" + targets.LOG_SYNC + one,
        # bit 2: commit all, then a new reader must resume after them
        "resume-after-real-blocks": b"\x06" + one,
        "resume-after-dead-letter": b"\x04" + b"\x02\x06abc" + targets.LOG_SYNC + one,
        "resume-after-corrupt-header": b"\x04" + encode_long(0) + blk[1:] + one,
    }
    return seeds


def event_log_file_seeds(events: list[dict]) -> dict[str, bytes]:
    import targets

    full = targets.log_file(events)
    head = targets.log_file([])
    other_codec = head.replace(b"\x08null", b"\x0csnappy", 1)
    assert other_codec != head
    # a header whose schema is valid Avro but not the event's (its blocks then fail to resolve)
    out = io.BytesIO()
    other = {"type": "record", "name": "X", "fields": [{"name": "a", "type": "long"}]}
    fastavro.writer(out, fastavro.parse_schema(other), [{"a": 1}, {"a": 2}], sync_marker=targets.LOG_SYNC)
    return {
        "valid-null": full,
        "valid-deflate": targets.log_file(events, "deflate"),
        "valid-header-only": head,
        "valid-two-blocks": full + log_block(events[:1]),
        "truncated-header": head[:len(head) // 2],
        "bad-magic": b"Obj\x02" + full[4:],
        "snappy-codec": other_codec,
        "other-schema": out.getvalue(),
        "empty": b"",
    }


def config_seeds(publisher: bool) -> dict[str, bytes]:
    if publisher:
        valid = {"object_store": "s3://bucket/prefix", "event_sink": "kafka://localhost:9092/events",
                 "s3_endpoint_url": "http://localhost:9000", "kafka": {"acks": "all", "sasl.password": "x"},
                 "schema_registry_url": "http://localhost:8081", "storage_dtype": "bfloat16",
                 "backpressure": "drop", "max_inflight_bytes": 1 << 21, "durability_timeout_s": 0.5,
                 "fsync": "false", "topic_partitions": 3}
        near = {"object_store": "file://host/dir", "upload_threads": 0, "kafka": "{not json"}
    else:
        valid = {"source": "file:///tmp/events.avro", "sinks": ["qdrant://localhost:6333/coll",
                                                                "pgvector://u@localhost:5432/db/tbl"],
                 "pooling": "none", "normalize": True, "distance": "dot", "dlq": "kafka://localhost:9092/dlq",
                 "batch_max_records": 16, "metrics_port": 0, "poll_timeout_s": 0.2, "log_format": "json"}
        near = {"source": "kafka://h/t", "sinks": "lancedb://host/tbl", "metrics_port": 70000}
    return {
        "valid.json": json.dumps(valid).encode(),
        "near-valid.json": json.dumps(near).encode(),
        "empty.json": b"{}",
        "unknown-key.json": b'{"nope": 1}',
        "provider-bytes": bytes(range(0, 256, 7)),
        "provider-strings": b"\x00\x07\x03\x01\x35\x02\x06\x06abc\x01\x07\x05\x06\x03\x0b\x11\x21",
    }


def _dict_line(token: str | bytes) -> str:
    b = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else token
    return '"' + "".join(chr(c) if 0x20 <= c < 0x7F and chr(c) not in '"\\' else f"\\x{c:02x}" for c in b) + '"'


JSON_TOKENS = ["{", "}", "[", "]", ":", ",", '"', "null", "true", "false", "0", "-1", "1.5", "1e999", "-1e999",
               "NaN", "Infinity", "-Infinity", "18446744073709551616", "\\u0000", "\\ud800"]


def dictionaries(events: list[dict]) -> dict[str, list[str | bytes]]:
    """libFuzzer -dict files (tests/fuzz/dicts/<target>.dict): tokens the parsers compare against."""
    import targets

    from consumers.config import KEYS as CONSUMER_KEYS
    from publisher.config import KEYS as PUBLISHER_KEYS

    c = AvroCodec()
    avro = [c.single_object_header, b"\xc3\x01", b"\x00\x00\x00\x00\x01", b"\x00\x00\x00\x00\x00",
            b"\x01", b"\x7f", b"\xff\xff\xff\xff\x0f", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"]
    objects = JSON_TOKENS + ["__metadata__", "embedding", "dtype", "shape", "data_offsets", "F32", "F16", "BF16",
                             "F64", '"embedding":{"dtype":"F32","shape":[', '"data_offsets":[0,']
    log = avro + [targets.LOG_SYNC, b"Obj\x01", "avro.schema", "avro.codec", "deflate", "null", "snappy",
                  '"type"', '"record"', '"name"', '"fields"', '"long"', '"string"', '"null"', '"array"', '"items"',
                  '"map"', '"values"', '"enum"', '"symbols"', '"fixed"', '"size"', '"logicalType"']
    out = {"codec": avro, "codec_registry": avro, "decoder": avro, "objects": objects,
           "event_log_blocks": log, "event_log_file": log}
    for name, keys in (("publisher_config", PUBLISHER_KEYS), ("consumer_config", CONSUMER_KEYS)):
        out[name] = JSON_TOKENS + [f'"{k}":' for k in keys] + [t for t in targets._TOKENS if t]
    return out


def main() -> None:
    events = _events()
    (HERE / "seed_events.json").write_text(json.dumps(events, indent=1, sort_keys=True) + "\n")
    corpora = {
        "codec": codec_seeds(events),
        "codec_registry": registry_seeds(events),
        "decoder": codec_seeds(events),
        "objects": object_seeds(),
        "event_log_blocks": event_log_block_seeds(events),
        "event_log_file": event_log_file_seeds(events),
        "publisher_config": config_seeds(True),
        "consumer_config": config_seeds(False),
    }
    total = 0
    for target, seeds in corpora.items():
        d = HERE / "corpus" / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        for name, data in seeds.items():
            assert len(data) < MAX_SEED, (target, name, len(data))
            (d / f"seed-{name}").write_bytes(data)
            total += len(data)
        print(f"{target}: {len(seeds)} seeds")
    print(f"{total} bytes in all")
    (HERE / "dicts").mkdir(exist_ok=True)
    for target, tokens in dictionaries(events).items():
        lines = sorted({_dict_line(t) for t in tokens})
        (HERE / "dicts" / f"{target}.dict").write_text(
            f"# libFuzzer dictionary for {target}; written by make_corpus.py\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
