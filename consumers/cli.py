"""``vllm-mm-events`` command line: consume, search. (The demo is ``vllm-mm-events-demo``: it needs vLLM.)

Every ``consume``/``search`` flag is also a config key (``consumers/config.py``), settable as
``VLLM_MM_EVENTS_<KEY>`` or in the ``--config`` file; flags win.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys

EXIT_CONFIG = 2


def _consumer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON/YAML file of config keys (env: VLLM_MM_EVENTS_CONSUMER_CONFIG_FILE)")
    p.add_argument("--pooling", choices=("mean", "first", "max", "none"), default=None,
                   help="how a (num_features, hidden) embedding becomes what is indexed (default mean)")
    p.add_argument("--normalize", action="store_const", const=True, default=None, help="L2-normalise vectors")
    p.add_argument("--distance", choices=("cosine", "dot", "l2"), default=None,
                   help="distance of a collection created by the consumer (default cosine)")
    p.add_argument("--s3-endpoint-url", dest="s3_endpoint_url", default=None, help="MinIO / S3-compatible endpoint")
    p.add_argument("--object-store", dest="object_store", default=None,
                   help="store(s) objects may be read from, comma-separated (s3://bucket/prefix, file:///dir); "
                        "default: the publisher's default directory")
    p.add_argument("--max-object-bytes", dest="max_object_bytes", type=int, default=None,
                   help="largest object read (default 256 MiB)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-mm-events")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("consume", help="index published embeddings into vector stores")
    c.add_argument("--source", help="kafka://host:port[,host:port]/topic or file:///path/events.avro")
    c.add_argument("--sink", dest="sinks", action="append", default=None,
                   help="qdrant://host:port/coll, qdrant:///dir/coll, pgvector://user@host:port/db/table, "
                        "milvus://host:port/coll, milvus:///file.db/coll, lancedb:///dir/table (repeatable)")
    c.add_argument("--group", help="consumer group (file source: names the checkpoint)")
    c.add_argument("--dlq", help="kafka://.../topic, file:///path.jsonl, or none (default <topic>.dlq)")
    c.add_argument("--checkpoint", help="file source: checkpoint path (default beside the log)")
    c.add_argument("--once", action="store_true", help="process what is there now, then exit 0")
    c.add_argument("--batch-max-records", dest="batch_max_records", type=int, default=None)
    c.add_argument("--batch-max-bytes", dest="batch_max_bytes", type=int, default=None)
    c.add_argument("--batch-linger-ms", dest="batch_linger_ms", type=int, default=None)
    c.add_argument("--metrics-port", dest="metrics_port", type=int, default=None, help="0 turns it off")
    c.add_argument("--metrics-host", dest="metrics_host", default=None, help="address to bind (default 0.0.0.0)")
    c.add_argument("--log-format", dest="log_format", choices=("text", "json"), default=None)
    _consumer_flags(c)

    s = sub.add_parser("search", help="print the items nearest to a stored embedding")
    s.add_argument("--sink", dest="sinks", action="append", default=None, help="the sink URI to query")
    s.add_argument("--like", required=True, help="an object's URI (s3://..., file://...) or a local .safetensors path")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--json", action="store_true", help="print hits as JSON lines")
    _consumer_flags(s)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from consumers.config import ConfigError, ConsumerConfig
    from publisher.logs import setup_logging

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "once", "like", "k", "json")}
    try:
        cfg = ConsumerConfig.load(flags, config_file=args.config,
                                  required=("source", "sinks") if args.command == "consume" else ("sinks",))
    except ConfigError as e:
        print(f"vllm-mm-events {args.command}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.log_format, replace=True)
    if args.command == "search":
        return _search(cfg, args)
    return consume(cfg, once=args.once)


def _search(cfg, args) -> int:
    from consumers.search import format_hits, search_like

    hits = search_like(cfg.sinks[0], args.like, args.k, cfg.pooling, cfg.normalize, cfg.distance, cfg)
    if args.json:
        for h in hits:
            print(json.dumps({"id": h.id, "score": h.score, **h.payload}))
    else:
        print(format_hits(hits))
    return 0


def consume(cfg, once: bool = False) -> int:
    from consumers.dead_letters import open_dead_letters
    from consumers.decoder import EventDecoder
    from consumers.indexer import Indexer
    from consumers.metrics import ConsumerMetrics, MetricsServer
    from consumers.objects import ObjectFetcher
    from consumers.sinks import SinkConfigError, open_vector_sink
    from consumers.sources import open_source
    from schemas import event_schema

    log = logging.getLogger("vllm_mm_events.consumer")
    log.info("starting: %s", json.dumps(cfg.redacted()))
    metrics = ConsumerMetrics()
    try:
        with contextlib.ExitStack() as stack:
            if cfg.metrics_port:
                stack.enter_context(MetricsServer(metrics, cfg.metrics_port, cfg.metrics_host,
                                                  stall_after_s=cfg.stall_timeout_s))
            sinks = [stack.enter_context(open_vector_sink(uri, cfg.distance)) for uri in cfg.sinks]
            source = stack.enter_context(open_source(cfg.source, cfg.group, kafka=cfg.kafka,
                                                     checkpoint=cfg.checkpoint, reader_schema=event_schema()))
            dead_letters = stack.enter_context(open_dead_letters(cfg.dlq, cfg.source, cfg.group, cfg.kafka))
            fetcher = stack.enter_context(ObjectFetcher(cfg.object_store, cfg.s3_endpoint_url, cfg.s3_region,
                                                        cfg.max_object_bytes, cfg.permanent_error_retries))
            indexer = stack.enter_context(Indexer(cfg, source, sinks, dead_letters, fetcher, metrics,
                                                  EventDecoder(cfg.schema_registry_url, cfg.schema_registry)))
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: indexer.request_stop())
            totals = indexer.run(once=once)
    except SinkConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    log.info("stopped: %s", json.dumps(totals.as_dict()))
    print(json.dumps(totals.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
