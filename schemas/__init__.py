"""The wire contract, shared by the publisher and the consumers: no torch, no vLLM.

- ``mm_embedding_event.avsc``: the event schema (``event_schema()``);
- ``history/``: every released version of it (``released_schemas()``); ``compat`` checks the
  current schema is FULL-compatible with all of them;
- ``codec``: the one event codec (single-object and Confluent framing);
- ``cloudevents``: the Kafka record headers;
- ``objects``: the stored-object format (safetensors layout, metadata, keys, the reader);
- ``uris``: the forms of an object store's and an object's URI.
"""

import json
import re
from importlib import resources

EVENT_SCHEMA_FILE = "mm_embedding_event.avsc"
HISTORY_DIR = "history"
_RELEASED_FILE = re.compile(r"^v(\d+)\.avsc$")


def event_schema_text() -> str:
    """The event schema as shipped (the ``.avsc`` file's text)."""
    return resources.files(__name__).joinpath(EVENT_SCHEMA_FILE).read_text()


def event_schema() -> dict:
    """The event schema, parsed from JSON (not yet by fastavro)."""
    return json.loads(event_schema_text())


def released_schemas() -> list[tuple[str, dict]]:
    """``(label, schema)`` of every released version of the event schema (``history/v<N>.avsc``),
    oldest first; see ``history/README.md``."""
    found = []
    for entry in resources.files(__name__).joinpath(HISTORY_DIR).iterdir():
        m = _RELEASED_FILE.match(entry.name)
        if m:
            found.append((int(m.group(1)), f"v{m.group(1)}", json.loads(entry.read_text())))
    return [(label, schema) for _, label, schema in sorted(found, key=lambda t: t[0])]
