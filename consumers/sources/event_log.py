"""The publisher's embedded Avro event log, followed as it grows; the position is a checkpoint file."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import stat
import time
import zlib
from collections import deque
from pathlib import Path
from urllib.parse import unquote, urlsplit

import fastavro

from consumers.sources.base import EventSource, SourceRecord, SourceUnreadable
from schemas.avro_container import MAGIC, Header, moved_aside_order, read_header
from schemas.codec import unreadable_writer_schema

log = logging.getLogger("vllm_mm_events.consumer")


# The largest block read (the publisher writes one block per flush, of up to max_pending_events
# events); a block over it is dead-lettered, not waited for.
MAX_BLOCK_BYTES = 64 << 20
# Records one block may hold: a block is decoded whole, and 64 MiB of minimal records (~20 bytes each)
# would be millions of dicts, gigabytes. A writer's blocks hold a few to a few thousand events.
MAX_BLOCK_RECORDS = 100_000


def _read_long(buf: bytes, pos: int) -> tuple[int, int] | None:
    """Avro zig-zag varint at ``pos`` -> (value, next pos), or None if the bytes end first. A varint
    longer than a long's 10 bytes reads as -1 (a header no writer produces: dead-lettered), never as an
    ever larger number (quadratic to build, and too long to print)."""
    shift = result = 0
    for at in range(pos, pos + 10):
        if at >= len(buf):
            return None
        b = buf[at]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), at + 1
        shift += 7
    return -1, pos + 10


def _open_log(path: Path):
    """The log for reading; SourceUnreadable unless it is a regular file (a FIFO would block the open, and a
    read, for good)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceUnreadable(f"source: {path} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class AvroLogSource(EventSource):
    """Follows an Avro object-container file as the publisher appends blocks to it.

    Position = (which log, byte offset of a block, records of it already done). A checkpoint file
    (written atomically) holds the committed position and the file's sync marker, so a
    replaced log is noticed instead of being read from a wrong offset. A block that cannot
    be read is handed out once, as an error record, and skipped.

    The log is read through the file it was opened as, so one rotated (renamed away, a new one
    at its path: the publisher does so when its event schema changes) is read to its end, and
    then the new one from its start, as ``tail -F`` follows a log.
    """

    def __init__(self, uri: str, group: str, checkpoint: str | None, reader_schema: dict, read_only: bool = False):
        self.path = Path(unquote(urlsplit(uri).path))
        self.read_only = read_only  # from the start, no checkpoint read or written
        self.checkpoint_path = Path(checkpoint) if checkpoint else self.path.with_name(
            f"{self.path.name}.{group}.checkpoint")
        self.reader_schema = fastavro.parse_schema(reader_schema)
        self.writer_schema = None
        self.sync: bytes | None = None
        self._fd: int | None = None  # the log being read, as opened (it may have been renamed since)
        self._file: tuple[int, int] | None = None  # its (device, inode)
        self._generation = 0  # how many logs were followed before this one: the first field of positions
        self._syncs: dict[int, bytes] = {}  # generation -> its log's sync marker, for commit
        self._started = False  # the first log opened (where the checkpoint says, or the oldest)
        self._next: list[Path] = []  # logs rotated away from the path, to read before the path's
        self.codec = "null"
        self.offset = 0  # next block to read
        self.skip = 0  # records of that block already handed out
        self.at_end = False
        self._pending: list[SourceRecord] = []  # decoded but not yet handed out (block larger than a poll)
        # lag(): complete blocks at or past ``offset``, found by walking block headers only
        self._scan_at = 0
        self._scanned: deque[tuple[int, int]] = deque()  # (block offset, record count)
        self._scanned_records = 0

    def _open_header(self) -> bool:
        """Open the next log to read; False while none is there, or its header is still being written.

        First: the log the checkpoint is of (the path's, or one rotated away from it since), else the
        oldest log rotated away from the path, else the path's. After one is read to its end: the next
        rotated one, then the path's."""
        if not self._started:
            opened, ck, self._next = self._first()
        elif self._next:
            opened, ck = self._open_file(self._next.pop(0)), None
            if opened is None:  # a rotated log with no whole header: nothing in it to read
                return self._open_header()
        else:
            opened, ck = self._open_file(self.path), None
        if opened is None:
            return False
        self._started = True
        fd, hdr, st = opened
        try:
            self._use(hdr, st, ck)
        except BaseException:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        return True

    def _first(self) -> tuple[tuple[int, Header, os.stat_result] | None, dict | None, list[Path]]:
        """(the first log opened, the checkpoint, the rotated logs to read after it)."""
        ck = None if self.read_only else self._read_checkpoint()
        rotated = self._rotated_logs()
        if ck is not None:
            for i, p in enumerate(rotated):
                opened = self._open_file(p)
                if opened is not None and opened[1].sync.hex() == ck.get("sync"):
                    log.info("file source: the checkpoint is of %s, rotated away from %s: reading it to its end "
                             "first", p, self.path)
                    return opened, ck, rotated[i + 1:]
                if opened is not None:
                    os.close(opened[0])
            return self._open_file(self.path), ck, []
        while rotated:  # from the beginning: the oldest log first
            opened = self._open_file(rotated.pop(0))
            if opened is not None:
                return opened, None, rotated
        return self._open_file(self.path), None, []

    def _rotated_logs(self) -> list[Path]:
        """The logs the publisher moved aside from the path (``<name>.<UTC time>[.<n>]``), oldest first."""
        found = []
        for p in self.path.parent.glob(glob.escape(self.path.name) + ".*"):
            order = moved_aside_order(self.path.name, p.name)
            if order is not None and p.is_file():
                found.append((order, p))
        return [p for _, p in sorted(found)]

    def _open_file(self, path: Path) -> tuple[int, Header, os.stat_result] | None:
        """(fd, header, stat) of the log at ``path``; None if it is not there or its header is incomplete."""
        try:
            f = _open_log(path)
        except FileNotFoundError:
            return None
        with f:
            hdr = read_header(f.read(1 << 20))
            return None if hdr is None else (os.dup(f.fileno()), hdr, os.fstat(f.fileno()))

    def _use(self, hdr: Header, st: os.stat_result, ck: dict | None) -> None:
        if hdr.magic != MAGIC:
            raise SourceUnreadable(f"source: {self.path} is not an Avro object container file")
        codec = hdr.meta.get("avro.codec", b"null")
        if codec not in (b"null", b"deflate"):
            raise SourceUnreadable(f"source: {self.path} uses codec {codec[:40]!r}; this reader handles null and "
                                   "deflate")
        # The header is input like any other: its schema must parse, and must not make a reader loop.
        try:
            schema = json.loads(hdr.meta["avro.schema"])
            writer = fastavro.parse_schema(schema)
        except Exception as e:  # noqa: BLE001 - missing, not JSON, too deep, not Avro: all the same to us
            raise SourceUnreadable(f"source: {self.path} has no usable writer schema in its header "
                                   f"({type(e).__name__}: {str(e)[:200]})") from None
        if (why := unreadable_writer_schema(writer)) is not None:
            raise SourceUnreadable(f"source: {self.path}: its writer schema is refused: {why}")
        self.sync, self.codec, self.writer_schema = hdr.sync, codec.decode(), writer
        self._file = (st.st_dev, st.st_ino)
        self._syncs[self._generation] = hdr.sync
        self.offset, self.skip = hdr.end, 0
        if ck is not None:
            if ck.get("sync") == self.sync.hex():
                self.offset, self.skip = int(ck["offset"]), int(ck["index"])
                log.info("file source: resuming %s at byte %d (+%d records)", self.path, self.offset, self.skip)
            else:
                log.warning("file source: %s is not the log the checkpoint is of (its sync marker differs), nor is "
                            "any log beside it; reading it from its start", self.path)

    def _read_checkpoint(self) -> dict | None:
        try:
            return json.loads(self.checkpoint_path.read_text())
        except FileNotFoundError:
            return None

    def poll(self, max_records: int, timeout: float) -> list[SourceRecord]:
        deadline = time.monotonic() + timeout
        while True:
            if not self._pending:
                self._read_blocks(max_records)
            if self._pending or time.monotonic() >= deadline:
                out, self._pending = self._pending[:max_records], self._pending[max_records:]
                return out
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _read_blocks(self, max_records: int) -> None:
        if self.sync is None and not self._open_header():
            self.at_end = True
            return
        size = os.fstat(self._fd).st_size
        if size < self.offset:
            raise SourceUnreadable(f"source: {self.path} was truncated under the reader (to {size} bytes, below "
                                   f"byte {self.offset}); restart the consumer to read it from its start")
        data = os.pread(self._fd, min(size - self.offset, MAX_BLOCK_BYTES + 64), self.offset)
        pos, produced = 0, 0
        while produced < max_records:
            block_at = self.offset + pos
            head = _read_long(data, pos)
            head2 = head and _read_long(data, head[1])
            if not head2:
                break
            count, (blen, body_at) = head[0], head2
            if blen > MAX_BLOCK_BYTES and count >= 1:
                # Too large to read: skipped whole once complete (never waited for in a window that
                # cannot hold it), else dead-lettered up to the next sync marker like any corrupt header.
                block_end = self.offset + body_at + blen + 16
                if block_end <= size and self._sync_at(block_end - 16):
                    end = block_end - self.offset
                    records = [self._error_record(data[pos:pos + 4096], block_at, block_end,
                                                  f"block of {blen} bytes, over the {MAX_BLOCK_BYTES}-byte cap")]
                    self._pending.extend(records)
                    produced += 1
                    pos = end
                    break  # ``end`` lies past this window: read on from there next time
                if block_end > size and data.find(self.sync, body_at) < 0:
                    break  # still being written
            if count < 1 or blen < 1 or count > blen or blen > MAX_BLOCK_BYTES or count > MAX_BLOCK_RECORDS:
                # A header no writer produces: it can never complete, so waiting for it would stall
                # the reader for good; or one too many records to decode at once. Dead-letter up to
                # the next sync marker.
                nxt = data.find(self.sync, body_at)
                if nxt < 0:
                    if len(data) <= MAX_BLOCK_BYTES:
                        break  # no marker yet: the next block's end brings one
                    nxt = len(data) - 16  # a whole window without any marker: skip it
                end = nxt + 16
                why = (f"block of {count} records, over the {MAX_BLOCK_RECORDS}-record cap"
                       if 1 <= count <= blen <= MAX_BLOCK_BYTES
                       else f"corrupt block header (count {count}, length {blen})")
                records = [self._error_record(data[pos:min(end, pos + 4096)], block_at, self.offset + end, why)]
            else:
                end = body_at + blen + 16
                if end > len(data):
                    break  # the writer is still appending this block
                if data[body_at + blen:end] != self.sync:
                    nxt = data.find(self.sync, body_at)
                    if nxt < 0:
                        break
                    end = nxt + 16
                    records = [self._error_record(data[pos:min(end, pos + 4096)], block_at, self.offset + end,
                                                  "corrupt block (sync marker not found)")]
                else:
                    records = self._decode_block(data[body_at:body_at + blen], count, block_at, self.offset + end)
            self._pending.extend(records)
            produced += len(records)
            pos = end
        self.at_end = produced == 0
        if pos:
            self.offset += pos  # read position; the committed one is in the checkpoint
            self.skip = 0
        if self.at_end and self._rotated():
            if os.fstat(self._fd).st_size > size:  # the old log grew after it was read: read on first
                self.at_end = False
                return
            self._follow(size)

    def _rotated(self) -> bool:
        """Whether the log being read is done with: rotated away (the path names another file), or one of the
        rotated logs read before the path's."""
        if self._next:
            return True
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # moved away, the new log not there yet
        return (st.st_dev, st.st_ino) != self._file

    def _follow(self, size: int) -> None:
        """The old log is read to its end: on to the new one, from its start. A tail of the old one that
        never became a whole block (its writer killed) is handed out once, as an error record."""
        if self.offset < size:
            tail = os.pread(self._fd, 4096, self.offset)
            self._pending.append(self._error_record(tail, self.offset, size,
                                                    "incomplete block at the end of a rotated log"))
            self.offset = size
        log.info("file source: %s was rotated; read to its end, now reading the new log", self.path)
        os.close(self._fd)
        self._fd, self.sync = None, None
        self._generation += 1
        self._scan_at, self._scanned_records = 0, 0  # lag() walks the new log's blocks
        self._scanned.clear()
        self._open_header()
        self.at_end = False  # the new log is yet to be read (caught_up asks it)

    def _sync_at(self, offset: int) -> bool:
        return os.pread(self._fd, 16, offset) == self.sync

    def _error_record(self, value: bytes, block_at: int, next_block: int, error: str) -> SourceRecord:
        """A block that cannot be read, handed out once (for the dead-letter queue) and skipped."""
        return SourceRecord(value=bytes(value), position=(self._generation, block_at, 0, next_block, 1),
                            coords=self._coords(block_at, 0), error=error)

    def _decode_block(self, body: bytes, count: int, block_at: int, next_block: int) -> list[SourceRecord]:
        try:
            if self.codec == "deflate":
                inflater = zlib.decompressobj(-15)
                raw = inflater.decompress(body, MAX_BLOCK_BYTES)
                if inflater.unconsumed_tail:
                    raise ValueError(f"inflates past the {MAX_BLOCK_BYTES}-byte cap")
            else:
                raw = body
            buf = io.BytesIO(raw)
            events = [fastavro.schemaless_reader(buf, self.writer_schema, self.reader_schema) for _ in range(count)]
            if buf.tell() != len(raw):
                raise ValueError(f"{len(raw) - buf.tell()} bytes left after {count} records")
        except Exception as e:  # noqa: BLE001 - one unreadable block is dead-lettered, not fatal
            return [self._error_record(body[:4096], block_at, next_block, f"undecodable block: {e}")]
        out = []
        for i, ev in enumerate(events):
            if block_at == self.offset and i < self.skip:
                continue  # committed before a restart
            out.append(SourceRecord(value=b"", event=ev, position=(self._generation, block_at, i, next_block, count),
                                    coords=self._coords(block_at, i)))
        return out

    def _coords(self, block_at: int, index: int) -> dict[str, str]:
        return {"file": str(self.path), "block_offset": str(block_at), "index": str(index)}

    def commit(self, records: list[SourceRecord]) -> None:
        if self.read_only:
            raise RuntimeError(f"source: {self.path} was opened read-only; nothing is committed")
        if not records:
            return
        generation, block_at, i, next_block, count = max(r.position for r in records)
        offset, index = (next_block, 0) if i + 1 >= count else (block_at, i + 1)
        sync = self._syncs[generation]  # the log the records are of (one rotated away since, perhaps)
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"path": str(self.path), "offset": offset, "index": index, "sync": sync.hex()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)
        fd = os.open(self.checkpoint_path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def caught_up(self) -> bool:
        if self._pending:
            return False
        if self.at_end:
            return True
        try:  # everything read up to the file's end: no need for another (empty) read to say so
            # a log rotated under the reader is not caught up: the new one is still to be read
            return self.sync is not None and not self._rotated() and os.fstat(self._fd).st_size <= self.offset
        except OSError:
            return False

    def lag(self) -> int | None:
        """Records not yet handed out: those pending plus the counts in the headers of the complete
        blocks ahead. Only block headers and sync markers are read, and each block once (the log
        only grows), so this stays cheap on a long log."""
        if self.sync is None:
            return None
        if self._scan_at < self.offset:
            self._scan_at, self._scanned_records = self.offset, 0
            self._scanned.clear()
        while self._scanned and self._scanned[0][0] < self.offset:
            self._scanned_records -= self._scanned.popleft()[1]
        try:
            size = os.fstat(self._fd).st_size
            while self._scan_at < size:
                head = os.pread(self._fd, 20, self._scan_at)
                count_at = _read_long(head, 0)
                len_at = count_at and _read_long(head, count_at[1])
                if not len_at:
                    break
                count, (blen, body_at) = count_at[0], len_at
                end = self._scan_at + body_at + blen + 16
                if count < 1 or blen < 1 or count > blen or end > size:
                    break  # still being written, or corrupt: counted once the reader is past it
                if os.pread(self._fd, 16, end - 16) != self.sync:
                    break
                self._scanned.append((self._scan_at, count))
                self._scanned_records += count
                self._scan_at = end
        except OSError:
            return None
        done = self.skip if self._scanned and self._scanned[0][0] == self.offset else 0
        return max(0, self._scanned_records - done) + len(self._pending)
