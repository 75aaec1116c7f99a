"""``vllm-mm-events events``: --since, --where and the output forms (consumers/events.py)."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from consumers.events import EventFilter, parse_since, parse_where, to_json, to_table_row

NOW = datetime(2025, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text,back", [
    ("10m", timedelta(minutes=10)), ("2h", timedelta(hours=2)), ("90s", timedelta(seconds=90)),
    ("1d", timedelta(days=1)), ("1w", timedelta(weeks=1)), ("1h30m", timedelta(minutes=90)),
    ("0.5h", timedelta(minutes=30)), (" 15M ", timedelta(minutes=15)),
])
def test_since_a_duration_counts_back_from_now(text, back):
    assert parse_since(text, NOW) == NOW - back


@pytest.mark.parametrize("text,expected", [
    ("2025-04-30T10:00:00Z", datetime(2025, 4, 30, 10, tzinfo=timezone.utc)),
    ("2025-04-30T10:00:00.250z", datetime(2025, 4, 30, 10, 0, 0, 250000, tzinfo=timezone.utc)),
    ("2025-04-30T12:00:00+02:00", datetime(2025, 4, 30, 10, tzinfo=timezone.utc)),
    ("2025-04-30 10:00:00+00:00", datetime(2025, 4, 30, 10, tzinfo=timezone.utc)),
])
def test_since_an_iso_time(text, expected):
    assert parse_since(text, NOW) == expected


def test_since_without_an_offset_is_local_time():
    got = parse_since("2025-04-30T10:00:00", NOW)
    assert got.tzinfo is not None and got == datetime(2025, 4, 30, 10).astimezone()


@pytest.mark.parametrize("text", ["", "yesterday", "10", "10x", "m10", "2025-13-01", "1h 30m", "-5m"])
def test_since_refuses_what_it_cannot_read_and_says_what_it_takes(text):
    with pytest.raises(ValueError, match=r"--since: expected an ISO-8601 time .* or a duration"):
        parse_since(text, NOW)


def test_where_pairs():
    assert parse_where(["tenant=acme", "tier=gold", "q=a=b", "empty="]) == {
        "tenant": "acme", "tier": "gold", "q": "a=b", "empty": ""}
    assert parse_where(None) == {}
    for bad in (["tenant"], ["=acme"]):
        with pytest.raises(ValueError, match="--where: expected key=value"):
            parse_where(bad)
    with pytest.raises(ValueError, match="given twice"):
        parse_where(["t=a", "t=b"])


def event(request_id="r1", metadata=None, at=NOW, embeddings=(), missing=()):
    return {"event_id": "e-" + request_id, "event_time": at, "request_id": request_id, "model": "m",
            "metadata": dict(metadata or {}), "embeddings": list(embeddings), "missing_embeddings": list(missing)}


def test_the_filter_ands_every_condition():
    e = event("r1", {"tenant": "acme", "tier": "gold"}, NOW - timedelta(minutes=5))
    assert EventFilter().matches(e)
    assert EventFilter("r1", {"tenant": "acme"}, NOW - timedelta(minutes=10)).matches(e)
    assert EventFilter(where={"tenant": "acme", "tier": "gold"}).matches(e)
    assert not EventFilter("r", {}).matches(e)  # exact, not a prefix
    assert not EventFilter(where={"tenant": "acme", "tier": "silver"}).matches(e)
    assert not EventFilter(where={"region": ""}).matches(e)  # a missing key is no match, even for ""
    assert not EventFilter(since=NOW - timedelta(minutes=1)).matches(e)
    assert EventFilter(since=NOW - timedelta(minutes=5)).matches(e)  # at or after


def test_json_is_one_line_with_times_and_bytes_made_json():
    e = event("r1", {"tenant": "acme"}, datetime(2025, 5, 1, 12, 0, 0, 123000, tzinfo=timezone.utc))
    e["timings"] = {"finished_time_ms": NOW}
    e["raw"] = b"\x00\xff"
    line = to_json(e)
    assert "\n" not in line
    back = json.loads(line)
    assert back["event_time"] == "2025-05-01T12:00:00.123Z" and back["timings"]["finished_time_ms"] == \
        "2025-05-01T12:00:00.000Z"
    assert back["raw"] == "AP8=" and back["metadata"] == {"tenant": "acme"}


def test_a_table_row_is_compact():
    e = event("chatcmpl-1", embeddings=[{"modality": "image"}, {"modality": "image"}, {"modality": "audio"}],
              missing=["h1"])
    row = to_table_row(e)
    assert "\n" not in row
    assert row.split() == ["2025-05-01T12:00:00.000Z", "chatcmpl-1", "m", "audio:1,image:2", "1", "e-chatcmpl-1"]
    assert to_table_row(event("t")).split()[3] == "-"  # text only
