"""Where events come from: a Kafka topic read as a consumer group, or the publisher's
embedded Avro event log, followed as it grows.

Both hand out ``SourceRecord``s and take ``commit(records)`` once the records are durably
indexed (or dead-lettered): at-least-once, the position never runs ahead of the sinks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import fastavro

log = logging.getLogger("vllm_mm_events.consumer")


@dataclass
class SourceRecord:
    value: bytes  # the record's bytes as they came (Kafka value; for the file log, the block's bytes)
    coords: dict[str, str]  # where it came from, for dead letters and logs
    position: Any  # what commit() needs
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    event: dict | None = None  # already decoded (the file log holds records, not framed values)
    error: str | None = None  # the file log: this block could not be read


class EventSource(ABC):
    # Called by the source, from poll(), before partitions are taken away, so the caller can
    # finish and commit what it holds of them. Gets the revoked (topic, partition) pairs.
    before_revoke: Callable[[set], None] | None = None

    @abstractmethod
    def poll(self, max_records: int, timeout: float) -> list[SourceRecord]: ...

    @abstractmethod
    def commit(self, records: list[SourceRecord]) -> None: ...

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    @abstractmethod
    def caught_up(self) -> bool:
        """True once everything that existed is consumed (what --once waits for)."""

    def lag(self) -> int | None:
        return None

    def owns(self, record: SourceRecord) -> bool:
        return True

    def close(self) -> None:
        pass


# ---- Kafka ----------------------------------------------------------------------------------

class KafkaSource(EventSource):
    def __init__(self, uri: str, group: str, settings: dict):
        from confluent_kafka import Consumer

        u = urlsplit(uri)
        self.topic = u.path.lstrip("/")
        self.bootstrap = u.netloc
        conf = {
            "bootstrap.servers": self.bootstrap,
            "group.id": group,
            "enable.auto.commit": False,  # commits follow the sinks, never a timer
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,  # how --once knows it reached the end
            "partition.assignment.strategy": "cooperative-sticky",
            "client.id": f"vllm-mm-events-consumer-{os.getpid()}",
            "logger": logging.getLogger("vllm_mm_events.consumer.librdkafka"),
            **settings,
        }
        self.consumer = Consumer(conf)
        self.assigned: set[tuple[str, int]] = set()
        self.at_eof: set[tuple[str, int]] = set()
        self.has_assignment = False
        self.paused = False
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)

    def _on_assign(self, consumer, partitions) -> None:
        new = {(p.topic, p.partition) for p in partitions}
        self.assigned |= new
        self.has_assignment = True
        log.info("assigned partitions %s (now %s)", sorted(p for _, p in new), sorted(p for _, p in self.assigned))
        if self.paused and partitions:
            consumer.pause(partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        if gone and self.before_revoke is not None:
            self.before_revoke(gone)  # finish + commit the batch in flight while we still own them
        self.assigned -= gone
        self.at_eof -= gone
        log.info("revoked partitions %s", sorted(p for _, p in gone))

    def poll(self, max_records: int, timeout: float) -> list[SourceRecord]:
        from confluent_kafka import KafkaError, KafkaException

        # Drain what is buffered without waiting; if nothing is, wait for the first record only
        # (consume(n, timeout) would hold out for all n until the timeout).
        msgs = self.consumer.consume(num_messages=max_records, timeout=0)
        if not msgs:
            first = self.consumer.poll(timeout)
            msgs = [first] if first is not None else []
            if first is not None and max_records > 1:
                msgs += self.consumer.consume(num_messages=max_records - 1, timeout=0)
        out = []
        for m in msgs:
            err = m.error()
            tp = (m.topic(), m.partition())
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.at_eof.add(tp)
                    continue
                if err.fatal() or err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise KafkaException(err)
                log.warning("kafka: %s", err)
                continue
            self.at_eof.discard(tp)
            ts_type, ts = m.timestamp()
            out.append(SourceRecord(
                value=m.value() or b"", key=m.key(), headers=list(m.headers() or []), position=(tp, m.offset()),
                coords={"topic": m.topic(), "partition": str(m.partition()), "offset": str(m.offset()),
                        "timestamp": str(ts)}))
        return out

    def commit(self, records: list[SourceRecord]) -> None:
        from confluent_kafka import TopicPartition

        last: dict[tuple[str, int], int] = {}
        for r in records:
            tp, off = r.position
            last[tp] = max(off, last.get(tp, -1))
        offsets = [TopicPartition(t, p, off + 1) for (t, p), off in last.items() if (t, p) in self.assigned]
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=False)

    def owns(self, record: SourceRecord) -> bool:
        return record.position[0] in self.assigned

    def pause(self) -> None:
        if not self.paused:
            self.consumer.pause(self.consumer.assignment())
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.consumer.resume(self.consumer.assignment())
            self.paused = False

    def caught_up(self) -> bool:
        return self.has_assignment and self.at_eof >= self.assigned

    def lag(self) -> int | None:
        from confluent_kafka import TopicPartition

        if not self.assigned:
            return 0
        tps = [TopicPartition(t, p) for t, p in self.assigned]
        total = 0
        try:
            positions = self.consumer.position(tps)
            for tp in positions:
                _low, high = self.consumer.get_watermark_offsets(tp, timeout=2, cached=False)
                pos = tp.offset if tp.offset >= 0 else _low
                total += max(0, high - pos)
        except Exception:  # noqa: BLE001 - lag is informational
            return None
        return total

    def close(self) -> None:
        self.consumer.close()  # leaves the group now, so the partitions move without a session timeout


# ---- the embedded Avro event log ------------------------------------------------------------

_HEADER_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "org.apache.avro.file.Header", "fields": [
        {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
        {"name": "meta", "type": {"type": "map", "values": "bytes"}},
        {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}}]})


def _read_long(buf: bytes, pos: int) -> tuple[int, int] | None:
    """Avro zig-zag varint at ``pos`` -> (value, next pos), or None if the bytes end first."""
    shift = result = 0
    while pos < len(buf):
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
    return None


class AvroLogSource(EventSource):
    """Follows an Avro object-container file as the publisher appends blocks to it.

    Position = (byte offset of a block, records of it already done). A checkpoint file
    (written atomically) holds the committed position and the file's sync marker, so a
    replaced log is noticed instead of being read from a wrong offset. A block that cannot
    be read is handed out once, as an error record, and skipped.
    """

    def __init__(self, uri: str, group: str, checkpoint: str | None, reader_schema: dict):
        self.path = Path(unquote(urlsplit(uri).path))
        self.checkpoint_path = Path(checkpoint) if checkpoint else self.path.with_name(
            f"{self.path.name}.{group}.checkpoint")
        self.reader_schema = fastavro.parse_schema(reader_schema)
        self.writer_schema = None
        self.sync: bytes | None = None
        self.codec = "null"
        self.offset = 0  # next block to read
        self.skip = 0  # records of that block already handed out
        self.at_end = False
        self._pending: list[SourceRecord] = []  # decoded but not yet handed out (block larger than a poll)

    def _open_header(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                head = f.read(1 << 20)
        except FileNotFoundError:
            return False
        try:
            hdr = fastavro.schemaless_reader(io.BytesIO(head), _HEADER_SCHEMA)
        except Exception:  # noqa: BLE001 - a header still being written
            return False
        if hdr["magic"] != b"Obj\x01":
            raise ValueError(f"source: {self.path} is not an Avro object container file")
        buf = io.BytesIO(head)
        fastavro.schemaless_reader(buf, _HEADER_SCHEMA)
        first_block = buf.tell()
        self.sync = hdr["sync"]
        self.codec = hdr["meta"].get("avro.codec", b"null").decode()
        if self.codec not in ("null", "deflate"):
            raise ValueError(f"source: {self.path} uses codec {self.codec!r}; this reader handles null and deflate")
        self.writer_schema = fastavro.parse_schema(json.loads(hdr["meta"]["avro.schema"]))
        self.offset, self.skip = first_block, 0
        ck = self._read_checkpoint()
        if ck is not None:
            if ck.get("sync") == self.sync.hex():
                self.offset, self.skip = int(ck["offset"]), int(ck["index"])
                log.info("file source: resuming %s at byte %d (+%d records)", self.path, self.offset, self.skip)
            else:
                log.warning("file source: %s was replaced (sync marker differs from the checkpoint); "
                            "reading it from the start", self.path)
        return True

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
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < self.offset:
                raise ValueError(f"source: {self.path} shrank below the committed position; was it truncated?")
            f.seek(self.offset)
            data = f.read(min(size - self.offset, 64 << 20))
        pos, produced = 0, 0
        while produced < max_records:
            block_at = self.offset + pos
            head = _read_long(data, pos)
            head2 = head and _read_long(data, head[1])
            if not head2:
                break
            count, (blen, body_at) = head[0], head2
            end = body_at + blen + 16
            if end > len(data):
                break  # the writer is still appending this block
            if data[body_at + blen:end] != self.sync:
                nxt = data.find(self.sync, pos)
                if nxt < 0:
                    break
                end = nxt + 16
                records = [SourceRecord(value=bytes(data[pos:end]), position=(block_at, 0, self.offset + end, 1),
                                        coords=self._coords(block_at, 0), error="corrupt block (sync marker not found)")]
            else:
                records = self._decode_block(data[body_at:body_at + blen], count, block_at, self.offset + end)
            self._pending.extend(records)
            produced += len(records)
            pos = end
        self.at_end = produced == 0
        if pos:
            self.offset += pos  # read position; the committed one is in the checkpoint
            self.skip = 0

    def _decode_block(self, body: bytes, count: int, block_at: int, next_block: int) -> list[SourceRecord]:
        try:
            raw = zlib.decompress(body, -15) if self.codec == "deflate" else body
            buf = io.BytesIO(raw)
            events = [fastavro.schemaless_reader(buf, self.writer_schema, self.reader_schema) for _ in range(count)]
        except Exception as e:  # noqa: BLE001 - one unreadable block is dead-lettered, not fatal
            return [SourceRecord(value=bytes(body), position=(block_at, 0, next_block, 1),
                                 coords=self._coords(block_at, 0), error=f"undecodable block: {e}")]
        out = []
        for i, ev in enumerate(events):
            if block_at == self.offset and i < self.skip:
                continue  # committed before a restart
            out.append(SourceRecord(value=b"", event=ev, position=(block_at, i, next_block, count),
                                    coords=self._coords(block_at, i)))
        return out

    def _coords(self, block_at: int, index: int) -> dict[str, str]:
        return {"file": str(self.path), "block_offset": str(block_at), "index": str(index)}

    def commit(self, records: list[SourceRecord]) -> None:
        if not records:
            return
        block_at, i, next_block, count = max(r.position for r in records)
        offset, index = (next_block, 0) if i + 1 >= count else (block_at, i + 1)
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"path": str(self.path), "offset": offset, "index": index, "sync": self.sync.hex()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)
        fd = os.open(self.checkpoint_path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def caught_up(self) -> bool:
        return self.at_end and not self._pending


def open_source(uri: str, group: str, *, kafka: dict, checkpoint: str | None, reader_schema: dict) -> EventSource:
    if urlsplit(uri).scheme == "kafka":
        return KafkaSource(uri, group, kafka)
    return AvroLogSource(uri, group, checkpoint, reader_schema)
