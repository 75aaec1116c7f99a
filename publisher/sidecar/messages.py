"""What the engine's processes and their sidecars say to each other: one typed message per kind.

Sent over a socketpair with ``multiprocessing.connection`` framing (pickled). Engine ->
sidecar: an init, then items or finished requests, then ``Close``. Sidecar -> engine:
``Ready`` or ``Failed`` once, ``RegionsFreed`` as uploads end (worker), ``Closed`` last.
Messages that come many to a step carry lists: one pickle and one write per step, not per
request, on vLLM's scheduler loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from publisher.sidecar.events import FinishedRequest

# How long a key is taken as stored without looking again, on both sides: the scheduler sidecar checks an
# object it saw durable again after this, and the worker stores an item's output again (a lifecycle rule
# may have deleted the object).
RECHECK_S = 600.0

# The gauge the engine's scheduler side and its sidecar share (a memfd): settled events and engine requests
# durable in the spool (u64 each, the sidecar's counts), then a byte the engine sets when it starts closing.
GAUGE_BYTES, CLOSING_AT = 24, 16

# ---- engine -> sidecar -------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerInit:
    config: dict[str, Any]  # PublisherConfig.to_dict()
    model: str  # the served model name (objects describe themselves with it)
    ring_fd: int  # the shared ring, inherited by the sidecar
    ring_size: int


@dataclass(frozen=True)
class SchedulerInit:
    config: dict[str, Any]
    gauge_fd: int  # two shared 8-byte words: events settled, and finished requests durable in the spool
    producer: dict[str, str]  # the event's ``producer`` record
    # The tokenizer vLLM's API process detokenizes with (its ``tokenizers`` JSON), to replay stop
    # strings (stop_strings.py); None where vLLM has no fast tokenizer or skips tokenizer init.
    tokenizer_json: str | None = None


@dataclass(frozen=True)
class FetcherInit:
    """reuse_stored_embeddings: what the fetch sidecar checks objects against, and where it puts them."""
    config: dict[str, Any]
    model: str
    model_dtype: str  # torch dtype name of the model's encoder output, without "torch."
    hidden_size: int
    storage_dtype: str  # what the keys name: a stored object in another dtype is refused
    ring: str  # the staging ring, a file in a private tmpfs directory, which the worker maps too
    ring_size: int


@dataclass(frozen=True)
class ItemCaptured:
    """An encoder output whose bytes are in the ring at ``offset``: store it under ``key`` (in ``ItemsCaptured``)."""
    offset: int
    dtype: str  # torch dtype name, without "torch."
    shape: tuple[int, ...]
    key: str
    mm_hash: str
    modality: str
    source: str  # ENCODER or CLIENT
    extras: dict[str, Any] = field(default_factory=dict)  # name -> small numpy array, stored beside it
    input_digest: str | None = None  # of the processed input (reuse_stored_embeddings records it)


@dataclass(frozen=True)
class ItemsCaptured:
    """Items whose bytes landed in the ring (in one engine step): store each. With the worker's running
    totals (encoder runs, items loaded, items dropped), so that the sidecar can report them itself when
    vLLM kills the worker before the connector's shutdown runs (a step may send totals and no items)."""
    items: tuple[ItemCaptured, ...]
    totals: tuple[int, int, int] = (0, 0, 0)  # saves, loads, dropped


@dataclass(frozen=True)
class StopCheck:
    """What vLLM's detokenizer had for a request with stop strings (stop_strings.py); the prompt's end.
    Sent beside the request (``RequestsFinished``), used before it is spooled, never stored."""
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    stop: tuple[str, ...]
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_terminated: bool = False  # the engine stopped it (end of sequence, a stop token): not decoded


@dataclass(frozen=True)
class RequestsFinished:
    """Requests that finished (in one engine step): publish each one's event once the objects under its
    keys (mm_hash -> key) are durable. A request with stop strings comes with its ``StopCheck``."""
    requests: tuple[tuple[FinishedRequest, dict[str, str], StopCheck | None], ...]


@dataclass(frozen=True)
class EventsDropped:
    """The engine dropped events under backpressure=drop; counted in the sidecar's report."""
    count: int


@dataclass(frozen=True)
class Fetch:
    """Fetch and check the object under ``key`` for a request whose item has ``input_digest``; on
    success its tensor's raw bytes go to the staging ring at ``offset`` (the scheduler's region)."""
    key: str
    mm_hash: str
    input_digest: str
    num_embeds: int
    offset: int


@dataclass(frozen=True)
class Reused:
    """Items the engine loaded instead of encoding; counted in the fetch sidecar's report."""
    count: int


@dataclass(frozen=True)
class Close:
    """Flush within ``timeout`` seconds, answer ``Closed``, exit."""
    timeout: float


# ---- sidecar -> engine -------------------------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class RegionsFreed:
    """The uploads of the items at ``offsets`` ended (one batch): the worker may reuse their ring regions.
    ``not_stored``: the keys of those given up (the store away past the deadline, or refusing): the
    worker stores them again at their next encoder run, instead of taking them for stored."""
    offsets: tuple[int, ...]
    not_stored: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fetched:
    """The answer to ``Fetch``: ``outcome`` hit (the tensor is in the ring), absent, rejected or error."""
    mm_hash: str
    outcome: str
    reason: str = ""


@dataclass(frozen=True)
class Closed:
    report: dict[str, Any]  # the sidecar's counters
