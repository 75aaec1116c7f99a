"""``vllm-mm-events`` command line: consume, search, events. (The demo is ``vllm-mm-events-demo``: it needs vLLM.)

Every ``consume``/``search`` flag is also a config key (``consumers/config.py``), settable as
``VLLM_MM_EVENTS_<KEY>`` or in the ``--config`` file; flags win. With no flags at all the
commands use the embedded defaults: the publisher's event log and objects under its data
directory, and a LanceDB table beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

EXIT_FAILED = 1
EXIT_CONFIG = 2

NO_LOG = "no event log at {path}: run the publisher (scripts/demo) first, or pass --source"


def _defaults() -> dict[str, str]:
    from consumers.config import KEYS, default_sink, default_source

    return {"src": default_source(), "sink": default_sink(), "objects": ",".join(KEYS["object_store"].default())}


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


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
    d = _defaults()
    parser = argparse.ArgumentParser(
        prog="vllm-mm-events", formatter_class=_formatter,
        description="Index the multimodal embeddings vLLM published into vector stores, search them, "
                    "and read the events.",
        epilog=f"""examples (after scripts/demo, on the embedded defaults: no flags needed):
  vllm-mm-events events                  the events in the embedded log, one line each
  vllm-mm-events consume --once          index them into the embedded LanceDB, then exit
  vllm-mm-events search --like URI       the items nearest to a stored embedding
                                         (URI: embeddings[].uri of `vllm-mm-events events --format json`)

defaults:
  source        {d['src']}
  sink          {d['sink']}
  object store  {d['objects']}
