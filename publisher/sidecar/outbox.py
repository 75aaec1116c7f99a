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
  CRC check and is dropped on replay: it was never synced, so no event was sent for it. An
  unreadable record with whole ones after it (the disk, a hand) is not torn: the segment is set
  aside as ``<seq>.seg.corrupt`` (kept as it was) and rewritten with the records that read.
- ``acks``: one event id per line, appended when the sink acknowledged and written out with the
  next ``sync`` (one write per pump, not one per event); never fsynced (a lost ack only means a
  repeat). A segment whose records are all acknowledged is deleted, and its ids' lines are dead
  weight: once the file passes ``ACKS_COMPACT_BYTES`` and most lines are dead, it is rewritten with
  the live ones (those of segments still on disk) and renamed into place. Under a steady load some
  event is always in flight, so "wait until everything is acknowledged" would never come: the file
  grew ~37 bytes per event for good, outside ``max_spool_bytes`` (gigabytes a day at a few hundred
  requests per second, then an evicted pod), and all of it was read into memory at the next start.

A slot of the same stream that no running publisher holds (a second engine not started again) is
adopted at the start: its segments are moved into this publisher's slot and replayed with its own.
Spools of other streams (an ``event_sink`` since changed) are named in a warning, never replayed.
"""

from __future__ import annotations

import dataclasses
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


_REQ_FIELDS = frozenset(f.name for f in dataclasses.fields(FinishedRequest))
_ITEM_FIELDS = frozenset(f.name for f in dataclasses.fields(MediaItem))
_START = b'{"req":'  # how every record's JSON starts; JSON escapes its quotes anywhere inside a string


def _decode(payload: bytes) -> tuple[FinishedRequest, dict[str, str]]:
    d = json.loads(payload)
    r = d["req"]
    if "event_id" not in r:  # never the default (a fresh id): a replay must keep the one sent
        raise KeyError("event_id")
    # A newer release's fields are left out: this release's events have no place for them, and its
    # record is replayed instead of lost (a downgrade). A missing field without a default still fails.
    r["items"] = tuple(MediaItem(**{k: v for k, v in i.items() if k in _ITEM_FIELDS}) for i in r["items"])
    return FinishedRequest(**{k: v for k, v in r.items() if k in _REQ_FIELDS}), dict(d["keys"])


def _number(path: Path) -> int | None:
    """``<n>`` of a segment file ``<n>.seg`` (or one set aside, ``<n>.seg.corrupt``)."""
    n = path.name.split(".", 1)[0]
    return int(n) if n.isascii() and n.isdigit() else None


def _whole(data: bytes, pos: int) -> int:
    """The end of the whole record at ``pos`` (its length and CRC check out), or -1."""
    if pos + _HEADER.size > len(data):
        return -1
    n, crc = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + n
    return end if n and end <= len(data) and zlib.crc32(data[pos + _HEADER.size:end]) == crc else -1


def _lock(slot: Path) -> int | None:
    """Hold ``slot``'s lock: its fd, or None where a running publisher holds it."""
    fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


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
        self._unlink_failing = False  # logged once until an unlink works again
        self._load()
        self._seq = self._top + 1
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
            fd = _lock(slot)
            if fd is None:
                continue
            self._lock_fd = fd  # held for the life of the process
            return slot
        raise RuntimeError(f"spool_dir: no free slot under {root} (1024 publishers running?)")

    # ---- replay --------------------------------------------------------------------------
    def _load(self) -> None:
        # New segments are numbered above every one here, set aside ones too: a name is never used twice.
        self._top = max((n for p in self.dir.glob("*.seg*") if (n := _number(p)) is not None), default=0)
        acked = self._load_slot(self.dir)
        self._ack_lines = len(acked)
        for slot in sorted(self.dir.parent.parent.glob("*/slot-*")):  # other slots: this stream's, and others'
            if slot == self.dir or not slot.is_dir() or not (count := len(list(slot.glob("*.seg")))):
                continue
            try:
                fd = _lock(slot)
            except OSError:  # not ours to look at (another user's, a read-only volume)
                fd = None
            if fd is None:  # a running publisher's
                continue
            try:
                if slot.parent == self.dir.parent:
                    self._load_slot(slot)
                else:
                    log.warning("mm-events outbox: %s holds %d segment file(s) left by a publisher of another "
                                "event_sink, never replayed here; start a publisher with that event_sink on this "
                                "spool_dir to replay them (its directory is the first 16 hex digits of the SHA-256 "
                                "of the event_sink string), or delete the directory", slot, count)
            finally:
                os.close(fd)
        self._ack_bytes = self._acks.tell()
        if self._ack_lines > 2 * self._acked_live:  # the acks of segments deleted above, or by an earlier run
            try:
                self._compact_acks()
            except OSError as e:  # a full disk: start with the file as it is (it is only read at a start)
                log.warning("mm-events outbox: cannot compact the acknowledgements (%s)", e.strerror or e)
                self._reopen_acks()  # it may have been closed before the failure
        if self._replay:
            log.info("mm-events outbox: replaying %d unacknowledged event(s) from %s", len(self._replay), self.dir)

    def _load_slot(self, slot: Path) -> set[str]:
        """Take the unacknowledged records of ``slot`` into the replay and delete its acknowledged segments.
        A slot other than ours (held here while no running publisher holds it) is adopted: its segments are
        moved into ours, their acknowledged ids written to our acks. Returns the slot's acknowledged ids."""
        acked = set((slot / "acks").read_text().split()) if (slot / "acks").exists() else set()
        segments = []
        for path in slot.glob("*.seg"):
            if (seq := _number(path)) is None or path.name != f"{seq}.seg":
                log.warning("mm-events outbox: skipped %s: not a segment file of this spool", path)
            else:
                segments.append((seq, path))
        adopted = 0
        for seq, path in sorted(segments):
            records, size = self._read(path)
            live = [(req, keys) for req, keys in records if req.event_id not in acked]
            done = [req.event_id for req, _ in records if req.event_id in acked]
            if not live:
                self._unlink(path)
                continue
            if slot != self.dir:
                try:
                    self._acks.write("".join(i + "\n" for i in done))
                    self._acks.flush()  # before the move: a crash must not leave them unacknowledged here
                    self._ack_lines += len(done)
                    os.rename(path, self.dir / f"{self._top + 1}.seg")
                except OSError as e:
                    log.warning("mm-events outbox: cannot adopt %s (%s): not replayed; start a publisher on this "
                                "spool_dir once it can be moved", path, e.strerror or e)
                    continue
                seq = self._top = self._top + 1
                adopted += len(live)
            for req, _ in live:
                self._where[req.event_id] = seq
            self._replay += live
            self._segments[seq], self._sizes[seq], self._acked[seq] = {r.event_id for r, _ in live}, size, done
            self._acked_live += len(done)
        if adopted:
            log.warning("mm-events outbox: adopted %d unacknowledged event(s) from %s, which no running publisher "
                        "held", adopted, slot)
            if not list(slot.glob("*.seg")):
                (slot / "acks").unlink(missing_ok=True)  # its lines are ours now
        return acked

    def _read(self, path: Path) -> tuple[list[tuple[FinishedRequest, dict[str, str]]], int]:
        """The records of segment ``path`` that read, and its size. A bad tail with no whole record after it
        was torn by a write never synced (a crash, or a failed write the segment could not be cut back
        from: both end a segment) and is dropped. Unreadable records before whole ones are the disk's or a
        hand's: the segment is set aside, kept as it was, and rewritten with the records that read."""
        data, pos, records, chunks, bad, why = path.read_bytes(), 0, [], [], 0, None
        while pos < len(data):
            end = _whole(data, pos)
            if end < 0:  # no whole record here: find the next one, if any
                nxt = data.find(_START, pos + _HEADER.size + 1)
                while nxt >= 0 and _whole(data, nxt - _HEADER.size) < 0:
                    nxt = data.find(_START, nxt + 1)
                if nxt < 0:
                    log.warning("mm-events outbox: dropped a torn record at the end of %s", path)
                    break
                bad, why, pos = bad + 1, why or "a bad length or CRC", nxt - _HEADER.size
                continue
            try:
                records.append(_decode(data[pos + _HEADER.size:end]))
                chunks.append(data[pos:end])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                bad, why = bad + 1, why or f"{type(e).__name__}: {e}"
            pos = end
        if not bad:
            return records, len(data)
        corrupt, good = path.with_name(path.name + ".corrupt"), b"".join(chunks)
        try:
            try:
                os.link(path, corrupt)  # kept as it was, for a look
            except FileExistsError:  # an earlier start set it aside and crashed before the rewrite
                pass
            tmp = path.with_name(path.name + ".new")
            with open(tmp, "wb") as f:
                f.write(good)
                f.flush()
                if self.fsync:  # before the rename: a crash must leave the old file or this one, whole
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            done = f"set aside as {corrupt}"
        except OSError as e:  # replayed from it as it is: it is found again at the next start
            good, done = data, f"cannot set it aside ({e.strerror or e})"
        log.error("mm-events outbox: %d unreadable record(s) in %s (first: %s); %s; the %d that read are "
                  "replayed", bad, path, why, done, len(records))
        return records, len(good)

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
        if self._acks is None:  # it could not be opened again: the volume may be back
            self._reopen_acks()
        try:
            if self._acks is not None:
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
            if self._acks is not None:
                self._acks.close()  # drops what it could not write
        except OSError:
            pass
        try:
            self._acks = open(self.dir / "acks", "a")
        except OSError:  # a read-only or failing volume: acks are dropped (repeats) until it opens again
            self._acks = None

    def ack(self, event_id: str) -> None:
        """The sink has the event: forget it (its segment goes once all of it is acknowledged)."""
        seq = self._where.pop(event_id, None)
        if seq is None:
            return
        try:
            if self._acks is not None:
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
        self._unlink(self.dir / f"{seq}.seg")

    def _unlink(self, path: Path) -> None:
        """Delete a segment nothing is left to replay from. A volume that refuses it (read-only, failing)
        leaves it for the next start, which reads its acks and deletes it then (or sends a repeat)."""
        try:
            path.unlink(missing_ok=True)
            self._unlink_failing = False
        except OSError as e:
            if not self._unlink_failing:
                log.warning("mm-events outbox: cannot delete acknowledged segments (%s, first %s): they stay until "
                            "a start can", e.strerror or e, path)
            self._unlink_failing = True

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
        for f in (self._file, self._acks):
            try:
                if f is not None:
                    f.close()
            except OSError:  # what they buffered is lost with the disk (repeats, or unspooled as reported)
                pass
        os.close(self._lock_fd)
