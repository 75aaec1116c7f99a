"""The embedded event log: an Avro object-container file (no server)."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import fastavro

from publisher.event_sinks.base import DoneCallback, EventSink, RecordRefused
from schemas.avro_container import MAGIC, Header, moved_aside_name, read_header
from schemas.codec import AvroCodec, schema_fingerprint

log = logging.getLogger("vllm_mm_events.event_log")


class AvroFileSink(EventSink):
    """An Avro object-container file, appended to (the embedded default).

    Each ``flush`` writes one block and fsyncs, under an exclusive ``flock`` so several
    engines may share one log. Readers can follow the file as it grows: every block is
    self-delimited by the file's sync marker. A block cut short (a writer killed in the middle of
    it, a full disk) is cut off before the next one is written (``_cut_torn_tail``).

    A log that cannot be written (a full, read-only or failing disk; a file at the path that is not a
    log) keeps its events pending, in order, and tries again from ``poll`` with a backoff (0.5 s
    doubling to 5 s) until it takes them: they stay in flight meanwhile, so the caller's backpressure
    applies. A failed append is cut off again, whole blocks included, so nothing is written twice. An
    event that does not encode (alone, in memory) is ``RecordRefused``; the others are written.
    """

    RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0

    def __init__(self, path: str | os.PathLike, codec: AvroCodec, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.codec = codec
        self.fsync = fsync
        self._pending: list[tuple[Mapping[str, Any], DoneCallback]] = []
        self._whole_at = -1  # the log's size when it last ended in a whole block (this process's view)
        self._schema_checked: tuple[int, int] | None = None  # (device, inode) of the log found of this schema
        self._retry_s = self.RETRY_MIN_S
        self._retry_at = 0.0  # while the log cannot be written: when to try again
        self.resends = 0

    def publish(self, event, on_done):
        self._pending.append((event, on_done))

    def poll(self, timeout: float = 0.0) -> None:
        if self._pending and time.monotonic() >= self._retry_at:
            self._write_pending()

    def flush(self, timeout: float) -> int:
        """Tries again, while time is left, what the disk refused; returns how many are still pending."""
        deadline = time.monotonic() + timeout
        while self._pending:
            now = time.monotonic()
            if now >= self._retry_at:
                self._write_pending()
            elif self._retry_at < deadline:
                time.sleep(self._retry_at - now)
            else:
                break
        return len(self._pending)

    def close(self) -> None:
        """What is still pending stays in the caller's outbox; nothing is written from here on."""
        self._pending.clear()

    def _write_pending(self) -> None:
        batch = self._pending
        try:
            self._append([e for e, _ in batch])
        except Exception as e:  # noqa: BLE001 - the log's fault, unless an event does not encode
            refused = self._refuse_unencodable()
            if not refused:  # the disk, or the file at the path (not a log, a header cut): all wait
                self._log_refused(e)
            elif self._pending:
                self._write_pending()  # the others, at once
            return
        self._pending = []
        self._log_back()
        for _, cb in batch:
            cb(None)

    def _refuse_unencodable(self) -> int:
        """Fail the pending events that do not encode alone (in memory: no file involved), ``RecordRefused``:
        every try would fail alike. Returns how many; the others stay pending, in order."""
        keep, refused = [], 0
        for event, cb in self._pending:
            try:
                fastavro.schemaless_writer(io.BytesIO(), self.codec.parsed, event)
            except Exception as e:  # noqa: BLE001 - that event's own fault
                cb(RecordRefused(f"{type(e).__name__}: {e}"))
                refused += 1
                continue
            keep.append((event, cb))
        self._pending = keep
        return refused

    def _log_refused(self, e: Exception) -> None:
        if self._retry_s == self.RETRY_MIN_S:  # once per outage, not per try
            log.error("mm-events: cannot write the event log %s (%s: %s); %d event(s) wait, tried again every "
                      "%.1f-%.0f s", self.path, type(e).__name__, e, len(self._pending), self.RETRY_MIN_S,
                      self.RETRY_MAX_S)
        self.resends += len(self._pending)
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(self._retry_s * 2, self.RETRY_MAX_S)

    def _log_back(self) -> None:
        if self._retry_s != self.RETRY_MIN_S:
            log.warning("mm-events: the event log %s is written again", self.path)
        self._retry_s, self._retry_at = self.RETRY_MIN_S, 0.0

    def _append(self, events: list) -> None:
        """One block at the log's end, fsynced, under the lock; the log first cut back to a whole block,
        and moved aside if it holds an earlier release's schema (a new one is started)."""
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            with os.fdopen(fd, "a+b") as fo:
                fcntl.flock(fo, fcntl.LOCK_EX)
                st = os.fstat(fd)
                try:
                    at_path = os.stat(self.path)
                except FileNotFoundError:
                    continue  # moved aside by another engine meanwhile: open the new one
                if (at_path.st_dev, at_path.st_ino) != (st.st_dev, st.st_ino):
                    continue
                self._cut_torn_tail(fd)
                if self._schema_checked != (st.st_dev, st.st_ino):  # once per log
                    if self._holds_an_older_schema(fd):
                        self._move_aside()
                        continue
                    self._schema_checked = (st.st_dev, st.st_ino)
                start = fo.seek(0, os.SEEK_END)  # where fastavro looks to tell a new log from one to append to
                try:
                    # fastavro appends to a non-empty 'a+b' file: it reads the existing header (schema, sync
                    # marker) and writes blocks (one per 16 KB of records).
                    fastavro.writer(fo, self.codec.parsed, events, codec="null")
                    fo.flush()
                    if self.fsync:
                        os.fsync(fd)
                except BaseException:
                    # Whole blocks of this batch may be in the file already: cut them off, or the retry
                    # would write their events twice.
                    try:
                        os.ftruncate(fd, start)
                    except OSError:  # the next append cuts back to its last whole block
                        pass
                    raise
                self._whole_at = os.fstat(fd).st_size
                return
        raise OSError(f"{self.path} was moved away at every try")

    def _holds_an_older_schema(self, fd: int) -> bool:
        """Whether the log was started by an earlier release, with a schema that lacks fields this one
        writes: appended to, their values would be dropped (a container file has one schema). A log of a
        later release is appended to as it is (this release writes none of its new fields)."""
        _, header = self._header(fd)
        if header is None or header.magic != MAGIC:
            return False
        try:
            fp = schema_fingerprint(fastavro.parse_schema(json.loads(header.meta["avro.schema"])))
        except Exception:  # noqa: BLE001 - not a schema of ours: fastavro's append says what is wrong
            return False
        return self.codec.is_older_writer(fp)

    def _move_aside(self) -> None:
        """Rename the log to ``<name>.<UTC time>``: a consumer following it reads it to its end through the
        file it opened, then the new log at the path from its start."""
        for n in range(100):
            aside = self.path.with_name(moved_aside_name(self.path.name, n))
            if not aside.exists():
                break
        os.rename(self.path, aside)
        self._whole_at = -1
        log.warning("mm-events: %s was started by an earlier release (an older event schema); moved to %s and "
                    "a new log started, so no field of this release's events is dropped", self.path, aside)

    def _cut_torn_tail(self, fd: int) -> None:
        """Cut the log back to its last whole block, under the lock, before appending.

        Readers find a block's end by the sync marker after it: a torn block followed by the next
        flush's block would be read as one corrupt block, and the events of both lost. The torn
        block's events were never acknowledged (its fsync never returned), so they are still in the
        outbox and published again. A header cut short holds no events: the log starts again."""
        size = os.fstat(fd).st_size
        if size == 0 or size == self._whole_at:
            return
        head, header = self._header(fd)
        if header is None or header.magic != MAGIC:
            if header is None and head[:4] == MAGIC[:len(head[:4])] and len(head) < 1 << 20:
                log.warning("mm-events: %s: its header was cut short (%d bytes); the log starts again", self.path,
                            size)
                os.ftruncate(fd, 0)
            return  # another kind of file: fastavro's error says so, to every callback
        if os.pread(fd, 16, size - 16) == header.sync:  # the header ends with the marker too
            self._whole_at = size
            return
        whole = self._last_sync_end(fd, header.sync, header.end, size)
        log.warning("mm-events: %s ended in a block cut short (%d bytes after the last whole one, at byte %d); cut "
                    "off: its events are published again from the outbox", self.path, size - whole, whole)
        os.ftruncate(fd, whole)
        self._whole_at = whole

    @staticmethod
    def _header(fd: int) -> tuple[bytes, Header | None]:
        """The log's first bytes and its header (None if cut short): 64 KiB first, a header of this project's
        schema being ~5 KB; up to 1 MiB for a larger one."""
        head = os.pread(fd, 64 << 10, 0)
        header = read_header(head)
        if header is None and len(head) == 64 << 10:
            head = os.pread(fd, 1 << 20, 0)
            header = read_header(head)
        return head, header

    @staticmethod
    def _last_sync_end(fd: int, sync: bytes, first_block: int, size: int) -> int:
        """The offset just past the last sync marker in the file (at least the header's end)."""
        chunk, end = 1 << 20, size
        while end > first_block:
            start = max(first_block, end - chunk)
            data = os.pread(fd, end - start + 15, start)  # 15 bytes of overlap: a marker across chunks
            at = data.rfind(sync)
            if at >= 0:
                return start + at + 16
            end = start
        return first_block
