"""Event values -> records, through the one codec (``schemas.codec``), with the consumer's
registry client resolving writer schemas by id and every failure typed as poison or transient."""

from __future__ import annotations

import json
from typing import Any

from consumers.errors import Poison, Transient, Undecodable, UnknownSchema
from schemas import codec


class EventDecoder:
    """Single-object Avro (our fingerprint) or Confluent framing (writer schema from the registry)."""

    def __init__(self, registry_url: str | None = None, registry_conf: dict | None = None):
        self.codec = codec.AvroCodec()
        self.registry = None
        if registry_url:
            self.registry = codec.registry_client(registry_url, registry_conf)

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

        try:
            schema = self.registry.get_schema(schema_id)
        except SchemaRegistryError as e:
            if e.http_status_code == 404:
                raise UnknownSchema(f"schema id {schema_id} is not in the registry") from None
            raise Transient("source", f"schema registry: {e}") from None
        except Exception as e:  # noqa: BLE001 - network
            raise Transient("source", f"schema registry: {e}") from None
        try:
            return json.loads(schema.schema_str)
        except ValueError as e:
            raise UnknownSchema(f"schema id {schema_id} is not JSON: {e}") from None


__all__ = ["EventDecoder", "Poison", "Transient"]
