"""The wire contract, shared by the publisher and the consumers: no torch, no vLLM.

- ``mm_embedding_event.avsc``: the event schema (``event_schema()``);
- ``codec``: the one event codec (single-object and Confluent framing);
- ``cloudevents``: the Kafka record headers;
- ``objects``: the stored-object format (safetensors layout, metadata, keys, the reader);
- ``uris``: the forms of an object store's and an object's URI.
"""

import json
from importlib import resources

EVENT_SCHEMA_FILE = "mm_embedding_event.avsc"


def event_schema_text() -> str:
    """The event schema as shipped (the ``.avsc`` file's text)."""
    return resources.files(__name__).joinpath(EVENT_SCHEMA_FILE).read_text()


def event_schema() -> dict:
    """The event schema, parsed from JSON (not yet by fastavro)."""
    return json.loads(event_schema_text())
