"""The registry path end to end through the real engine: the OpenAI server with the publisher on Kafka
and a real Schema Registry (Apicurio, Confluent-compatible API) that is down when the engine starts.
The engine starts and serves anyway; once the registry is back the schema is registered under
``<topic>-value`` (FULL), every returned request's event goes out in the Confluent wire format, and
the consumer, resolving the writer schema by id, indexes one point per image."""

from __future__ import annotations

import struct
import uuid

import pytest
from publisher_checks import chat, publisher_config, summary

from consumers.decoder import EventDecoder
from consumers.sinks import open_vector_sink

from consumer_run import consume_once
from openai_server import OpenAIServer
from pipeline import read_topic

pytestmark = pytest.mark.e2e


def test_engine_starts_while_the_registry_is_down_and_publishes_through_it_once_back(tmp_path, tiny_llava, kafka,
                                                                                    schema_registry):
    topic = f"reg-e2e.{uuid.uuid4().hex[:6]}"
    subject = f"{topic}-value"
    assert schema_registry.set_compatibility(subject, "FULL") == "FULL"
    config = {**publisher_config(tmp_path, kafka, topic), "schema_registry_url": schema_registry.url}
    schema_registry.kill()
    try:
        s = OpenAIServer(tiny_llava, config, tmp_path / "server").wait_ready()  # starts without the registry
        returned = [chat(s, seed) for seed in (400, 401)]
    finally:
        schema_registry.restart()
    try:
        returned.append(chat(s, 402))
        summary(kafka, topic, returned, decode=EventDecoder(registry_url=schema_registry.url).decode)
    finally:
        log = s.stop()
    assert "schema registry unavailable" in log and "'failed': 0" in log, log[-3000:]

    (version,) = schema_registry.versions(subject)
    schema_id = schema_registry.call("GET", f"/subjects/{subject}/versions/{version}")["id"]
    values = [m.value() for m in read_topic(kafka.bootstrap, topic, len(returned))]
    assert all(v[:5] == b"\x00" + struct.pack(">I", schema_id) for v in values)  # the Confluent wire format

    sink_uri = f"lancedb://{tmp_path}/lance/registry"
    totals, _ = consume_once(["--source", f"kafka://{kafka.bootstrap}/{topic}", "--sink", sink_uri,
                              "--object-store", config["object_store"], "--group", f"g-{uuid.uuid4().hex[:6]}"],
                             {"VLLM_MM_EVENTS_SCHEMA_REGISTRY_URL": schema_registry.url})
    assert totals["consumed"] == len(returned) and totals["dead_lettered"] == {}, totals
    with open_vector_sink(sink_uri) as sink:
        assert sink.count() == len(returned)  # one image per request