Every consume/search flag is also a config key: VLLM_MM_EVENTS_<KEY>, or --config FILE; flags win.
`vllm-mm-events COMMAND --help` shows each command's flags and examples.""")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{consume,search,events}")

    c = sub.add_parser(
        "consume", help="index published embeddings into vector stores", formatter_class=_formatter,
        description="Follow an event stream and keep vector stores in step with it (at least once, no duplicates).",
        epilog=f"""examples:
  vllm-mm-events consume --once
      index the embedded event log into the embedded LanceDB, then exit
  vllm-mm-events consume --source kafka://broker:9092/vllm.mm-embeddings --sink qdrant://qdrant:6333/images
      follow a topic into Qdrant (Ctrl-C or SIGTERM: finish the batch in flight, commit, exit 0)
  vllm-mm-events consume --once --sink lancedb:///data/lance/images --sink qdrant:///data/qdrant/images
      a second set of sinks: its own group, so it starts from the beginning of the log

defaults:
  --source        {d['src']}
  --sink          {d['sink']}
  --object-store  {d['objects']}

consumer group: unless --group names one, it is derived from the sinks:
  vllm-mm-events-<scheme>-<table>[-<scheme>-<table>...]-<hash>, the hash of the sorted sink URIs
  (credentials removed). Re-running with the same sinks resumes; a new set of sinks starts from the
  beginning, like a new connector. For a file source the group names the checkpoint
  (<log>.<group>.checkpoint), so each set of sinks keeps its own position. Name a group to keep one
  position across changes of sinks (or to resume the group of an older version).

progress: on a terminal, a live line (with --once, a bar up to what was there when it started);
  otherwise a log line every progress_interval_s (10 s): events, rate, indexed, dead-lettered, lag.""")
    c.add_argument("--source", help="kafka://host:port[,host:port]/topic or file:///path/events.avro "
                                    "(default: the embedded event log, see below)")
    c.add_argument("--sink", dest="sinks", action="append", default=None,
                   help="qdrant://host:port/coll, qdrant:///dir/coll, pgvector://user@host:port/db/table, "
                        "milvus://host:port/coll, milvus:///file.db/coll, lancedb:///dir/table (repeatable; "
                        "default: the embedded LanceDB, see below)")
    c.add_argument("--group", help="consumer group; for a file source it names the checkpoint "
                                   "(default: derived from the sinks, see below)")
    c.add_argument("--dlq", help="kafka://.../topic, file:///path.jsonl, or none (default <topic>.dlq)")
    c.add_argument("--checkpoint", help="file source: checkpoint path (default beside the log)")
    c.add_argument("--once", action="store_true", help="process what is there now, then exit 0")
    c.add_argument("--batch-max-records", dest="batch_max_records", type=int, default=None)
    c.add_argument("--batch-max-bytes", dest="batch_max_bytes", type=int, default=None)
    c.add_argument("--batch-linger-ms", dest="batch_linger_ms", type=int, default=None)
    c.add_argument("--metrics-port", dest="metrics_port", type=int, default=None, help="0 turns it off (default 9400)")
    c.add_argument("--metrics-host", dest="metrics_host", default=None, help="address to bind (default 0.0.0.0)")
    c.add_argument("--log-format", dest="log_format", choices=("text", "json"), default=None)
    _consumer_flags(c)

    s = sub.add_parser(
        "search", help="print the items nearest to a stored embedding", formatter_class=_formatter,
        description="Fetch a stored embedding, pool it as it was indexed, and print its nearest indexed items.",
        epilog=f"""examples:
  vllm-mm-events search --like file://$HOME/.local/share/vllm-mm-events/objects/<model>/float32/<mm_hash>.safetensors
      nearest items in the embedded LanceDB (its own request comes first, score 1.0)
  vllm-mm-events search --sink qdrant://qdrant:6333/images -k 10 --json \\
      --like s3://bucket/prefix/<model>/float32/<mm_hash>.safetensors

object URIs: embeddings[].uri of `vllm-mm-events events --format json`, or ec_transfer_params.
Search with the --pooling/--normalize the sink was indexed with.
default sink: {d['sink']}""")
    s.add_argument("--sink", dest="sinks", action="append", default=None,
                   help="the sink URI to query (default: the embedded LanceDB)")
    s.add_argument("--like", required=True, help="an object's URI (s3://..., file://...) or a local .safetensors path")
    s.add_argument("-k", type=int, default=5, help="how many hits (default 5)")
    s.add_argument("--json", action="store_true", help="print hits as JSON lines")
    _consumer_flags(s)

    e = sub.add_parser(
        "events", help="print the decoded events of a source (read-only)", formatter_class=_formatter,
        description="Print the events of a Kafka topic or an event log, decoded, optionally filtered. Read-only: "
                    "nothing is committed (Kafka: partitions assigned from the beginning, no group joined; file: "
                    "no checkpoint read or written).",
        epilog=f"""examples:
  vllm-mm-events events
      the embedded event log, one line per event (time, request id, model, items, missing, event id)
  vllm-mm-events events --format json --request-id chatcmpl-123
      that request's event as one JSON object (object URIs under embeddings[].uri)
  vllm-mm-events events --where tenant=acme --since 2h
      events whose metadata has tenant=acme, from the last two hours
  vllm-mm-events events --source kafka://broker:9092/vllm.mm-embeddings --follow
      everything on the topic, then new events as they come (Ctrl-C exits 0)

--since: an ISO-8601 time (2025-05-01T12:00:00Z; without an offset, local time) or a duration back
  from now (30s, 10m, 2h, 1d, 1h30m); compared with the event's event_time.
--where: key=value on the event's metadata (vllm_xargs); repeat to AND several.
A record that does not decode is reported on stderr with where it lies, and skipped.
default source: {d['src']}""")
    e.add_argument("--source", help="kafka://host:port[,host:port]/topic or file:///path/events.avro "
                                    "(default: the embedded event log)")
    e.add_argument("--follow", "-f", action="store_true", help="keep reading new events (Ctrl-C exits 0)")
    e.add_argument("--request-id", dest="request_id", help="only the event(s) of this request id (exact)")
    e.add_argument("--where", action="append", default=None, metavar="KEY=VALUE",
                   help="only events whose metadata has KEY=VALUE (repeatable: all must match)")
    e.add_argument("--since", metavar="TIME|DURATION", help="only events at or after this time (see below)")
    e.add_argument("--format", choices=("table", "json"), default="table",
                   help="table: one compact line per event (default); json: one JSON object per line")
    e.add_argument("--limit", type=int, metavar="N", help="stop after N matching events")
    e.add_argument("--config", help="JSON/YAML file of config keys (kafka settings, schema_registry_url)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from consumers.config import KEYS, ConfigError, ConsumerConfig
    from publisher.logs import setup_logging

    flags = {k: v for k, v in vars(args).items() if k in KEYS}
    try:
        cfg = ConsumerConfig.load(flags, config_file=args.config)
    except ConfigError as e:
        return _fail(args.command, f"{e} (see `vllm-mm-events {args.command} --help`)", EXIT_CONFIG)
    setup_logging(cfg.log_format, replace=True)
    if args.command == "search":
        return _search(cfg, args)
    if args.command == "events":
        return _events(cfg, args)
    return consume(cfg, once=args.once)


def _fail(command: str, message: str, code: int = EXIT_FAILED) -> int:
    print(f"vllm-mm-events {command}: {message}", file=sys.stderr, flush=True)
    return code


def _missing_log(source: str) -> Path | None:
    """A file source whose log is not there (yet)."""
    u = urlsplit(source)
    if u.scheme != "file":
        return None
    path = Path(unquote(u.path))
    return None if path.exists() else path


def _missing_package(e: ModuleNotFoundError, uri: str) -> str:
    scheme = urlsplit(uri).scheme
    return (f"the sink {scheme}:// needs the {e.name} package: pip install 'vllm-mm-events[{scheme}]' "
            "(every store: [consumers]), or pass --sink for a store that is installed")


def _search(cfg, args) -> int:
    from consumers.errors import Poison, Transient
    from consumers.search import format_hits, search_like

    try:
        hits = search_like(cfg.sinks[0], args.like, args.k, cfg.pooling, cfg.normalize, cfg.distance, cfg)
    except ModuleNotFoundError as e:
        return _fail("search", _missing_package(e, cfg.sinks[0]))
    except Poison as e:
        return _fail("search", f"{e}: pass --like the URI of a stored object (embeddings[].uri of "
                               "`vllm-mm-events events --format json`, or ec_transfer_params), or a local path")
    except Transient as e:
        return _fail("search", f"{e}: check the object store (--s3-endpoint-url, AWS credentials) and try again")
    if args.json:
        for h in hits:
            print(json.dumps({"id": h.id, "score": h.score, **h.payload}))
    else:
        print(format_hits(hits))
    return 0


def _events(cfg, args) -> int:
    from confluent_kafka import KafkaException

    from consumers.decoder import EventDecoder
    from consumers.events import TABLE_HEADER, EventFilter, parse_since, parse_where, read_events, to_json, to_table_row
    from consumers.sources import SourceNotFound, open_source
    from publisher.settings import redact_url
    from schemas import event_schema

    try:
        flt = EventFilter(args.request_id, parse_where(args.where), parse_since(args.since) if args.since else None)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit: expected a number >= 1, got {args.limit}")
    except ValueError as e:
        return _fail("events", f"{e} (see `vllm-mm-events events --help`)", EXIT_CONFIG)

    def warn(message: str) -> None:
        print(f"vllm-mm-events events: warning: {' '.join(message.split())[:2000]}", file=sys.stderr, flush=True)

    missing = _missing_log(cfg.source)
    if missing is not None:
        if not args.follow:
            return _fail("events", NO_LOG.format(path=missing))
        warn(f"no event log at {missing} yet: waiting for the publisher to write it (scripts/demo), "
             "or pass --source")
    printed = 0
    try:
        with open_source(cfg.source, cfg.group, kafka=cfg.kafka, checkpoint=None, reader_schema=event_schema(),
                         read_only=True) as source:
            if args.format == "table":
                print(TABLE_HEADER, flush=args.follow)
            decoder = EventDecoder(cfg.schema_registry_url, cfg.schema_registry)
            for event in read_events(source, decoder, args.follow, warn):
                if not flt.matches(event):
                    continue
                print(to_json(event) if args.format == "json" else to_table_row(event), flush=args.follow)
                printed += 1
                if args.limit is not None and printed >= args.limit:
                    break
        sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # | head: the reader has what it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except SourceNotFound as e:
        return _fail("events", f"{e}: check the topic in --source, or run the publisher first (it creates the "
                               "topic with its first event)")
    except KafkaException as e:
        return _fail("events", f"cannot read {redact_url(cfg.source)}: {e}: check that the broker is up and "
                               "reachable, and the kafka settings (VLLM_MM_EVENTS_KAFKA__*)")
    return 0


def consume(cfg, once: bool = False) -> int:
    from confluent_kafka import KafkaException

    from consumers.config import default_group
    from consumers.dead_letters import open_dead_letters
    from consumers.decoder import EventDecoder
    from consumers.indexer import Indexer
    from consumers.metrics import ConsumerMetrics, MetricsServer
    from consumers.objects import ObjectFetcher
    from consumers.progress import Progress, use_bar
    from consumers.sinks import SinkConfigError, open_vector_sink
    from consumers.sources import SourceUnreadable, open_source
    from publisher.settings import redact_url
    from schemas import event_schema

    log = logging.getLogger("vllm_mm_events.consumer")
    missing = _missing_log(cfg.source)
    if missing is not None:
        if once:
            return _fail("consume", NO_LOG.format(path=missing))
        log.warning("no event log at %s yet: waiting for the publisher to write it (scripts/demo), or pass --source",
                    missing)
    log.info("starting: %s", json.dumps(cfg.redacted()))
    if cfg.group == default_group(cfg.sinks):
        log.info("consumer group %s (derived from the sinks; --group names another)", cfg.group)
    metrics = ConsumerMetrics()
    try:
        with contextlib.ExitStack() as stack:
            if cfg.metrics_port:
                try:
                    stack.enter_context(MetricsServer(metrics, cfg.metrics_port, cfg.metrics_host,
                                                      stall_after_s=cfg.stall_timeout_s))
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise
                    return _fail("consume", f"metrics port {cfg.metrics_port} on {cfg.metrics_host} is in use "
                                            "(another consumer?): pass --metrics-port 0 to turn metrics off, or "
                                            "another port", EXIT_CONFIG)
            sinks = []
            for uri in cfg.sinks:
                try:
                    sinks.append(stack.enter_context(open_vector_sink(uri, cfg.distance)))
                except ModuleNotFoundError as e:
                    return _fail("consume", _missing_package(e, uri), EXIT_CONFIG)
            source = stack.enter_context(open_source(cfg.source, cfg.group, kafka=cfg.kafka,
                                                     checkpoint=cfg.checkpoint, reader_schema=event_schema()))
            dead_letters = stack.enter_context(open_dead_letters(cfg.dlq, cfg.source, cfg.group, cfg.kafka))
            fetcher = stack.enter_context(ObjectFetcher(cfg.object_store, cfg.s3_endpoint_url, cfg.s3_region,
                                                        cfg.max_object_bytes, cfg.permanent_error_retries))
            progress = Progress(cfg.progress_interval_s, bar=use_bar(sys.stderr, cfg.log_format))
            indexer = stack.enter_context(Indexer(cfg, source, sinks, dead_letters, fetcher, metrics,
                                                  EventDecoder(cfg.schema_registry_url, cfg.schema_registry),
                                                  progress))
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: indexer.request_stop())
            totals = indexer.run(once=once)
    except SinkConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except SourceUnreadable as e:
        return _fail("consume", str(e))
    except KafkaException as e:
        return _fail("consume", f"cannot read {redact_url(cfg.source)}: {e}: check that the broker is up, the "
                                "topic exists (the publisher creates it with its first event) and the kafka "
                                "settings (VLLM_MM_EVENTS_KAFKA__*)")
    log.info("stopped: %s", json.dumps(totals.as_dict()))
    print(json.dumps(totals.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
