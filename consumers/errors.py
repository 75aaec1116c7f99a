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


class ForbiddenObjectPoison(Poison):
    """The event names an object outside every configured object store: it is never opened."""

    kind = "forbidden_object"


class ObjectTooLargePoison(Poison):
    """The object (as the event says, or as read) is over ``max_object_bytes``."""

    kind = "object_too_large"


class PermanentErrorPoison(Poison):
    """The store kept refusing the read (access denied, no such bucket, not a regular file)."""

    kind = "permanent_error"


class SinkRejected(Poison):
    """A vector store refused this event's data (not the connection): the store's message says why."""

    kind = "sink_rejected"


POISON_KINDS = tuple(c.kind for c in (Undecodable, UnknownSchema, MissingObject, ChecksumMismatch, BadObject,
                                      DimensionMismatchPoison, ForbiddenObjectPoison, ObjectTooLargePoison,
                                      PermanentErrorPoison, SinkRejected))


TRANSIENT_KINDS = ("object_store", "sink", "dlq", "source")  # source: the schema registry


class Transient(Exception):
    """A failure worth retrying; ``kind`` (one of ``TRANSIENT_KINDS``) labels the error counter.

    ``permanent_after``: retry at most this many times, then the record is poison
    (``PermanentErrorPoison``); None retries until it passes."""

    def __init__(self, kind: str, message: str, permanent_after: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.permanent_after = permanent_after
