"""A Kafka topic, read as a consumer group (cooperative-sticky), committed after the sinks."""

from __future__ import annotations

import logging
import os
import time
import uuid
from urllib.parse import urlsplit

from consumers.sources.base import EventSource, SourceNotFound, SourceRecord, SourceUnreadable

log = logging.getLogger("vllm_mm_events.consumer")


class KafkaSource(EventSource):
    """``read_only``: every partition assigned from its beginning, no group joined, nothing committed
    (``vllm-mm-events events``); partitions added later are not seen."""

    def __init__(self, uri: str, group: str, settings: dict, read_only: bool = False):
        from confluent_kafka import Consumer

        u = urlsplit(uri)
        self.topic = u.path.lstrip("/")
        self.bootstrap = u.netloc
        conf = {
            "bootstrap.servers": self.bootstrap,
            "group.id": group,
            "enable.auto.commit": False,  # commits follow the sinks, never a timer
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,  # --once's end where a partition's last offset is never handed out
            "partition.assignment.strategy": "cooperative-sticky",
            "client.id": f"vllm-mm-events-consumer-{os.getpid()}",
            "logger": logging.getLogger("vllm_mm_events.consumer.librdkafka"),
            **settings,
            "on_commit": self._committed,
        }
        if not read_only and str(conf["enable.auto.commit"]).lower() not in ("false", "0"):
            raise ValueError("kafka.enable.auto.commit: the consumer commits after its sinks have written; "
                             "a timer's commits would skip events that were never indexed")
        self.read_only = read_only
        if read_only:  # after the user's settings: nothing they pass may make a reader commit
            conf.update({"group.id": f"vllm-mm-events-reader-{uuid.uuid4().hex[:12]}", "enable.auto.commit": False,
                         "enable.auto.offset.store": False,
                         "client.id": f"vllm-mm-events-reader-{os.getpid()}"})
        self.consumer = Consumer(conf)
        self._sent_commits = 0  # asynchronous commits not yet answered (served by poll)
        # Commits wait for a check of the topic's id begun after they were asked for (TopicGuard).
        # Commits asked for and not yet sent: (when their records were handed out, {partition: offset}), oldest first
        self._held: list[tuple[float, dict[tuple[str, int], int]]] = []
        self._handed_out_at = 0.0  # when poll last handed records out
        self._guard = None if read_only else TopicGuard(self.topic, {"bootstrap.servers": self.bootstrap, **settings})
        self._commit_failed = False
        self._requested: dict[tuple[str, int], int] = {}  # the offsets last asked to commit, per partition
        self.assigned: set[tuple[str, int]] = set()
        self.at_eof: set[tuple[str, int]] = set()
        self.has_assignment = False
        self.paused = False
        if read_only:
            self._assign_from_beginning()
        else:
            self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_revoke)

    def _assign_from_beginning(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        try:
            md = self.consumer.list_topics(self.topic, timeout=15)
            meta = md.topics.get(self.topic)
            if meta is None or meta.error is not None or not meta.partitions:
                why = meta.error.str() if meta is not None and meta.error is not None else "no partitions"
                raise SourceNotFound(f"no topic {self.topic!r} on {self.bootstrap} ({why})")
            tps = [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
            self.consumer.assign(tps)
        except BaseException:
            self.consumer.close()
            raise
        self.assigned = {(self.topic, tp.partition) for tp in tps}
        self.has_assignment = True

    def _on_assign(self, consumer, partitions) -> None:
        new = {(p.topic, p.partition) for p in partitions}
        self.assigned |= new
        self.has_assignment = True
        log.info("assigned partitions %s (now %s)", sorted(p for _, p in new), sorted(p for _, p in self.assigned))
        if self.paused and partitions:
            # Assigned here, then paused: left to the client, the assignment comes after this callback and
            # unpaused, and a backlog of the new partitions was read into memory during a sink outage.
            consumer.incremental_assign(partitions)
            consumer.pause(partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        if gone and self.before_revoke is not None:
            self.before_revoke(gone)  # finish + commit the batch in flight while we still own them
            if any(gone & set(offsets) for _, offsets in self._held):
                self._release_held(wait=TopicGuard.TIMEOUT_S)  # their next owner resumes after it
            for _, offsets in self._held:  # not cleared in time: their next owner reads them again
                for tp in gone:
                    offsets.pop(tp, None)
            self._held = [(t, offsets) for t, offsets in self._held if offsets]
        self.assigned -= gone
        self.at_eof -= gone
        for tp in gone:  # never asked again: their next owner commits further
            self._requested.pop(tp, None)
        log.info("revoked partitions %s", sorted(p for _, p in gone))

    @property
    def commits_pending(self) -> int:
        """Commits asked for and not yet answered: sent, or held for the topic's check."""
        return self._sent_commits + (1 if self._held else 0)

    def poll(self, max_records: int, timeout: float) -> list[SourceRecord]:
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        self._release_held()
        self._recommit()
        # Drain what is buffered without waiting; if nothing is, wait for the first record only
        # (consume(n, timeout) would hold out for all n until the timeout).
        msgs = self.consumer.consume(num_messages=max_records, timeout=0)
        if not msgs:
            first = self.consumer.poll(timeout)
            msgs = [first] if first is not None else []
            if first is not None and max_records > 1:
                msgs += self.consumer.consume(num_messages=max_records - 1, timeout=0)
        out, last = [], {}
        if msgs:
            self._handed_out_at = time.monotonic()  # these records were fetched by now
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
            self.at_eof.discard(tp)  # until an end-of-partition event or the watermark below says otherwise
            last[tp] = m.offset()
            ts_type, ts = m.timestamp()
            coords = {"topic": m.topic(), "partition": str(m.partition()), "offset": str(m.offset()),
                      "timestamp": str(ts)}
            try:
                record = SourceRecord(value=m.value() or b"", key=m.key(), headers=list(m.headers() or []),
                                      position=(tp, m.offset()), coords=coords)
            except (SystemError, UnicodeDecodeError) as e:
                # confluent-kafka decodes header names as UTF-8, and on one that is not leaves its error set
                # (a SystemError at the next call). A producer's bytes like any other: the record is dead-
                # lettered with its value and key, never an exception out of poll (it stopped the consumer on
                # that record at every restart).
                why = type(e.__cause__ or e.__context__ or e).__name__
                record = SourceRecord(value=m.value() or b"", key=m.key(), position=(tp, m.offset()), coords=coords,
                                      error=f"a header name is not UTF-8 text ({why})")
            out.append(record)
        for tp, offset in last.items():
            # At the end once the record before the partition's high watermark is handed out, as the
            # broker reported it with the last fetch (cached: no request). The end-of-partition event
            # comes only after a further, empty fetch (up to fetch.wait.max.ms later): a second per
            # --once run with large events. It still ends partitions that hand out nothing, and those
            # whose watermark lies past their last record (transaction markers, compacted tails).
            try:
                high = self.consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)[1]
            except KafkaException:
                continue
            if 0 <= high <= offset + 1:
                self.at_eof.add(tp)
        return out

    def commit(self, records: list[SourceRecord]) -> None:
        from confluent_kafka import TopicPartition

        if self.read_only:
            raise RuntimeError(f"source: {self.topic} was opened read-only; nothing is committed")
        last: dict[tuple[str, int], int] = {}
        for r in records:
            tp, off = r.position
            last[tp] = max(off, last.get(tp, -1))
        offsets = [TopicPartition(t, p, off + 1) for (t, p), off in last.items() if (t, p) in self.assigned]
        if not offsets:
            return
        # Asynchronous: librdkafka's synchronous commit has no timeout, and a broker that accepts and
        # never answers would hold this loop (heartbeats, SIGTERM) for good. The answer comes through
        # poll (_committed); a failed commit is asked again from poll until one lands, and closing
        # waits for the last (bounded by socket.timeout.ms). Records whose commit never lands (the
        # process ends first) are read again: upserts make that safe.
        # Held first until the topic is known to be the one these records came from (TopicGuard).
        self._held.append((self._handed_out_at, {(tp.topic, tp.partition): tp.offset for tp in offsets}))
        self._release_held(wait=TopicGuard.COMMIT_WAIT_S)

    def _release_held(self, wait: float = 0.0) -> None:
        """Send the held commits whose records a check begun after they were handed out found to be of the
        topic the consumer started on (merged: the highest offset per partition still ours). Each check
        clears all that came before it began, so commits go out under any load."""
        from confluent_kafka import TopicPartition

        if not self._held:
            return
        through = self._guard.cleared_through(self._held[0][0], wait)
        ready: dict[tuple[str, int], int] = {}
        while self._held and self._held[0][0] <= through:
            for tp, off in self._held.pop(0)[1].items():
                ready[tp] = max(off, ready.get(tp, -1))
        offsets = [TopicPartition(t, p, off) for (t, p), off in ready.items() if (t, p) in self.assigned]
        if offsets:
            self._commit(offsets)

    def _commit(self, offsets: list) -> None:
        for tp in offsets:
            self._requested[(tp.topic, tp.partition)] = tp.offset
        self.consumer.commit(offsets=offsets, asynchronous=True)
        self._sent_commits += 1  # once asked: a commit that raised gets no answer

    def _committed(self, err, partitions) -> None:
        """librdkafka's answer to a commit (served by poll, on this thread)."""
        self._sent_commits -= 1
        failed = [tp for tp in partitions or () if tp.error is not None]
        if err is not None or failed:
            self._commit_failed = True
            log.warning("kafka: a commit failed (%s); asking again", err or failed[0].error)

    def _recommit(self) -> None:
        """After a failed commit, once no other is in flight: the last offsets asked for, partitions still ours."""
        from confluent_kafka import TopicPartition

        if self._commit_failed and not self._sent_commits:
            self._commit_failed = False
            offsets = [TopicPartition(t, p, off) for (t, p), off in self._requested.items() if (t, p) in self.assigned]
            if offsets:
                self._commit(offsets)

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
            # A partition not read from yet has no position: it resumes at the group's committed
            # offset (the low watermark only when the group has none).
            unread = [TopicPartition(tp.topic, tp.partition) for tp in positions if tp.offset < 0]
            committed = {(tp.topic, tp.partition): tp.offset
                         for tp in (self.consumer.committed(unread, timeout=2) if unread else [])}
            for tp in positions:
                low, high = self.consumer.get_watermark_offsets(tp, timeout=2, cached=False)
                pos = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
                total += max(0, high - (pos if pos >= 0 else low))
        except Exception:  # noqa: BLE001 - lag is informational
            return None
        return total

    def close(self) -> None:
        if self._held:
            try:
                self._release_held(wait=TopicGuard.TIMEOUT_S)
            except SourceUnreadable:  # said already; nothing of the new topic is committed
                self._held.clear()
            if self._held:
                log.warning("kafka: closing with commits of %d batch(es) not sent: the topic's check did not answer "
                            "(%s); their records are read again at the next start", len(self._held),
                            self._guard.last_error or "no answer in time")
                self._held = []
        if self._guard is not None:
            self._guard.close()
        if self.commits_pending:
            log.info("kafka: closing with %d commit(s) not yet answered; closing waits for them "
                     "(socket.timeout.ms at most)", self.commits_pending)
        self.consumer.close()  # leaves the group now, so the partitions move without a session timeout


class TopicGuard:
    """Tells whether the topic is still the one the consumer started on, by its topic id.

    A topic deleted and created again under a running consumer kept its fetch positions: librdkafka
    read on from the old offset in the new topic, reported nothing, and the consumer committed past
    its first records, which were never indexed (a restart then resumed after them). A commit is
    therefore sent only once a check begun after it was asked for finds the id the consumer started
    with (one metadata request, asynchronous: a broker that never answers holds no loop). A changed
    id stops the consumer (``SourceUnreadable``): nothing of the new topic is committed, and a restart
    reads it from its beginning (the broker dropped the group's offsets with the old topic)."""

    TIMEOUT_S = 10.0
    RETRY_S = 1.0  # after a check that failed (the broker away)
    COMMIT_WAIT_S = 0.1  # a commit waits this long for its check (one metadata round trip), then poll sends it
    WARN_AFTER_S = 60.0  # checks failing this long are logged (then as often)

    def __init__(self, topic: str, conf: dict):
        from confluent_kafka.admin import AdminClient

        self.topic = topic
        self._admin = AdminClient({**conf, "logger": logging.getLogger("vllm_mm_events.consumer.librdkafka")})
        self._id: str | None = None  # the topic's id when the consumer started
        self._check = None  # (future, when it began)
        self._through = -1.0  # records handed out before this were read from the topic the consumer started on
        self._failed_at = -1e9
        self._failing_since: float | None = None
        self._warned_at = -1e9
        self.last_error: str | None = None
        self._begin()  # the id to compare with, before any record is read

    def _begin(self) -> None:
        from confluent_kafka import TopicCollection

        future = self._admin.describe_topics(TopicCollection([self.topic]), request_timeout=self.TIMEOUT_S)[self.topic]
        self._check = (future, time.monotonic())

    def cleared_through(self, need: float, wait: float = 0.0) -> float:
        """When the newest check that found the topic unchanged began: records handed out before then are of
        the topic the consumer started on. Until that reaches ``need``, begins checks (one at a time; again
        ``RETRY_S`` after one that failed), waiting up to ``wait``. Raises ``SourceUnreadable`` if the topic
        was replaced."""
        end = time.monotonic() + wait
        while self._through < need:
            if self._check is None and time.monotonic() - self._failed_at >= self.RETRY_S:
                self._begin()
            if self._check is not None:
                future, began = self._check
                try:
                    topic_id = str(future.result(timeout=max(0.0, end - time.monotonic())).topic_id)
                except Exception as e:  # noqa: BLE001 - no answer in time, or a failed check
                    if not future.done():
                        break  # waited enough; the check goes on
                    self._failed(e)
                else:
                    self._check = None
                    if self._id is None:
                        self._id = topic_id
                    if topic_id != self._id:
                        raise SourceUnreadable(
                            f"source: topic {self.topic} was deleted and created again while it was read (its id "
                            f"{self._id} is now {topic_id}); nothing of the new topic was committed: a restart "
                            "reads it from its beginning")
                    self._through, self._failing_since, self.last_error = began, None, None
                    continue
            if time.monotonic() >= end:
                break
            time.sleep(min(self.RETRY_S, max(0.0, end - time.monotonic())))
        return self._through

    def _failed(self, e: Exception) -> None:
        now = time.monotonic()
        self._check, self._failed_at, self.last_error = None, now, f"{type(e).__name__}: {e}"
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.WARN_AFTER_S and now - self._warned_at >= self.WARN_AFTER_S:
            self._warned_at = now
            log.warning("kafka: topic %s could not be checked for %.0f s (%s); commits wait for it (records are "
                        "read again after a restart meanwhile, never skipped)", self.topic, now - self._failing_since,
                        self.last_error)

    def close(self) -> None:
        self._admin = None
