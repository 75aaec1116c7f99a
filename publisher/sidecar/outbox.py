"""The durable outbox of the scheduler sidecar: a finished request is on disk before its event is
sent, and stays there until the sink acknowledges it; a publisher that starts again replays what
was never acknowledged (same ``event_id``: a consumer sees at most a repeat, never a loss).

Layout: ``<spool_dir>/<stream>/slot-<n>/``. ``<stream>`` is a digest of the event sink's URI,
so events are only ever replayed into the stream they were meant for. One slot per running
publisher, held with ``flock``; a publisher that starts takes the lowest free slot and
replays what a dead one left in it:

- ``<seq>.seg``: records ``[u32 length][u32 crc32][JSON]``, one per finished request (its
  snapshot and object keys), appended and fsynced in groups (``sync``: one fsync for every
  request offered since the last one). A torn last record (crash mid-write) fails its length or
  CRC check and is dropped on replay: it was never synced, so no event was sent for it.
- ``acks``: one event id per line, appended when the sink acknowledged and written out with the
  next ``sync`` (one write per pump, not one per event); never fsynced (a lost ack only means a
  repeat). A segment whose records are all acknowledged is deleted, and its ids' lines are dead
  weight: once the file passes ``ACKS_COMPACT_BYTES`` and most lines are dead, it is rewritten with
  the live ones (those of segments still on disk) and renamed into place. Under a steady load some
  event is always in flight, so "wait until everything is acknowledged" would never come: the file
  grew ~37 bytes per event for good, outside ``max_spool_bytes`` (gigabytes a day at a few hundred
  requests per second, then an evicted pod), and all of it was read into memory at the next start.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import struct
import zlib
from pathlib import Path

from publisher.sidecar.events import FinishedRequest, MediaItem

log = logging.getLogger("vllm_mm_events.outbox")
_HEADER = struct.Struct("<II")
SEGMENT_BYTES = 8 << 20
ACKS_COMPACT_BYTES = 1 << 20


class SpoolError(Exception):
    """``requests`` finished requests could not be spooled (a full or failing disk): the caller still
    publishes them, without the spool's guarantee, and counts them (``events_unspooled``). The outbox
    goes on with a fresh segment: a failed write leaves no torn record ahead of later ones."""

    def __init__(self, message: str, requests: int = 1):
        super().__init__(message)
        self.requests = requests


class OutboxFull(SpoolError):
    """``max_spool_bytes`` reached: the caller applies its backpressure policy."""


_JSON = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps would build this encoder per call


def _encode(req: FinishedRequest, keys: dict[str, str]) -> bytes:
    # Shallow, by hand: dataclasses.asdict deep-copies every value and was a fifth of the scheduler
    # sidecar's CPU per request; the fields are plain values, serialized at once.
    return _JSON({"req": {**vars(req), "items": [vars(i) for i in req.items]}, "keys": keys}).encode()


def _decode(payload: bytes) -> tuple[FinishedRequest, dict[str, str]]:
    d = json.loads(payload)
    r = d["req"]
    r["items"] = tuple(MediaItem(**i) for i in r["items"])
    return FinishedRequest(**r), dict(d["keys"])


class Outbox:
    def __init__(self, spool_dir: str | os.PathLike, stream: str, max_bytes: int, fsync: bool = True):
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.dir = self._take_slot(Path(spool_dir) / hashlib.sha256(stream.encode()).hexdigest()[:16])
        self._acks = open(self.dir / "acks", "a")
        self._ack_lines = self._ack_bytes = 0  # in the acks file
        self._acked: dict[int, list[str]] = {}  # seq -> its acknowledged event ids (the acks file's live lines)
        self._acked_live = 0  # how many: sum(map(len, self._acked.values()))
        self._segments: dict[int, set[str]] = {}  # seq -> event ids not yet acknowledged
        self._sizes: dict[int, int] = {}
        self._where: dict[str, int] = {}  # event id -> its segment
        self._replay: list[tuple[FinishedRequest, dict[str, str]]] = []
        self._load()
        self._seq = max(self._segments, default=0) + 1
        self._file = None
        self._dirty = False
        self._unsynced: list[str] = []  # event ids appended to the current segment since its last sync
        self._synced = 0  # the current segment's size at its last sync

    # ---- slots ---------------------------------------------------------------------------
    def _take_slot(self, root: Path) -> Path:
        root.mkdir(mode=0o750, parents=True, exist_ok=True)
        for n in range(1024):
            slot = root / f"slot-{n}"
            slot.mkdir(mode=0o750, exist_ok=True)
            fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd = fd  # held for the life of the process
            return slot
        raise RuntimeError(f"spool_dir: no free slot under {root} (1024 publishers running?)")

    # ---- replay --------------------------------------------------------------------------
    def _load(self) -> None:
        acked = set((self.dir / "acks").read_text().split()) if (self.dir / "acks").exists() else set()
        for path in sorted(self.dir.glob("*.seg"), key=lambda p: int(p.stem)):
            seq, data, pos, live, done = int(path.stem), path.read_bytes(), 0, set(), []
            while pos + _HEADER.size <= len(data):
                n, crc = _HEADER.unpack_from(data, pos)
                payload = data[pos + _HEADER.size:pos + _HEADER.size + n]
                if len(payload) < n or zlib.crc32(payload) != crc:
                    log.warning("mm-events outbox: dropped a torn record at the end of %s", path)
                    break
                pos += _HEADER.size + n
                try:
                    req, keys = _decode(payload)
                except (ValueError, KeyError, TypeError) as e:
                    log.error("mm-events outbox: skipped an unreadable record in %s: %s", path, e)
                    continue
                if req.event_id not in acked:
                    live.add(req.event_id)
                    self._where[req.event_id] = seq
                    self._replay.append((req, keys))
                else:
                    done.append(req.event_id)
            if live:
                self._segments[seq], self._sizes[seq], self._acked[seq] = live, len(data), done
                self._acked_live += len(done)
            else:
                path.unlink()
        self._ack_lines, self._ack_bytes = len(acked), self._acks.tell()
        if self._ack_lines > 2 * self._acked_live:  # the acks of segments deleted above, or by an earlier run
            try:
                self._compact_acks()
            except OSError as e:  # a full disk: start with the file as it is (it is only read at a start)
                log.warning("mm-events outbox: cannot compact the acknowledgements (%s)", e.strerror or e)
        if self._replay:
            log.info("mm-events outbox: replaying %d unacknowledged event(s) from %s", len(self._replay), self.dir)

    def take_replay(self) -> list[tuple[FinishedRequest, dict[str, str]]]:
        """What a previous publisher left unacknowledged, oldest first (once)."""
        out, self._replay = self._replay, []
        return out

    # ---- writing -------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def append(self, req: FinishedRequest, keys: dict[str, str]) -> None:
        """Spool one finished request (durable after the next ``sync``)."""
        if self.full():
            raise OutboxFull(f"spool holds {self.bytes} bytes (max_spool_bytes {self.max_bytes})")
        payload = _encode(req, keys)
        try:
            if self._file is None or self._sizes.get(self._seq, 0) >= SEGMENT_BYTES:
                self._rotate()
            self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        except SpoolError as e:  # the sync of the records before it, in _rotate: this one is not written either
            raise SpoolError(str(e), e.requests + 1) from None
        except OSError as e:  # opening a segment, or a full buffer written out
            lost = self._drop_unsynced()
            raise SpoolError(f"cannot write to the spool ({e.strerror or e}); {lost} request(s) before it "
                             "with it", 1 + lost) from None
        self._sizes[self._seq] = self._sizes.get(self._seq, 0) + _HEADER.size + len(payload)
        self._segments.setdefault(self._seq, set()).add(req.event_id)
        self._where[req.event_id] = self._seq
        self._unsynced.append(req.event_id)
        self._dirty = True

    def _drop_unsynced(self) -> int:
        """After a failed write: forget the records since the current segment's last sync, cut the file
        back to it, and start the next record in a new segment. Returns how many were dropped."""
        ids, self._unsynced = self._unsynced, []
        seq, live = self._seq, self._segments.get(self._seq, set())
        for i in ids:
            live.discard(i)
            self._where.pop(i, None)
        if self._file is not None:
            try:
                self._file.close()  # it flushes what it buffered (and fails again): closed either way
            except OSError:
                pass
            self._file = None
        try:
            os.truncate(self.dir / f"{seq}.seg", self._synced)
        except OSError:
            pass  # replay drops a torn last record anyway
        self._sizes[seq] = self._synced
        if not live:
            self._drop_segment(seq)
        self._seq += 1
        self._synced = 0
        self._dirty = False
        return len(ids)

    def _rotate(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            if not self._segments.get(self._seq):  # all acknowledged while it was the one written
                self._drop_segment(self._seq)
            self._seq += 1
            self._synced = 0
        fd = os.open(self.dir / f"{self._seq}.seg", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o640)
        self._file = os.fdopen(fd, "ab")

    def sync(self) -> None:
        """Make every appended record durable: one write-out and fsync for the group; write out the
        acknowledgements since the last call. ``SpoolError`` if the records could not be written."""
        try:
            self._acks.flush()
            if self._ack_bytes > ACKS_COMPACT_BYTES and self._ack_lines > 2 * self._acked_live:
                self._compact_acks()
        except OSError as e:  # a lost ack only means a repeat after a restart
            log.warning("mm-events outbox: cannot write acknowledgements (%s); they may be sent again after a "
                        "restart", e.strerror or e)
            self._reopen_acks()
        if self._dirty and self._file is not None:
            try:
                self._file.flush()
                if self.fsync:
                    os.fsync(self._file.fileno())
            except OSError as e:
                lost = self._drop_unsynced()
                raise SpoolError(f"cannot write to the spool ({e.strerror or e})", lost) from None
            self._dirty = False
            self._synced = self._sizes.get(self._seq, 0)
            self._unsynced.clear()

    def _reopen_acks(self) -> None:
        try:
            self._acks.close()  # drops what it could not write
        except OSError:
            pass
        self._acks = open(self.dir / "acks", "a")

    def ack(self, event_id: str) -> None:
        """The sink has the event: forget it (its segment goes once all of it is acknowledged)."""
        seq = self._where.pop(event_id, None)
        if seq is None:
            return
        try:
            self._acks.write(event_id + "\n")  # buffered: a write can meet a full disk too
            self._ack_lines += 1
            self._ack_bytes += len(event_id) + 1
        except OSError as e:  # a lost ack only means a repeat after a restart
            log.warning("mm-events outbox: cannot write acknowledgements (%s); they may be sent again after a "
                        "restart", e.strerror or e)
            self._reopen_acks()
        self._acked.setdefault(seq, []).append(event_id)
        self._acked_live += 1
        live = self._segments.get(seq)
        if live is not None:
            live.discard(event_id)
            if not live and seq != self._seq:
                self._drop_segment(seq)

    def _drop_segment(self, seq: int) -> None:
        """Every record of segment ``seq`` is acknowledged: delete it (its ack lines become dead)."""
        self._acked_live -= len(self._acked.pop(seq, ()))
        self._segments.pop(seq, None)
        self._sizes.pop(seq, None)
        (self.dir / f"{seq}.seg").unlink(missing_ok=True)

    def _compact_acks(self) -> None:
        """Rewrite the acks file with its live lines only (called once most of it is dead: the file
        stays within twice the acknowledged records of the segments on disk, or ``ACKS_COMPACT_BYTES``)."""
        text = "".join(i + "\n" for ids in self._acked.values() for i in ids)
        tmp = self.dir / "acks.new"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            if self.fsync:  # before the rename: a crash must leave the old file or this one, whole
                os.fsync(f.fileno())
        self._acks.close()
        os.replace(tmp, self.dir / "acks")
        self._acks = open(self.dir / "acks", "a")
        self._ack_lines, self._ack_bytes = self._acked_live, len(text)

    def close(self) -> None:
        try:
            self.sync()
        except SpoolError as e:  # the caller reports what is undelivered; this is what the spool lost
            log.error("mm-events outbox: %d request(s) not spooled at close: %s", e.requests, e)
        if self._file is not None:
            self._file.close()
        self._acks.close()
        os.close(self._lock_fd)
