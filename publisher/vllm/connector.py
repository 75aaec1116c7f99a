"""``MMEmbeddingPublisher``: the vLLM encoder-cache connector. vLLM types stop here.

One class, two halves, in two processes that share no Python state:

- worker half (``save_caches``): every encoder output -> copied into a shared ring (an
  async device->host copy on GPU) -> the worker sidecar stores it under a
  content-addressed key.
- scheduler half (``request_finished``): every finished request -> a plain snapshot and
  the object URIs (derivable from the key, so no I/O) -> returned to the caller as
  ``ec_transfer_params`` and handed to the scheduler sidecar, which publishes the event
  once every object it names is durable.

Each half keeps its slow work in a sidecar process (``publisher.sidecar``), off vLLM's GIL.

With ``reuse_stored_embeddings`` the connector is also a source: items whose checked stored
outputs are in host memory are loaded instead of encoded (``publisher.vllm.reuse``).

The object store is the meeting point. The only thing the scheduler tells the worker is
each scheduled item's modality, origin and extra tensors (through the connector metadata),
so the stored object can describe itself and be used again.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import select
import signal
import struct
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import vllm.envs as vllm_envs
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
)

from publisher.config import PublisherConfig
from publisher.logs import setup_logging
from publisher.sidecar.events import FinishedRequest, MediaItem, producer_info, stringify_metadata
from publisher.sidecar.messages import (
    CLOSING_AT,
    GAUGE_BYTES,
    RECHECK_S,
    EventsDropped,
    ItemCaptured,
    ItemsCaptured,
    RegionsFreed,
    RequestsFinished,
    SchedulerInit,
    StopCheck,
    WorkerInit,
)
from schemas.objects import MAX_EXTRAS, object_key
from schemas.uris import StoreLocation

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm_mm_events.connector")
ENCODER, CLIENT = "ENCODER", "CLIENT"
_INTERNAL_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


@dataclass
class PublisherMetadata(ECConnectorMetadata):
    """Scheduler -> worker, per step: mm_hash -> (modality, source, extras, input digest) for items about
    to be encoded; mm_hash -> (ring offset, stored dtype, shape) for fetched items to load instead,
    from the staging ring ``ring`` (path, size)."""
    items: dict[str, tuple[str, str, dict, str | None]] = field(default_factory=dict)
    loads: dict[str, tuple[int, str, tuple[int, ...]]] = field(default_factory=dict)
    ring: tuple[str, int] | None = None


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001 - no TP group: a single worker
        return 0


PROMPT_TAIL = 1024  # prompt tokens sent with a StopCheck; the sidecar primes its decoder with their end


def _stop_check(request: "Request", reason: str | None) -> StopCheck | None:
    """For a request with stop strings: what vLLM's API-side detokenizer works on. vLLM finds stop
    strings there, answers, then aborts the request in the engine, which may also have finished it
    otherwise meanwhile (max_tokens, end of sequence); the scheduler sidecar replays the detokenizer
    to find what the client got (publisher.sidecar.stop_strings). Two tuple copies of token ids, no
    decoding, on this loop."""
    if reason not in ("abort", "length", "stop") or isinstance(request.stop_reason, str):
        return None
    sp = request.sampling_params
    if sp is None or not sp.stop or not request.num_output_tokens:  # vLLM makes a str stop a list
        return None
    stop = tuple(sp.stop)
    prompt = request.prompt_token_ids or ()
    return StopCheck(tuple(prompt[-PROMPT_TAIL:]), tuple(request.output_token_ids), stop, sp.min_tokens,
                     sp.skip_special_tokens, sp.spaces_between_special_tokens, sp.include_stop_str_in_output,
                     stop_terminated=reason == "stop")


def _detokenizer_json(model_config) -> str | None:
    """The tokenizer vLLM's API process detokenizes with, as ``tokenizers`` JSON (the scheduler sidecar
    replays stop strings with it), or None: no fast tokenizer (slow or mistral modes), or
    skip_tokenizer_init (vLLM then checks no stop strings)."""
    try:
        from vllm.tokenizers import cached_tokenizer_from_config
        from vllm.v1.engine.detokenizer import uses_fast_detokenizer

        tokenizer = cached_tokenizer_from_config(model_config)
        if tokenizer is None or not uses_fast_detokenizer(tokenizer):
            return None
        return tokenizer._tokenizer.to_str()
    except Exception as e:  # noqa: BLE001 - events then keep the engine's view of stop strings
        log.warning("mm-events: cannot read vLLM's tokenizer (%s): requests that end on a stop string are "
                    "published as vLLM's engine saw them", e)
        return None


def served_model_name(vllm_config: "VllmConfig") -> str:
    name = vllm_config.model_config.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0]
    return name or vllm_config.model_config.model


@contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """Ignore SIGTERM while waiting for the sidecar's flush report (bounded by shutdown_timeout_s).

    vLLM's engine core resets SIGTERM to the default action before its teardown, so a second
    SIGTERM (a process manager signalling the whole group) would kill it in the middle of our
    flush; the flush would then race the pod's end alone. vLLM's own SIGKILL at
    --shutdown-timeout still bounds the wait. Only the main thread may set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


