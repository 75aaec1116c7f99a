"""What can go wrong with one record, typed by what the consumer does about it.

- ``Poison`` (and one subclass per kind): the record can never be indexed as it is; it goes
  to the dead-letter queue with ``kind`` as its reason, and the consumer moves on.
- ``Transient``: a failure that may pass (network, throttling, a store or sink briefly
  away); retried with backoff, never dead-lettered.
"""

from __future__ import annotations


class Poison(Exception):
    """A record that can never be indexed as it is. ``kind`` is the dead-letter reason."""

    kind = "poison"


class Undecodable(Poison):
    """Neither framing, or an Avro body that does not decode."""

    kind = "undecodable"


class UnknownSchema(Poison):
    """A writer schema this consumer cannot resolve (fingerprint or registry id)."""

    kind = "unknown_schema"


class MissingObject(Poison):
    """The event names an object that is not in the store (the publisher names only durable ones)."""

    kind = "missing_object"


class ChecksumMismatch(Poison):
    """The object's SHA-256 or size differs from the event's."""

    kind = "checksum_mismatch"


class BadObject(Poison):
    """The object is not a well-formed embedding, or its dtype/shape differ from the event's."""

    kind = "bad_object"


class DimensionMismatchPoison(Poison):
    """The embedding's dimension does not fit the existing collection."""

    kind = "dimension_mismatch"


POISON_KINDS = tuple(c.kind for c in (Undecodable, UnknownSchema, MissingObject, ChecksumMismatch, BadObject,
                                      DimensionMismatchPoison))


class Transient(Exception):
    """A failure worth retrying; ``kind`` labels the error counter (object_store, sink, dlq, source)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
