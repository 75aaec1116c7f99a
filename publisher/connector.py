"""``MMEmbeddingPublisher``: the vLLM encoder-cache connector. vLLM types stop here.

One class, two halves, in two processes that share no Python state:

- worker half (``save_caches``): every encoder output -> capture (launch a device->host
  copy) -> background upload to the object store under a content-addressed key.
- scheduler half (``request_finished``): every finished request -> a plain snapshot and
  the object URIs (derivable from the key, so no I/O) -> returned to the caller as
  ``ec_transfer_params`` and queued for the dispatcher, which publishes the event once
  every object it names is durable.

The object store is the meeting point. The only thing the scheduler tells the worker is
each scheduled item's modality and origin (through the connector metadata), so the
stored object can describe itself.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
)

from publisher.config import PublisherConfig
from publisher.events import FinishedRequest, MediaItem, stringify_metadata
from publisher.store import open_store
from publisher.tensors import object_key

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm_mm_events.connector")
CONNECTOR_NAME = "MMEmbeddingPublisher"
ENCODER, CLIENT = "ENCODER", "CLIENT"
_INTERNAL_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


@dataclass
class PublisherMetadata(ECConnectorMetadata):
    """Scheduler -> worker, per step: mm_hash -> (modality, source) for items about to be encoded."""
    items: dict[str, tuple[str, str]] = field(default_factory=dict)


def served_model_name(vllm_config: "VllmConfig") -> str:
    name = vllm_config.model_config.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0]
    return name or vllm_config.model_config.model


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
        from publisher.plugin import setup_logging

        setup_logging()  # also when loaded through ec_connector_module_path, without the plugin
        extra = vllm_config.ec_transfer_config.ec_connector_extra_config or {}
        self.config = PublisherConfig.load(extra)
        self.model = served_model_name(vllm_config)
        self.store, self.prefix = open_store(
            self.config.object_store, endpoint_url=self.config.s3_endpoint_url, region=self.config.s3_region,
            fsync=self.config.fsync, max_connections=max(10, self.config.upload_threads * 2))
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
            key = self._keys[mm_hash] = object_key(self.prefix, self.model, mm_hash, self.config.storage_dtype)
        return key

    # ===================================================================================
    # Worker half
    # ===================================================================================
    def _init_worker(self) -> None:
        from publisher.capture import DeviceToHostCapture, InflightBudget
        from publisher.uploader import ObjectUploader

        self.budget = InflightBudget(self.config.max_inflight_bytes)
        self.capture = DeviceToHostCapture(self.budget, block=self.config.backpressure == "block")
        self.uploader = ObjectUploader(self.store, self.model, self.config.storage_dtype,
                                       threads=self.config.upload_threads)
        self.saves = 0  # save_caches calls seen: one per encoder run of an item
        self.dropped = 0
        self._uploads_here: bool | None = None  # decided at the first save (ranks exist by then)

    def _is_upload_rank(self) -> bool:
        # With tensor parallelism every rank sees the same encoder output; rank 0 stores it.
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            return get_tensor_model_parallel_rank() == 0
        except Exception:  # noqa: BLE001 - no TP group: a single worker
            return True

    def start_load_caches(self, encoder_cache: dict[str, "torch.Tensor"], **kwargs) -> None:
        return  # never a source of encoder outputs: has_cache_item() is always False

    def save_caches(self, encoder_cache: dict[str, "torch.Tensor"], mm_hash: str, **kwargs) -> None:
        # In the model step: at most a launched copy and a queue put.
        self.saves += 1
        if self._uploads_here is None:
            self._uploads_here = self._is_upload_rank()
        if not self._uploads_here:
            return
        key = self.key_for(mm_hash)
        if self.uploader.known(key):
            return
        meta = self._connector_metadata
        modality, source = (meta.items.get(mm_hash) if isinstance(meta, PublisherMetadata) else None) or (
            "unknown", ENCODER)
        copy = self.capture.capture(encoder_cache[mm_hash])
        if copy is None:
            self.dropped += 1
            log.warning("mm-events: dropped %s under backpressure (%d dropped so far)", mm_hash, self.dropped)
            return
        from publisher.uploader import UploadJob

        self.uploader.submit(UploadJob(key, copy, mm_hash, modality, source))

    # ===================================================================================
    # Scheduler half
    # ===================================================================================
    def _init_scheduler(self) -> None:
        from publisher.dispatcher import EventDispatcher
        from publisher.events import AvroCodec, producer_info
        from publisher.sinks import open_event_sink

        import vllm

        c = self.config
        sink = open_event_sink(c.event_sink, AvroCodec(), kafka=c.kafka, registry_url=c.schema_registry_url,
                               registry_settings=c.schema_registry, fsync=c.fsync,
                               topic_partitions=c.topic_partitions)
        self.dispatcher = EventDispatcher(
            self.store, sink, producer_info(getattr(vllm, "__version__", "unknown"), c.storage_dtype),
            max_pending=c.max_pending_events, block=c.backpressure == "block",
            durability_timeout_s=c.durability_timeout_s)
        self._step_items: dict[str, tuple[str, str]] = {}
        self._verdicts: dict[str, str | None] = {}  # request_id -> refusal reason (None: fine)
        self._refuse: set[str] = set()
        self._randomized_ids = not os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION")
        self._endpoint = c.s3_endpoint_url if c.object_store.startswith("s3://") else None

    def has_cache_item(self, identifier: str) -> bool:
        return False

    def update_state_after_alloc(self, request: "Request", index: int) -> None:
        f = request.mm_features[index]
        self._step_items[f.identifier] = (f.modality, classify_item(f) or CLIENT)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> ECConnectorMetadata:
        meta = PublisherMetadata(self._step_items)
        self._step_items = {}
        return meta

    def ensure_cache_available(self, request: "Request", num_computed_tokens: int) -> bool:
        """Refuse media that no encoder will compute, unless allow_client_embeddings.

        ec_both makes vLLM accept image_embeds and media without data; publishing those as
        encoder outputs would be a lie, and accepting them widens the server's surface.
        """
        rid = request.request_id
        if rid not in self._verdicts:
            self._verdicts[rid] = None if self.config.allow_client_embeddings else self._refusal(request)
        if self._verdicts[rid] is None:
            return True
        self._refuse.add(rid)
        return False

    @staticmethod
    def _refusal(request: "Request") -> str | None:
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
        if not self._refuse:
            return set()
        refused, self._refuse = self._refuse, set()
        for rid in refused:
            log.warning("mm-events: refused request %s: %s", rid, self._verdicts.get(rid))
        return refused

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        # On the scheduler loop: build a snapshot and enqueue; no I/O.
        rid = request.request_id
        refusal = self._verdicts.pop(rid, None)
        if refusal is not None:
            return False, {"mm_embeddings": [], "error": refusal}
        features = request.mm_features
        if not features and not self.config.publish_text_only:
            return False, None
        items, keys, refs = [], {}, []
        for i, f in enumerate(features):
            pos = f.mm_position
            source = classify_item(f) or CLIENT
            items.append(MediaItem(f.identifier, f.modality, i, pos.offset, pos.length, source))
            key = keys[f.identifier] = self.key_for(f.identifier)
            refs.append({"uri": self.store.uri(key), "mm_hash": f.identifier, "modality": f.modality,
                         "item_index": i, "placeholder_offset": pos.offset, "placeholder_length": pos.length,
                         "dtype": self.config.storage_dtype, "source": source})
        snapshot = self._snapshot(request, tuple(items))
        params: dict[str, Any] = {"mm_embeddings": refs, "event_id": snapshot.event_id}
        if self._endpoint:
            params["s3_endpoint_url"] = self._endpoint
        self.dispatcher.submit(snapshot, keys)
        return False, params

    def _snapshot(self, request: "Request", items: tuple[MediaItem, ...]) -> FinishedRequest:
        rid = request.request_id
        external = _INTERNAL_SUFFIX.sub("", rid) if self._randomized_ids else rid
        sp = request.sampling_params
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
            metadata=stringify_metadata(sp.extra_args if sp is not None else None),
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
            left = self.dispatcher.close(t)
            log.info("mm-events scheduler side stopped: %s, undelivered=%d", self.dispatcher.stats.as_dict(), left)
        else:
            left = self.uploader.close(t)
            log.info("mm-events worker side stopped: saves=%d %s, dropped=%d, not uploaded=%d",
                     self.saves, self.uploader.stats.as_dict(), self.dropped, left)
