"""``vllm-mm-events search``: the nearest indexed items to a stored embedding."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from consumers.config import ConsumerConfig
from consumers.objects import ObjectFetcher
from consumers.sinks import Hit, open_vector_sink
from consumers.vectors import pool
from schemas.objects import read_object


def search_like(sink_uri: str, like: str, k: int, pooling: str, normalize: bool, distance: str,
                cfg: ConsumerConfig) -> list[Hit]:
    """Fetch the object at ``like`` (s3://, file:// or a path), pool it as indexed, query the sink.

    The user names ``like`` on the command line, so a local path they give is allowed too.
    """
    u = urlsplit(like)
    if u.scheme == "s3":
        own = f"s3://{u.netloc}"
    else:
        path = Path(unquote(u.path) if u.scheme == "file" else like).resolve()
        like, own = path.as_uri(), path.parent.as_uri()
    stores = [*cfg.object_store, own]
    with ObjectFetcher(stores, cfg.s3_endpoint_url, cfg.s3_region, cfg.max_object_bytes) as fetcher:
        features = read_object(fetcher.get(like)).to_float32()
    with open_vector_sink(sink_uri, distance) as sink:
        if sink.describe() is None:
            raise SystemExit(f"vllm-mm-events search: {sink.name} does not exist yet; nothing has been indexed "
                             "there: run `vllm-mm-events consume --once` with the same --sink first, or pass the "
                             "--sink you indexed into")
        return sink.search(pool(features, pooling, normalize), k)


def format_hits(hits: list[Hit]) -> str:
    lines = [f"{'rank':>4}  {'score':>8}  {'request_id':<24} {'modality':<8} {'mm_hash':<16} uri"]
    for i, h in enumerate(hits, 1):
        p = h.payload
        lines.append(f"{i:>4}  {h.score:>8.4f}  {str(p.get('request_id')):<24} {str(p.get('modality')):<8} "
                     f"{str(p.get('mm_hash'))[:16]:<16} {p.get('uri')}")
    return "\n".join(lines)
