"""How far a consume run is: a live bar on a terminal, a log line every ``progress_interval_s`` otherwise.

Both show events consumed, the rate, indexed, dead-lettered, committed and the lag (events not yet
read, where the source can tell). With ``--once`` the total is known (what was there when it was
counted: consumed + lag), so the bar fills and the log line gives a percentage and an ETA. No
dependency: the bar is one ``\\r``-rewritten line on stderr; log lines written meanwhile first
clear it, so the two never share a line.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections import deque
from typing import Callable, TextIO

from publisher.logs import LOGGER

log = logging.getLogger("vllm_mm_events.consumer")

BAR_REFRESH_S = 0.2  # redraw at most this often
LAG_REFRESH_S = 1.0  # a source's lag may cost a round trip (Kafka watermarks): not on every redraw
RATE_WINDOW_S = 5.0


def use_bar(stream: TextIO, log_format: str) -> bool:
    """A bar only where a person watches: a terminal, text logs, a terminal that can redraw a line."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and log_format == "text" and os.environ.get("TERM", "") != "dumb"


def _n(x: int) -> str:
    return f"{x:,}"


def _duration(s: float) -> str:
    s = int(s + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _ClearingStream:
    """A log handler's stream that wipes the bar before a log line, so the line starts clean."""

    def __init__(self, inner: TextIO, progress: "Progress"):
        self.inner = inner
        self.progress = progress

    def write(self, s: str) -> int:
        with self.progress.lock:
            if self.progress.drawn:
                self.inner.write("\r\x1b[K")
                self.progress.drawn = False
            return self.inner.write(s)

    def flush(self) -> None:
        self.inner.flush()

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Progress:
    """``tick`` on every turn of the consume loop; ``finish`` once at the end.

    ``totals`` is the indexer's ``Totals``; ``lag`` a callable giving the source's lag (or None).
    """

    def __init__(self, interval_s: float, bar: bool = False, stream: TextIO | None = None):
        self.interval_s = interval_s
        self.bar = bar
        self.stream = stream or sys.stderr
        self.once = False
        self.lock = threading.Lock()
        self.drawn = False
        self._handlers: list[tuple[logging.StreamHandler, TextIO]] = []
        self._lag: int | None = None
        self._lag_at = float("-inf")
        self._samples: deque[tuple[float, int]] = deque()
        now = time.monotonic()
        self._next = now + (0 if bar else interval_s)
        self._last_log = (now, 0)
        self._started = now

    def start(self, once: bool) -> None:
        self.once = once
        if self.bar:  # log lines wipe the bar first (the handlers are ours: publisher.logs)
            for h in logging.getLogger(LOGGER).handlers:
                if isinstance(h, logging.StreamHandler) and h.stream in (self.stream, sys.stderr):
                    self._handlers.append((h, h.stream))
                    h.setStream(_ClearingStream(h.stream, self))

    def tick(self, totals, lag: Callable[[], int | None]) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        if self.bar:
            if now - self._lag_at >= LAG_REFRESH_S:
                self._lag, self._lag_at = lag(), now
            self._draw(totals, now)
            self._next = now + BAR_REFRESH_S
        else:
            self._lag = lag()
            self._log_line(totals, now)
            self._next = now + self.interval_s

    def finish(self, totals, lag: Callable[[], int | None]) -> None:
        if not self.bar:
            return
        self._lag = lag()
        self._draw(totals, time.monotonic(), final=True)
        with self.lock:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
        for h, inner in self._handlers:
            h.setStream(inner)
        self._handlers.clear()

    # ---- the two forms ----------------------------------------------------------------------

    def _rate(self, consumed: int, now: float) -> float:
        self._samples.append((now, consumed))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        return (consumed - c0) / (now - t0) if now > t0 else 0.0

    def _total(self, consumed: int) -> int | None:
        return consumed + self._lag if self.once and self._lag is not None else None

    def _log_line(self, totals, now: float) -> None:
        t0, c0 = self._last_log
        rate = (totals.consumed - c0) / (now - t0) if now > t0 else 0.0
        self._last_log = (now, totals.consumed)
        total = self._total(totals.consumed)
        of = f"/{total} ({100 * totals.consumed // total}%)" if total else ""
        eta = f" eta={_duration(self._lag / rate)}" if total and self._lag and rate > 0 else ""
        log.info("progress: consumed=%d%s (%.0f/s) indexed=%d dead_lettered=%d committed=%d lag=%s%s",
                 totals.consumed, of, rate, totals.indexed, sum(totals.dead_lettered.values()), totals.committed,
                 "?" if self._lag is None else self._lag, eta)

    def _draw(self, totals, now: float, final: bool = False) -> None:
        consumed = totals.consumed
        rate = consumed / (now - self._started) if final and now > self._started else self._rate(consumed, now)
        total = self._total(consumed)
        lag = "?" if self._lag is None else _n(self._lag)
        tail = (f"  {rate:,.0f}/s  lag {lag}  indexed {_n(totals.indexed)}"
                f"  dead-lettered {_n(sum(totals.dead_lettered.values()))}")
        if total:
            frac = min(1.0, consumed / total)
            width = 24
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            eta = f"  eta {_duration(self._lag / rate)}" if self._lag and rate > 0 and not final else ""
            line = f"consume [{bar}] {100 * frac:3.0f}%  {_n(consumed)}/{_n(total)} events{eta}{tail}"
        else:
            line = f"consume  {_n(consumed)} events{tail}"
        cols = shutil.get_terminal_size((100, 24)).columns
        with self.lock:
            self.stream.write("\r" + line[: max(20, cols - 1)] + "\x1b[K")
            self.stream.flush()
            self.drawn = True
