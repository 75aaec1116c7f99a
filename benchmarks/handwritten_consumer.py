"""The consumer a competent user would write by hand: the essential work of ``vllm-mm-events consume``, done the
simplest efficient way, single-threaded. ``benchmarks/consumer_throughput.py`` measures the project's ``Indexer``
against it on the same data.

    .venv/bin/python benchmarks/handwritten_consumer.py BOOTSTRAP TOPIC SINK_URI N_EVENTS [--s3-endpoint-url URL]

Kafka (confluent_kafka, a new group, no auto-commit, from the beginning) -> Avro (fastavro ``schemaless_reader``
with the shipped schema; the value's framing header is skipped the simple way: 10 bytes of single-object encoding
``C3 01`` + fingerprint, else 5 of Confluent's ``00`` + schema id) -> for each item: GET the object (boto3
``get_object``, or a local file), SHA-256 checked against the event, the safetensors header parsed (8-byte
little-endian length + JSON), the tensor ``np.frombuffer``-ed (F32, or BF16 widened by a 16-bit shift), mean-pooled
-> points upserted 256 at a time -> offsets committed after each upsert. Stops after ``n_events`` events.

Fair by construction: point ids and payloads come from ``consumers.vectors`` (the same rows as the consumer), and
the writes go through ``consumers.sinks.open_vector_sink(uri).upsert(points)``, a thin wrapper over the store's own
client (one LanceDB merge_insert, Qdrant upsert, psycopg executemany or Milvus upsert per batch), which is what a
user would call. Left out, as a user would leave it out: dead letters, retries, size/dtype/shape checks against the
event, the check that a URI is in an allowed store, parallel fetches, backpressure, rebalance handling, metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from pathlib import Path

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schemas" / "mm_embedding_event.avsc"


def run(bootstrap: str, topic: str, sink_uri: str, n_events: int, s3_endpoint_url: str | None = None,
        group: str | None = None, batch: int = 256) -> dict:
    """Index ``n_events`` events; returns counts and the seconds from partition assignment to the last commit."""
    import boto3
    import fastavro
    import numpy as np
    from confluent_kafka import Consumer

    from consumers.sinks import open_vector_sink
    from consumers.vectors import Point, point_id, point_payload

    schema = fastavro.parse_schema(json.loads(SCHEMA_FILE.read_text()))
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group or f"handwritten-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    assigned_at: list[float] = []  # the clock starts when the group hands out partitions (join time excluded)
    consumer.subscribe([topic], on_assign=lambda c, p: assigned_at.append(time.perf_counter()))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint_url)
    sink = open_vector_sink(sink_uri)
    points: list = []
    events = nbytes = 0

    def fetch(uri: str) -> bytes:
        if uri.startswith("file://"):
            return Path(uri[len("file://"):]).read_bytes()
        bucket, _, key = uri[len("s3://"):].partition("/")
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def flush() -> None:
        if points:
            sink.upsert(points)
            consumer.commit(asynchronous=False)  # the offsets of every event polled so far: all are written
            points.clear()

    while events < n_events:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            raise RuntimeError(msg.error())
        value = msg.value()
        event = fastavro.schemaless_reader(io.BytesIO(value[10:] if value[:2] == b"\xc3\x01" else value[5:]), schema)
        for item in event["embeddings"]:
            data = fetch(item["uri"])
            if hashlib.sha256(data).hexdigest() != item["sha256"]:
                raise ValueError(f"{item['uri']}: SHA-256 does not match the event")
            n = int.from_bytes(data[:8], "little")
            tensor = json.loads(data[8:8 + n])["embedding"]
            begin, end = tensor["data_offsets"]
            dtype = {"F32": "<f4", "BF16": "<u2"}[tensor["dtype"]]
            raw = np.frombuffer(data, dtype, (end - begin) // np.dtype(dtype).itemsize, 8 + n + begin)
            features = raw.reshape(tensor["shape"])
            if tensor["dtype"] == "BF16":
                features = (features.astype(np.uint32) << 16).view(np.float32)
            if sink.dim is None:
                sink.ensure(features.shape[1], False)
            points.append(Point(point_id(event["event_id"], item["item_index"]), features.mean(axis=0),
                                point_payload(event, item, "mean")))
            nbytes += len(data)
        events += 1
        if len(points) >= batch:
            flush()
    flush()
    seconds = time.perf_counter() - assigned_at[0]
    consumer.close()
    sink.close()
    return {"events": events, "bytes": nbytes, "seconds": seconds}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bootstrap")
    ap.add_argument("topic")
    ap.add_argument("sink_uri")
    ap.add_argument("n_events", type=int)
    ap.add_argument("--s3-endpoint-url")
    ap.add_argument("--group")
    a = ap.parse_args()
    r = run(a.bootstrap, a.topic, a.sink_uri, a.n_events, a.s3_endpoint_url, a.group)
    print(json.dumps({**r, "events_per_s": r["events"] / r["seconds"], "MB_per_s": r["bytes"] / r["seconds"] / 1e6}))
