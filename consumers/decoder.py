"""Event values -> records, through the one codec (``schemas.codec``), with the consumer's
registry client resolving writer schemas by id and every failure typed as poison or transient."""

from __future__ import annotations

import json
import time
from typing import Any

from consumers.errors import Poison, Transient, Undecodable, UnknownSchema
from schemas import codec

REGISTRY_DOWN_S = 5.0  # after a registry outage, lookups fail at once for this long (the writer retries)


class EventDecoder:
    """Single-object Avro (our fingerprint) or Confluent framing (writer schema from the registry)."""

    def __init__(self, registry_url: str | None = None, registry_conf: dict | None = None):
        self.codec = codec.AvroCodec()
        self.registry = None
        self._registry_down_until = 0.0  # after a lookup that failed for the registry's sake: fail fast
        self._registry_down = ""
        if registry_url:
            self.registry = codec.registry_client(registry_url, registry_conf)

    def _note_down(self, why: str) -> None:
        self._registry_down = f"{why} (asked again after {REGISTRY_DOWN_S:.0f} s)"
        self._registry_down_until = time.monotonic() + REGISTRY_DOWN_S

    def decode(self, value: bytes) -> dict[str, Any]:
        try:
            return self.codec.decode(value, self._writer_schema if self.registry is not None else None)
        except codec.UnknownSchema as e:
            raise UnknownSchema(str(e)) from None
        except codec.EventDecodeError as e:
            raise Undecodable(str(e)) from None

    def encode(self, record: dict[str, Any]) -> bytes:
        """A decoded record back to bytes (dead letters of records that came without raw bytes)."""
        return self.codec.encode(codec.to_wire(record))

    def _writer_schema(self, schema_id: int) -> dict:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        if time.monotonic() < self._registry_down_until:  # each lookup could wait out the timeout again
            raise Transient("source", f"schema registry: {self._registry_down}")
        try:
            schema = self.registry.get_schema(schema_id)
        except SchemaRegistryError as e:
            if e.http_status_code == 404:
                raise UnknownSchema(f"schema id {schema_id} is not in the registry") from None
            if e.http_status_code >= 500 or e.http_status_code in (408, 429):
                self._note_down(str(e))
            raise Transient("source", f"schema registry: {e}") from None
        except Exception as e:  # noqa: BLE001 - network, or no answer in time
            self._note_down(f"{type(e).__name__}: {e}")
            raise Transient("source", f"schema registry: {type(e).__name__}: {e}") from None
        try:
            return json.loads(schema.schema_str)
        except (ValueError, RecursionError) as e:  # RecursionError: nested past any schema
            raise UnknownSchema(f"schema id {schema_id} is not JSON: {type(e).__name__}: {e}") from None


__all__ = ["EventDecoder", "Poison", "Transient"]