KNOWN_FOR_S = RECHECK_S  # the worker stores an item's output again after as long (a deleted object is back)
SPOOL_WAIT_S = 5.0  # durable_before_return: longest hold of one response

OVERSIZE_METADATA_KEY = "vllm_mm_events.metadata_omitted"
# vLLM takes a caller's request id (X-Request-Id, a body's request_id) at any length. An event carries it five
# times (two fields, the Kafka key, two CloudEvents headers): a long one made the record too large for the
# broker, and the event was dropped after the response went out. Media requests past this are refused.
MAX_REQUEST_ID_BYTES = 1024


# vLLM's OpenAI server puts these request fields into extra_args beside vllm_xargs: its own transfer
# parameters (block ids growing with the prompt, peers' hosts and ports), not the caller's metadata.
VLLM_TRANSFER_ARGS = frozenset({"kv_transfer_params", "ec_transfer_params"})


def request_metadata(request: "Request") -> tuple[dict[str, str], int]:
    """The request's metadata as the event carries it, and its size (keys + values, UTF-8)."""
    sp = request.sampling_params
    extra = (sp.extra_args if sp is not None else None) or {}
    metadata = stringify_metadata({k: v for k, v in extra.items() if k not in VLLM_TRANSFER_ARGS})
    return metadata, sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())


def _unreadable_metadata(e: Exception) -> str:
    return f"its metadata (vllm_xargs / extra_args) cannot be published: {type(e).__name__}: {str(e)[:200]}"


# The processor's inputs that are the media itself (or embeddings standing in for it): never extras.
_MEDIA_INPUTS = re.compile(r"pixel_values.*|.*_embeds|.*input_features|.*audio_features|.*_values_videos")
EXTRA_MAX_VALUES = 64  # grids, lengths and timings are a few values; anything larger is media


def item_extras(feature) -> dict:
    """The small tensors the processor made beside an item's media, which the model needs to use
    its embedding again (Qwen2-VL's ``image_grid_thw``, a video's ``video_grid_thw``; Qwen2.5-VL
    adds ``second_per_grid_ts``), as numpy arrays: stored in the item's object and named in its
    event. Models that need none (LLaVA) give {}."""
    import torch

    out = {}
    for name, elem in sorted((feature.data or {}).items()):
        value = getattr(elem, "data", None)
        if (isinstance(value, torch.Tensor) and not _MEDIA_INPUTS.fullmatch(name) and value.numel() <= EXTRA_MAX_VALUES
                and value.dtype in (torch.int64, torch.int32, torch.float32, torch.float64, torch.bool)):
            out[name] = value.detach().cpu().numpy()
    if len(out) > MAX_EXTRAS:
        log.warning("mm-events: %s item has %d small inputs; only the first %d are stored as extra tensors (%s)",
                    feature.modality, len(out), MAX_EXTRAS, ", ".join(list(out)[:MAX_EXTRAS]))
    return dict(list(out.items())[:MAX_EXTRAS])


