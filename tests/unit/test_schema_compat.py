"""Schema evolution as a test: the current event schema is FULL-compatible with every released version
(``schemas/history/``), and a breaking change is rejected with a message naming the field.

Two versions have been released (v1; v2, the current schema, which added ``extra_tensors`` and ``reused``); the checks
are also run on ``next_schema()``: the current schema plus optional fields with defaults, the kind of change the
README allows; the mixed-version tests (tests/backends/test_schema_versions.py, test_schema_registry.py)
write and read events of both through the real sinks, sources and decoder.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import fastavro
import pytest

import schemas
from schemas import compat, event_schema, released_schemas
from schemas.codec import AvroCodec, UnknownSchema, schema_fingerprint, to_wire

ROOT = Path(__file__).resolve().parents[2]


def next_schema() -> dict:
    """A next version made the allowed way: an optional top-level field and an optional field of each
    embedding item, both ``["null", T]`` with default null."""
    s = event_schema()
    s["fields"].append({"name": "priority", "type": ["null", "string"], "default": None,
                        "doc": "A test-only field: what the next version of the schema might add."})
    _item(s)["fields"].append({"name": "encoder_ms", "type": ["null", "double"], "default": None})
    return s


def with_next_fields(event: dict, i: int) -> dict:
    """An event of the current schema, filled in for ``next_schema()``."""
    return {**event, "priority": f"p{i}", "embeddings": [{**e, "encoder_ms": 1.5 + i} for e in event["embeddings"]]}


def _field(record: dict, name: str) -> dict:
    return next(f for f in record["fields"] if f["name"] == name)


def _item(s: dict) -> dict:
    return _field(s, "embeddings")["type"]["items"]


# ---- the history ------------------------------------------------------------------------------

def test_history_holds_every_released_version_in_sequence():
    versions = released_schemas()
    labels = [label for label, _ in versions]
    assert labels == [f"v{i}" for i in range(1, len(versions) + 1)] and labels[:1] == ["v1"]
    fingerprints = [schema_fingerprint(fastavro.parse_schema(s)) for _, s in versions]
    assert len(set(fingerprints)) == len(fingerprints), "two history files hold the same schema"
    for _, s in versions:
        assert s["name"] == "MMEmbeddingEvent" and s["namespace"] == "io.vllm.mmevents.v1"
    # The history folder ships with the package (pyproject package-data) and documents its naming.
    assert (Path(schemas.__file__).parent / "history" / "README.md").exists()


def test_v1_is_the_first_released_schema_byte_for_byte():
    """v1 is the schema as first committed (c20d27b), byte for byte."""
    history = Path(schemas.__file__).parent / "history"
    v1 = (history / "v1.avsc").read_text()
    first = subprocess.run(["git", "show", "c20d27b:schemas/mm_embedding_event.avsc"], capture_output=True, text=True,
                           cwd=Path(schemas.__file__).parent.parent)
    if first.returncode == 0:  # a source checkout with its history (an installed package has none)
        assert v1 == first.stdout
    assert json.loads(v1)["fields"][0]["name"] == "event_id"



# ---- the check passes on what is allowed --------------------------------------------------------

def test_current_schema_is_full_compatible_with_every_released_version():
    assert compat.check_history() == []


def test_check_cli_passes_and_names_the_versions():
    r = subprocess.run([sys.executable, "-m", "schemas.compat"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FULL-compatible with every released version (v1" in r.stdout


def test_the_next_version_is_full_compatible_both_ways():
    assert compat.check_history(next_schema(), current_label="next") == []
    # and with the current schema standing in for the released one
    assert compat.check_full(event_schema(), next_schema(), "current", "next") == []


@pytest.mark.parametrize("change", ["optional field", "removed field with a default", "enum symbol (enum default)",
                                    "reordered fields", "new docs"])
def test_allowed_changes_pass(change):
    s = event_schema()
    if change == "optional field":
        s["fields"].append({"name": "tenant", "type": ["null", "string"], "default": None})
    elif change == "removed field with a default":
        s["fields"].remove(_field(s, "lora_name"))
    elif change == "enum symbol (enum default)":
        _field(_item(s), "source")["type"]["symbols"].append("CACHED")
    elif change == "reordered fields":
        s["fields"].reverse()
    else:
        for f in s["fields"]:
            f["doc"] = "changed"
    assert compat.check_full(event_schema(), s, "v1", "candidate") == []


def test_resolution_fills_defaults_both_ways():
    """The records the check writes: every union branch and enum symbol; read across versions, a field the
    reader lacks is dropped and one the writer lacks comes back as its default."""
    records = compat.sample_records(next_schema())
    assert {r["priority"] is None for r in records} == {True, False}
    assert {r["timings"] is None for r in records} == {True, False}
    items = [e for r in records for e in r["embeddings"]]
    assert {e["source"] for e in items} == {"ENCODER", "CLIENT"}
    assert {len(r["embeddings"]) for r in records} == {0, 1, 2}
    v1, nxt = fastavro.parse_schema(event_schema()), fastavro.parse_schema(next_schema())
    for r in records:
        old = compat._read_back(r, nxt, v1)  # forward: a v1 reader, a next writer
        assert "priority" not in old and all("encoder_ms" not in e for e in old["embeddings"])
        new = compat._read_back(to_wire(old), v1, nxt)  # backward: a next reader, a v1 writer
        assert new["priority"] is None and all(e["encoder_ms"] is None for e in new["embeddings"])


# ---- breaking changes are rejected, naming the field -------------------------------------------

def _breaking(change: str) -> tuple[dict, str]:
    s = event_schema()
    if change == "renamed field":
        _field(s, "model")["name"] = "model_name"
        return s, "'model'"
    if change == "renamed optional field":
        _field(s, "lora_name")["name"] = "adapter_name"
        return s, "'lora_name'"
    if change == "retyped field":
        _field(s, "num_prompt_tokens")["type"] = "string"
        return s, "'num_prompt_tokens'"
    if change == "retyped nested field":
        _field(_item(s), "size_bytes")["type"] = "int"
        return s, "'embeddings[].size_bytes'"
    if change == "new field without default":
        s["fields"].append({"name": "tenant", "type": "string"})
        return s, "'tenant'"
    if change == "new nested field without default":
        _item(s)["fields"].append({"name": "crop", "type": "string"})
        return s, "'embeddings[].crop'"
    if change == "removed field without default":
        s["fields"].remove(_field(s, "request_id"))
        return s, "'request_id'"
    if change == "union branch added":
        _field(s, "stop_reason")["type"] = ["null", "string", "long"]
        return s, "'stop_reason'"
    if change == "optional made required":
        _field(s, "finish_reason")["type"] = "string"
        del _field(s, "finish_reason")["default"]
        return s, "'finish_reason'"
    if change == "logical type changed":
        _field(s, "event_time")["type"] = {"type": "long", "logicalType": "timestamp-micros"}
        return s, "'event_time'"
    if change == "enum symbol removed, no enum default":
        enum = _field(_item(s), "source")["type"]
        del enum["default"]
        enum["symbols"].remove("CLIENT")
        return s, "'embeddings[].source'"
    if change == "record renamed":
        _field(s, "producer")["type"]["name"] = "Producer"
        return s, "'producer'"
    if change == "default not of the first branch":
        s["fields"].append({"name": "tenant", "type": ["string", "null"], "default": None})
        return s, "'tenant'"
    raise AssertionError(change)


BREAKING = ["renamed field", "renamed optional field", "retyped field", "retyped nested field",
            "new field without default", "new nested field without default", "removed field without default",
            "union branch added", "optional made required", "logical type changed",
            "enum symbol removed, no enum default", "record renamed", "default not of the first branch"]


@pytest.mark.parametrize("change", BREAKING)
def test_breaking_changes_are_rejected_naming_the_field(change):
    candidate, field = _breaking(change)
    problems = compat.structural_problems(event_schema(), candidate, "v1", "candidate")
    assert problems, f"{change}: not caught by the structural rules"
    assert any(field in p for p in problems), problems
    assert all(p.startswith("v1 -> candidate: ") for p in problems)
    # the whole check (against the history) rejects it too
    assert compat.check_history(candidate, current_label="candidate")


@pytest.mark.parametrize("change", ["renamed field", "retyped field", "new field without default",
                                    "removed field without default", "union branch added",
                                    "enum symbol removed, no enum default"])
def test_fastavro_resolution_also_rejects_them(change):
    """Independently of the rules: written with one schema, the sample records do not read with the other."""
    candidate, _ = _breaking(change)
    problems = compat.resolution_problems(event_schema(), candidate, "v1", "candidate")
    assert problems and all("does not read with" in p for p in problems), problems


def test_renamed_field_message_says_what_to_do():
    candidate, _ = _breaking("renamed field")
    (msg,) = [p for p in compat.structural_problems(event_schema(), candidate, "v1", "current") if "renamed" in p]
    assert "field 'model' renamed to 'model_name'" in msg and "add the new field with a default" in msg


def test_check_cli_rejects_a_breaking_candidate(tmp_path):
    candidate, _ = _breaking("retyped field")
    path = tmp_path / "candidate.avsc"
    path.write_text(json.dumps(candidate))
    r = subprocess.run([sys.executable, "-m", "schemas.compat", "--schema", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "NOT FULL-compatible" in r.stdout and "field 'num_prompt_tokens' retyped from int to string" in r.stdout


def test_check_against_another_history_folder(tmp_path):
    """--history: a folder of v<N>.avsc; each version is checked, in order."""
    (tmp_path / "v1.avsc").write_text(schemas.event_schema_text())
    (tmp_path / "v2.avsc").write_text(json.dumps(next_schema()))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [label for label, _ in compat.history(tmp_path)] == ["v1", "v2"]
    # the current schema lacks v2's optional fields: removing a field with a default is allowed
    assert compat.check_history(versions=compat.history(tmp_path)) == []
    broken = copy.deepcopy(next_schema())
    _field(broken, "priority")["type"] = ["null", "long"]
    problems = compat.check_history(broken, compat.history(tmp_path), "candidate")
    assert any(p.startswith("v2 -> candidate: field 'priority' retyped") for p in problems), problems


# ---- the codec reads released versions by fingerprint -------------------------------------------

def _event(i: int = 0) -> dict:
    from contract.test_event_sink import event

    return event(i)


def test_codec_reads_every_released_version_by_fingerprint():
    codec, e = AvroCodec(), _event()
    for label, s in released_schemas():
        value = AvroCodec(s, writers=[]).encode(e)
        assert to_wire(codec.decode(value)) == e, label


def test_a_next_version_reader_reads_released_single_object_values():
    """What the next release's consumer needs: v1's single-object values, by v1's fingerprint."""
    nxt, e = AvroCodec(next_schema(), writers=[s for _, s in released_schemas()]), _event()
    got = nxt.decode(AvroCodec().encode(e))
    assert got["priority"] is None and to_wire({k: v for k, v in got.items() if k != "priority"}) == e


def test_todays_reader_cannot_know_a_newer_fingerprint():
    """Forward compatibility in single-object framing is impossible: the fingerprint names a schema the
    older reader has never seen (hence: the registry, or consumers upgraded first)."""
    value = AvroCodec(next_schema(), writers=[]).encode(with_next_fields(_event(), 1))
    with pytest.raises(UnknownSchema, match="unknown schema fingerprint"):
        AvroCodec().decode(value)
