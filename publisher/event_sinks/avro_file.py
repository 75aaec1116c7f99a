"""The embedded event log: an Avro object-container file (no server)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any, Mapping

import fastavro

from publisher.event_sinks.base import DoneCallback, EventSink
from schemas.codec import AvroCodec


class AvroFileSink(EventSink):
    """An Avro object-container file, appended to (the embedded default).

    Each ``flush`` writes one block and fsyncs, under an exclusive ``flock`` so several
    engines may share one log. Readers can follow the file as it grows: every block is
    self-delimited by the file's sync marker.
    """

    def __init__(self, path: str | os.PathLike, codec: AvroCodec, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.codec = codec
        self.fsync = fsync
        self._pending: list[tuple[Mapping[str, Any], DoneCallback]] = []

    def publish(self, event, on_done):
        self._pending.append((event, on_done))

    def poll(self, timeout: float = 0.0) -> None:
        if self._pending:
            self.flush(timeout)

    def flush(self, timeout: float) -> int:
        if not self._pending:
            return 0
        batch, self._pending = self._pending, []
        err: Exception | None = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            with os.fdopen(fd, "a+b") as fo:
                fcntl.flock(fo, fcntl.LOCK_EX)
                # fastavro appends to a non-empty 'a+b' file: it reads the existing header
                # (schema, sync marker) and writes one new block.
                fastavro.writer(fo, self.codec.parsed, [e for e, _ in batch], codec="null")
                fo.flush()
                if self.fsync:
                    os.fsync(fo.fileno())
        except Exception as e:  # noqa: BLE001 - reported through every callback
            err = e
        for _, cb in batch:
            cb(err)
        return 0