def _encoded(request: "Request") -> list:
    """The request's items the encoder would run on (raw media, not client embeddings)."""
    return [f for f in request.mm_features if classify_item(f) == ENCODER]


def classify_item(feature) -> str | None:
    """ENCODER for raw media the encoder will run on; CLIENT for caller-supplied embeddings;
    None for an item with no data at all (metadata only, expecting a connector to load it)."""
    data = feature.data
    if data is None:
        return None
    keys = set(data.keys())
    if any(k.endswith("_embeds") for k in keys):
        return CLIENT
    return ENCODER if keys else None


class MMEmbeddingPublisher(ECConnectorBase):
    def __init__(self, vllm_config: "VllmConfig", role: ECConnectorRole):
        super().__init__(vllm_config, role)
        setup_logging()  # also when loaded through ec_connector_module_path, without the plugin
        extra = vllm_config.ec_transfer_config.ec_connector_extra_config or {}
        # storage_dtype=native resolves here, in both halves, from the same vLLM config: keys name the
        # dtype, and the scheduler computes them without asking the worker.
        self.config = PublisherConfig.load(extra).resolved(vllm_config.model_config.dtype)
        self.model = served_model_name(vllm_config)
        self.location = StoreLocation.parse(self.config.object_store)  # names URIs; the sidecars do the I/O
        self._keys: dict[str, str] = {}  # mm_hash -> key, memoized (bounded below)
        if role == ECConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker()
        log.info("mm-events %s side started: %s", role.name.lower(), self.config.redacted())

    def key_for(self, mm_hash: str) -> str:
        key = self._keys.get(mm_hash)
        if key is None:
            if len(self._keys) > 100_000:
                self._keys.clear()
            key = self._keys[mm_hash] = object_key(self.location.prefix, self.model, mm_hash, self.config.storage_dtype)
        return key

    # ===================================================================================
    # Worker half
    # ===================================================================================
    def _init_worker(self) -> None:
        self.saves = 0  # save_caches calls seen: one per encoder run of an item
        self.loads = 0  # items loaded from the store instead (reuse_stored_embeddings)
        self.dropped = 0
        if self.config.reuse_stored_embeddings:  # every TP rank loads what its encoder would have computed
            import torch

            from publisher.vllm.capture import HostToDeviceLoad

            self._loader = HostToDeviceLoad()
            self._dtype = self._vllm_config.model_config.dtype
            device = torch.device(self._vllm_config.device_config.device or "cpu")
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            self._device = device
        # Keys handed over (bounded): an item the encoder runs again is not stored twice. A key the
        # sidecar gave up on leaves it (RegionsFreed.not_stored).
        self._known: OrderedDict[str, float] = OrderedDict()  # key -> when it was handed over
        # With tensor parallelism every rank sees the same encoder output; rank 0 stores it.
        self._uploads_here = _tp_rank() == 0
        if not self._uploads_here:
            return
        from publisher.sidecar.process import Sidecar
        from publisher.sidecar.ring import SharedRing
        from publisher.vllm.capture import DeviceToHostCapture

        self.ring = SharedRing(self.config.max_inflight_bytes)
        self.sidecar = Sidecar(WorkerInit(self.config.to_dict(), self.model, self.ring.fd, self.ring.size),
                               pass_fds=(self.ring.fd,))
        self.capture = DeviceToHostCapture(self.ring, self._items_ready)
        # Whether the sidecar said something, asked at every item without blocking: one poll object
        # (Connection.poll builds and registers a selector per call).
        self._from_sidecar = select.poll()
        self._from_sidecar.register(self.sidecar.conn.fileno(), select.POLLIN)
        # Items whose copies landed inside a step wait here for the step's end (get_finished), then go
        # in one message; copies landing outside a step (CUDA copies the sweeper notices, every few
        # milliseconds, during the forward pass) go at once, together.
        self._ready: list[ItemCaptured] = []
        self._ready_lock = threading.Lock()
        self._told = (0, 0, 0)  # the totals the sidecar last heard (ItemsCaptured.totals)
        self._in_step = False

    def _items_ready(self, items: list[ItemCaptured]) -> None:
        with self._ready_lock:
            self._ready.extend(items)
        if not self._in_step:
            self._send_ready()

    def _send_ready(self) -> None:
        with self._ready_lock:
            batch, self._ready = tuple(self._ready), []
            totals = (self.saves, self.loads, self.dropped)
            if not batch and totals == self._told:
                return
            self._told = totals
        self.sidecar.send(ItemsCaptured(batch, totals))

    def start_save_caches(self, encoder_cache: dict[str, "torch.Tensor"], **kwargs) -> None:
        # vLLM calls this at the start of the step's encoder phase (ec_both is a producer), and
        # get_finished at its end, always (a finally).
        if self._uploads_here:
            self._in_step = True

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._uploads_here:
            self._in_step = False
            self._send_ready()
        return None, None

    def start_load_caches(self, encoder_cache: dict[str, "torch.Tensor"], **kwargs) -> None:
        # vLLM calls this in the step, before the encoder runs; the scheduler promised these items
        # (has_cache_item) and skipped their encoder runs, so each must be in the cache after this.
        meta = self._connector_metadata
        if isinstance(meta, PublisherMetadata) and meta.loads:
            from publisher.vllm.reuse import load_stored

            self._loader.attach(*meta.ring, self._device)
            self.loads += load_stored(encoder_cache, meta.loads, self._device, self._dtype, self._loader)

    def save_caches(self, encoder_cache: dict[str, "torch.Tensor"], mm_hash: str, **kwargs) -> None:
        # In the model step: a memcpy (CPU) or a launched async copy (CUDA), and one small message.
        self.saves += 1
        if not self._uploads_here:
            return
        key = self.key_for(mm_hash)
        if self._handed_over(key):
            try:
                if self.sidecar.alive:
                    self._take_sidecar_messages()  # one may say this key was given up
            except (EOFError, OSError):
                self._sidecar_gone()
            if self._handed_over(key):
                return
        t = encoder_cache[mm_hash]
        offset = self._alloc(t.numel() * t.element_size())
        if offset is None:
            self.dropped += 1
            log.warning("mm-events: dropped %s under backpressure (%d dropped so far)", mm_hash, self.dropped)
            return
        meta = self._connector_metadata
        modality, source, extras, digest = (meta.items.get(mm_hash) if isinstance(meta, PublisherMetadata)
                                            else None) or ("unknown", ENCODER, {}, None)
        self.capture.capture(t, offset, ItemCaptured(offset, str(t.dtype).removeprefix("torch."), tuple(t.shape),
                                                     key, mm_hash, modality, source, extras, digest))
        self._known[key] = time.monotonic()
        self._known.move_to_end(key)
        if len(self._known) > 65536:
            self._known.popitem(last=False)

    def _handed_over(self, key: str) -> bool:
        """Whether the key's object was handed to the sidecar lately: stored, or on its way, so the
        encoder's output is not stored again. Forgotten after KNOWN_FOR_S: an object deleted since (a
        lifecycle rule) is stored again at the item's next encoder run (a conditional PUT where it is
        still there), as the scheduler sidecar checks a key again after as long."""
        seen = self._known.get(key)
        return seen is not None and time.monotonic() - seen < KNOWN_FOR_S

    def _alloc(self, nbytes: int) -> int | None:
        """Ring space for one item, applying the frees the sidecar reported."""
        ring, conn = self.ring.allocator, self.sidecar.conn
        if nbytes > ring.size:
            log.error("mm-events: an item of %d bytes exceeds max_inflight_bytes (%d)", nbytes, ring.size)
            return None
        told_all = False
        while self.sidecar.alive:
            try:
                self._take_sidecar_messages()
                offset = ring.alloc(nbytes)
                if offset is not None:
                    return offset
                if self.config.backpressure == "drop":
                    if told_all:
                        return None
                    # The sidecar can free only what it was told of: tell it this step's items, take
                    # what it freed meanwhile, try once more, then drop.
                    self._send_ready()
                    told_all = True
                    continue
                # block: wait for a copy still in flight to land, else for the sidecar to free space.
                # Told after the wait: the sweeper may have moved the last copy to _ready meanwhile.
                landed = self.capture.wait_one()
                self._send_ready()
                if not landed:
                    self._apply(conn.recv())
            except (EOFError, OSError):
                self._sidecar_gone()
        return None

    def _sidecar_gone(self) -> None:
        self.sidecar.alive = False
        log.error("mm-events: the worker sidecar is gone; items are no longer stored")

    def _take_sidecar_messages(self) -> None:
        """Apply what the sidecar has said (without blocking)."""
        while self._from_sidecar.poll(0):
            self._apply(self.sidecar.conn.recv())

    def _apply(self, msg: object) -> None:
        if isinstance(msg, RegionsFreed):
            for offset in msg.offsets:
                self.ring.allocator.free(offset)
            for key in msg.not_stored:  # given up: the item's next encoder run stores it (the store may be back)
                self._known.pop(key, None)

    # ===================================================================================
    # Scheduler half
    # ===================================================================================
    def _init_scheduler(self) -> None:
        import vllm

        from publisher.sidecar.process import Sidecar

        c = self.config
        # Read once at start (the tokenizer vLLM's API process loads) and handed to the sidecar.
        tokenizer_json = _detokenizer_json(self._vllm_config.model_config)
        self._replays_stop_strings = tokenizer_json is not None
        # Two shared words the sidecar counts in: settled events (the drop policy reads it) and
        # finished requests durable in the spool (durable_before_return waits on it); then a byte set
        # here at shutdown, so that the sidecar reads on past its in-flight cap up to the Close.
        self._gauge_fd = os.memfd_create("vllm-mm-events-settled", os.MFD_CLOEXEC)
        os.ftruncate(self._gauge_fd, GAUGE_BYTES)
        self._settled = mmap.mmap(self._gauge_fd, GAUGE_BYTES)
        self.sidecar = Sidecar(SchedulerInit(
            c.to_dict(), self._gauge_fd, producer_info(getattr(vllm, "__version__", "unknown"), c.storage_dtype),
            tokenizer_json),
            pass_fds=(self._gauge_fd,))
        self._sent = 0  # requests handed to the sidecar
        # Requests finished inside a step wait here for the step's end (take_unavailable_requests), then
        # go in one message; one finished outside a step (an abort) goes at once.
        self._finished: list[tuple[FinishedRequest, dict[str, str], StopCheck | None]] = []
        self._in_step = False
        self.dropped_events = 0
        self._step_items: dict[str, tuple[str, str, dict, str | None]] = {}
        self._reuse = self._start_reuse() if c.reuse_stored_embeddings else None
        self._allocated: list[tuple[str, int, str]] = []  # this step's (request id, item index, mm_hash)
        self._reused: dict[str, set[str]] = {}  # request id -> items loaded instead of encoded
        # request_id -> (refusal reason or None, the event's metadata): computed once per request
        self._verdicts: dict[str, tuple[str | None, dict[str, str]]] = {}
        self._refuse: set[str] = set()
        self._randomized_ids = not vllm_envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION  # as vLLM reads it ("0": off)
        self._endpoint = c.s3_endpoint_url if c.object_store.startswith("s3://") else None

    def _start_reuse(self):
        """reuse_stored_embeddings: the fetch sidecar, and the index the scheduler answers from."""
        from publisher.config import ConfigError
        from publisher.sidecar.fetcher import private_dir
        from publisher.sidecar.messages import FetcherInit
        from publisher.sidecar.process import Sidecar
        from publisher.vllm.reuse import StoredItemIndex

        pc = self._vllm_config.parallel_config
        if pc.nnodes > 1 or pc.distributed_executor_backend not in (None, "mp", "uni"):
            raise ConfigError(f"reuse_stored_embeddings: needs the scheduler and its workers on one host (the staging "
                              f"ring is shared memory); this engine uses {pc.distributed_executor_backend!r} on "
                              f"{pc.nnodes} node(s)")
        if not self._is_consumer:
            raise ConfigError("reuse_stored_embeddings: needs ec_role=ec_both (vLLM loads only into a consumer)")
        mc, c = self._vllm_config.model_config, self.config
        self._ring = (str(private_dir() / "ring"), c.reuse_cache_bytes)
        self._fetcher = Sidecar(FetcherInit(c.to_dict(), self.model, str(mc.dtype).removeprefix("torch."),
                                            mc.get_hidden_size(), c.storage_dtype, *self._ring))
        return StoredItemIndex(self._fetcher.send, self._fetched, wait_s=c.reuse_wait_ms / 1000,
                               ring_size=c.reuse_cache_bytes, hidden_size=mc.get_hidden_size(),
                               storage_dtype=c.storage_dtype)

    def _fetched(self) -> list:
        """The fetch sidecar's answers so far (never waits). If it is gone, nothing is in flight any more."""
        out, conn = [], self._fetcher.conn
        try:
            while self._fetcher.alive and conn.poll():
                out.append(conn.recv())
        except (EOFError, OSError):
            self._fetcher.alive = False
        if not self._fetcher.alive and not self._reuse.lost:
            self._reuse.lost_sidecar()  # found here or by a failed send: release what was in flight
            log.error("mm-events: the fetch sidecar is gone; every item is encoded from now on")
        return out

    def has_cache_item(self, identifier: str) -> bool:
        return self._reuse is not None and self._reuse.has(identifier)

    def update_state_after_alloc(self, request: "Request", index: int) -> None:
        # Called for the items vLLM will encode and for those it will load (has_cache_item said so).
        f = request.mm_features[index]
        source = classify_item(f) or CLIENT
        digest = self._reuse.digest(request.request_id, f) if self._reuse is not None and source == ENCODER else None
        self._step_items[f.identifier] = (f.modality, source, item_extras(f), digest)
        if self._reuse is not None:
            self._allocated.append((request.request_id, index, f.identifier))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> ECConnectorMetadata:
        self._send_finished()  # normally empty: the last step's end sent them
        self._in_step = True  # until this step's update_from_output ends (take_unavailable_requests)
        meta = PublisherMetadata(self._step_items)
        self._step_items = {}
        if self._reuse is not None:
            meta.loads, by_request = self._reuse.take_loads(self._allocated, scheduler_output)
            meta.ring = self._ring if meta.loads else None
            self._allocated = []
            for rid, hashes in by_request.items():
                self._reused.setdefault(rid, set()).update(hashes)
                for h in hashes:
                    meta.items.pop(h, None)  # loaded, not encoded: nothing to store
        return meta

    def ensure_cache_available(self, request: "Request", num_computed_tokens: int) -> bool:
        """Refuse media that no encoder will compute, unless allow_client_embeddings.

        ec_both makes vLLM accept image_embeds and media without data; publishing those as
        encoder outputs would be a lie, and accepting them widens the server's surface.
        """
        rid = request.request_id
        if rid not in self._verdicts:
            try:
                metadata, size = request_metadata(request)
                self._verdicts[rid] = (self._refusal(request, size), metadata)
            except Exception as e:  # noqa: BLE001 - nested past JSON's depth: an exception here stops the engine
                self._verdicts[rid] = (_unreadable_metadata(e), {})
        if self._verdicts[rid][0] is None:
            # reuse_stored_embeddings: a new request waits (a few steps, at most reuse_wait_ms) while
            # its items' stored outputs are fetched and checked, so has_cache_item can answer from memory.
            return self._reuse is None or self._reuse.ready(request, num_computed_tokens, self.key_for, _encoded)
        self._refuse.add(rid)
        return False

    def _refusal(self, request: "Request", size: int) -> str | None:
        id_bytes = len(request.request_id.encode("utf-8", "surrogatepass"))
        if id_bytes > MAX_REQUEST_ID_BYTES:
            return (f"its request id (X-Request-Id, or the body's request_id) is {id_bytes} bytes, over "
                    f"{MAX_REQUEST_ID_BYTES}; its event could not be published")
        if size > self.config.max_metadata_bytes:
            return (f"its metadata (vllm_xargs / extra_args) is {size} bytes, over max_metadata_bytes "
                    f"({self.config.max_metadata_bytes}); its event could not be published")
        if self.config.allow_client_embeddings:
            return None
        for i, f in enumerate(request.mm_features):
            kind = classify_item(f)
            if kind == CLIENT:
                return (f"{f.modality} item {i} arrived as client-supplied embeddings; this server only "
                        f"accepts raw media (set allow_client_embeddings to accept them)")
            if kind is None:
                return (f"{f.modality} item {i} carries no data; this server only accepts raw media "
                        f"(set allow_client_embeddings to accept it)")
        return None

    def take_unavailable_requests(self) -> set[str]:
        # vLLM calls this once per step in update_from_output, after the step's finished requests
        # were freed (request_finished) and before the step's outputs are sent: the one place to
        # wait for their spool records once per step rather than once per request.
        self._in_step = False
        self._send_finished()
        if self.config.durable_before_return and self._sent:
            self._wait_spooled()
        if not self._refuse:
            return set()
        refused, self._refuse = self._refuse, set()
        for rid in refused:
            log.warning("mm-events: refused request %s: %s", rid, self._verdicts.get(rid, (None,))[0])
        return refused

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        # On the scheduler loop: build a snapshot and enqueue; no I/O.
        rid = request.request_id
        refusal, metadata = self._verdicts.pop(rid, (None, None))
        reused = self._reused.pop(rid, ())
        if self._reuse is not None:
            self._reuse.forget(rid)
        if refusal is not None:
            return False, {"mm_embeddings": [], "error": refusal}
        features = request.mm_features
        if not features and not self.config.publish_text_only:
            return False, None
        items, keys, refs = [], {}, []
        for i, f in enumerate(features):
            pos = f.mm_position
            source = classify_item(f) or CLIENT
            # vLLM counts scheduled tokens; a preemption sets the count back to 0 (its encoder may have run)
            unreached = pos.offset >= request.num_computed_tokens and not getattr(request, "num_preemptions", 1)
            items.append(MediaItem(f.identifier, f.modality, i, pos.offset, pos.length, source, f.identifier in reused,
                                   unreached))
            key = keys[f.identifier] = self.key_for(f.identifier)
            refs.append({"uri": self.location.uri(key), "mm_hash": f.identifier, "modality": f.modality,
                         "item_index": i, "placeholder_offset": pos.offset, "placeholder_length": pos.length,
                         "dtype": self.config.storage_dtype, "source": source})
        snapshot = self._snapshot(request, tuple(items), metadata)
        self._hand_over(snapshot, keys,
                        _stop_check(request, snapshot.finish_reason) if self._replays_stop_strings else None)
        if self.config.return_params == "ids":  # no store locations for API clients
            return False, {"event_id": snapshot.event_id, "mm_embeddings": [
                {k: r[k] for k in ("mm_hash", "modality", "item_index", "source")} for r in refs]}
        params: dict[str, Any] = {"mm_embeddings": refs, "event_id": snapshot.event_id}
        if self._endpoint:
            params["s3_endpoint_url"] = self._endpoint
        return False, params

    def _hand_over(self, snapshot: FinishedRequest, keys: dict[str, str], stop_check: StopCheck | None = None) -> None:
        if self.config.backpressure == "drop":
            in_flight = self._sent + len(self._finished) - struct.unpack_from("<Q", self._settled, 0)[0]
            if in_flight >= self.config.max_pending_events:
                self.dropped_events += 1
                self.sidecar.send(EventsDropped(1))  # so the sidecar's report counts it too
                log.warning("mm-events: dropped the event of %s: %d events in flight (%d dropped so far)",
                            snapshot.request_id, in_flight, self.dropped_events)
                return
        self._finished.append((snapshot, keys, stop_check))
        if not self._in_step:
            self._send_finished()
            # vLLM finishes the requests that failed in a step (a grammar that did not compile, an encoder
            # output or KV blocks it could not obtain) after take_unavailable_requests, and sends their
            # outputs in the same update: with durable_before_return, hold them here. (An abort needs no
            # hold: its client is gone, or, for a stop string, its response already left.)
            if self.config.durable_before_return and snapshot.finish_reason == "error":
                self._wait_spooled()

    def _send_finished(self) -> None:
        if not self._finished:
            return
        batch, self._finished = tuple(self._finished), []
        # With backpressure=block this send waits while the sidecar is full (it stops reading).
        if self.sidecar.send(RequestsFinished(batch)):
            self._sent += len(batch)
        else:
            self.dropped_events += len(batch)

    def _wait_spooled(self) -> None:
        """durable_before_return: hold the step's outputs until the sidecar has fsynced every request
        handed over so far into its spool (one group fsync per step, on the scheduler loop). Bounded:
        a sidecar that does not answer in time costs a warning, never a wedged engine."""
        deadline = time.monotonic() + SPOOL_WAIT_S
        pause = 20e-6
        while struct.unpack_from("<Q", self._settled, 8)[0] < self._sent:
            if time.monotonic() > deadline or not self.sidecar.alive:
                log.warning("mm-events: responses left before their spool records were durable (the sidecar did "
                            "not confirm within %.0f s)", SPOOL_WAIT_S)
                return
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _metadata(self, request: "Request") -> dict[str, str]:
        """The event's metadata for a request without a verdict. Requests with media and oversized
        metadata were refused up front; a text-only one (publish_text_only) cannot be, so its event
        says what was left out."""
        try:
            metadata, size = request_metadata(request)
        except Exception as e:  # noqa: BLE001 - as in ensure_cache_available
            return {OVERSIZE_METADATA_KEY: _unreadable_metadata(e)}
        if size > self.config.max_metadata_bytes:
            return {OVERSIZE_METADATA_KEY: f"{size} bytes of metadata left out: over max_metadata_bytes "
                                           f"({self.config.max_metadata_bytes})"}
        return metadata

    def _snapshot(self, request: "Request", items: tuple[MediaItem, ...],
                  metadata: dict[str, str] | None) -> FinishedRequest:
        rid = request.request_id
        external = _INTERNAL_SUFFIX.sub("", rid) if self._randomized_ids else rid
        reason = request.get_finished_reason()
        headers = request.trace_headers or {}
        lora = request.lora_request
        stop = request.stop_reason
        return FinishedRequest(
            request_id=external,
            internal_request_id=rid,
            model=self.model,
            finish_reason=str(reason) if reason is not None else None,
            stop_reason=None if stop is None else str(stop),
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            metadata=self._metadata(request) if metadata is None else metadata,
            items=items,
            lora_name=lora.lora_name if lora is not None else None,
            arrival_time=request.arrival_time,
            finished_time=time.time(),
            traceparent=headers.get("traceparent"),
            tracestate=headers.get("tracestate"),
        )

    # ===================================================================================
    def shutdown(self) -> None:
        t = self.config.shutdown_timeout_s
        if self.role == ECConnectorRole.SCHEDULER:
            with _sigterm_deferred():
                if self._reuse is not None:  # first and quick: nothing of it outlives the engine
                    log.info("mm-events reuse: %s", self._fetcher.close(min(t, 5.0)))
                self._settled[CLOSING_AT] = 1
                self._send_finished()
                report = self.sidecar.close(t)
            log.info("mm-events scheduler side stopped: %s, dropped=%d", report, self.dropped_events)
        elif self._uploads_here:
            with _sigterm_deferred():
                while self.capture.wait_one():  # copies still in flight land (CUDA); then all is told
                    pass
                self._send_ready()
                report = self.sidecar.close(t)
            log.info("mm-events worker side stopped: saves=%d loads=%d %s, dropped=%d", self.saves,
                     getattr(self, "loads", 0), report, self.dropped)
        else:
            log.info("mm-events worker side stopped: saves=%d loads=%d {'uploaded': 0} (TP rank %d; rank 0 stores)",
                     self.saves, self.loads, _tp_rank())
