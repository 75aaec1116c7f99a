"""The wire contract. Installed as ``publisher.schemas`` so the .avsc files ship in the wheel."""

import json
from importlib import resources

EVENT_SCHEMA_FILE = "mm_embedding_event.avsc"


def event_schema_text() -> str:
    return resources.files(__name__).joinpath(EVENT_SCHEMA_FILE).read_text()


def event_schema() -> dict:
    return json.loads(event_schema_text())
