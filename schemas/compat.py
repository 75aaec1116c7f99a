"""Schema evolution, checked: the current event schema against every released version (``history/``).

FULL compatibility, both ways, for each released version ``old`` and the ``current`` schema:

- backward: a consumer on ``current`` reads events written with ``old``;
- forward: a consumer still on ``old`` reads events written with ``current``.

Two checks, both must pass:

- structural rules, each naming the field: no field removed unless it had a default, no field
  added without one (nor with a default that does not match its type), no field renamed, no field
  retyped (a union's branches, an enum's symbols without an enum default, a named type's name, a
  logical type: all count), and a new union field's default matching its first branch (the Avro
  spec's rule, enforced by Java readers and registries);
- Avro schema resolution through fastavro, both ways: sample records that take every union branch
  and enum symbol, empty and filled arrays and maps, are written with one schema and read with the
  other; a field the reader has and the writer lacks must come back as its default, a field both
  have unchanged.

``python -m schemas.compat`` runs both against ``schemas/history/`` (exit 1 and one line per
problem when any fails); ``--schema FILE`` checks another candidate; ``--registry-url URL
--subject S`` also asks a Confluent-compatible registry (``POST /compatibility/subjects/S/
versions/latest``) under the subject's own compatibility mode. Imports neither torch nor vLLM.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import fastavro
from fastavro.validation import validate

from schemas import HISTORY_DIR, event_schema, released_schemas
from schemas.codec import to_wire

_VERSION_FILE = re.compile(r"^v(\d+)\.avsc$")
_PRIMITIVE = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
_NAMED = {"record", "error", "enum", "fixed"}


# ---- the released versions ----------------------------------------------------------------------

def history(directory: str | Path | None = None) -> list[tuple[str, dict]]:
    """``(label, schema)`` of each released version, oldest first (``v1``, ``v2``, ...): the shipped
    ``schemas/history/`` or another folder of ``v<N>.avsc`` files."""
    if directory is None:
        return released_schemas()
    found = [(int(m.group(1)), f"v{m.group(1)}", entry) for entry in Path(directory).iterdir()
             if (m := _VERSION_FILE.match(entry.name))]
    return [(label, json.loads(entry.read_text())) for _, label, entry in sorted(found, key=lambda t: t[0])]


# ---- walking a schema ---------------------------------------------------------------------------

def _parse(schema: Any) -> Any:
    """fastavro's parsed form: full names everywhere, references by full name, defaults checked."""
    return fastavro.parse_schema(schema, _write_hint=False)


def _named_types(parsed: Any) -> dict[str, dict]:
    named: dict[str, dict] = {}

    def walk(s: Any) -> None:
        if isinstance(s, list):
            for b in s:
                walk(b)
        elif isinstance(s, dict):
            t = s.get("type")
            if t in _NAMED:
                if s["name"] in named:
                    return
                named[s["name"]] = s
                for f in s.get("fields", ()):
                    walk(f["type"])
            elif t == "array":
                walk(s["items"])
            elif t == "map":
                walk(s["values"])
            elif isinstance(t, (dict, list)):
                walk(t)

    walk(parsed)
    return named


def _deref(s: Any, named: dict[str, dict]) -> Any:
    while True:
        if isinstance(s, str) and s in named:
            s = named[s]
        elif isinstance(s, dict) and isinstance(s.get("type"), (dict, list)):
            s = s["type"]  # {"type": {...}}
        elif isinstance(s, dict) and s.get("type") in named and len(s) == 1:
            s = named[s["type"]]
        else:
            return s


def _kind(s: Any) -> str:
    if isinstance(s, list):
        return "union"
    if isinstance(s, str):
        return s
    t = s["type"]
    return "record" if t == "error" else t


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _describe(s: Any, named: dict[str, dict]) -> str:
    s = _deref(s, named)
    k = _kind(s)
    if k == "union":
        return "[" + ", ".join(_describe(b, named) for b in s) + "]"
    if k in ("record", "enum", "fixed"):
        return f"{k} {_short(s['name'])}"
    if k == "array":
        return f"array of {_describe(s['items'], named)}"
    if k == "map":
        return f"map of {_describe(s['values'], named)}"
    logical = s.get("logicalType") if isinstance(s, dict) else None
    return f"{k} ({logical})" if logical else k


def _branch_key(s: Any, named: dict[str, dict]) -> str:
    s = _deref(s, named)
    k = _kind(s)
    return f"{k} {s['name']}" if k in ("record", "enum", "fixed") else k


def _renamed(kind: str, old: str, new: str) -> str:
    a, b = (_short(old), _short(new)) if _short(old) != _short(new) else (old, new)
    return f"{kind} {a} renamed to {b}: readers match named types by their full name"


def _field_label(path: str) -> str:
    return f"field '{path}'" if path else "the top-level record"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---- structural rules -------------------------------------------------------------------------

class _Rules:
    def __init__(self, old: Any, new: Any, old_label: str, new_label: str):
        self.old, self.new = _parse(old), _parse(new)
        self.old_named, self.new_named = _named_types(self.old), _named_types(self.new)
        self.ol, self.nl = old_label, new_label
        self.problems: list[str] = []
        self._records_seen: set[tuple[str, str, str]] = set()

    def run(self) -> list[str]:
        self.types(self.old, self.new, "")
        return self.problems

    def add(self, message: str) -> None:
        self.problems.append(f"{self.ol} -> {self.nl}: {message}")

    def types(self, o: Any, n: Any, path: str) -> None:
        o, n = _deref(o, self.old_named), _deref(n, self.new_named)
        ko, kn = _kind(o), _kind(n)
        if ko != kn:
            self.add(f"{_field_label(path)} retyped from {_describe(o, self.old_named)} to "
                     f"{_describe(n, self.new_named)}: a field keeps its type for good; add a new field instead")
            return
        if ko == "union":
            self.union(o, n, path)
        elif ko == "record":
            self.record(o, n, path)
        elif ko == "enum":
            self.enum(o, n, path)
        elif ko == "fixed":
            if o["name"] != n["name"] or o["size"] != n["size"]:
                self.add(f"{_field_label(path)} retyped from {_describe(o, self.old_named)} (size {o['size']}) to "
                         f"{_describe(n, self.new_named)} (size {n['size']})")
        elif ko == "array":
            self.types(o["items"], n["items"], path + "[]")
        elif ko == "map":
            self.types(o["values"], n["values"], path + "{}")
        else:
            lo = o.get("logicalType") if isinstance(o, dict) else None
            ln = n.get("logicalType") if isinstance(n, dict) else None
            if lo != ln:
                self.add(f"{_field_label(path)} retyped from {_describe(o, self.old_named)} to "
                         f"{_describe(n, self.new_named)}: a logical type changes what the value means")

    def union(self, o: list, n: list, path: str) -> None:
        ob = {_branch_key(b, self.old_named): b for b in o}
        nb = {_branch_key(b, self.new_named): b for b in n}
        added, removed = [k for k in nb if k not in ob], [k for k in ob if k not in nb]
        if added or removed:
            what = "; ".join(p for p in (f"branches added: {', '.join(added)}" if added else "",
                                         f"branches removed: {', '.join(removed)}" if removed else "") if p)
            self.add(f"{_field_label(path)} retyped from {_describe(o, self.old_named)} to "
                     f"{_describe(n, self.new_named)} ({what}): a reader on {self.ol if added else self.nl} "
                     "cannot read a value in a branch it lacks")
        for k in ob.keys() & nb.keys():
            self.types(ob[k], nb[k], path)

    def enum(self, o: dict, n: dict, path: str) -> None:
        if o["name"] != n["name"]:
            self.add(f"{_field_label(path)}: {_renamed('enum', o['name'], n['name'])}")
            return
        added = [s for s in n["symbols"] if s not in o["symbols"]]
        removed = [s for s in o["symbols"] if s not in n["symbols"]]
        if added and "default" not in o:
            self.add(f"{_field_label(path)}: enum {_short(o['name'])} gained symbols {added}, and {self.ol}'s enum "
                     f"has no default for a consumer on {self.ol} to read them as")
        if removed and "default" not in n:
            self.add(f"{_field_label(path)}: enum {_short(n['name'])} lost symbols {removed}, and {self.nl}'s enum "
                     f"has no default for a consumer on {self.nl} to read old events' {removed} as")

    def record(self, o: dict, n: dict, path: str) -> None:
        if o["name"] != n["name"]:
            self.add(f"{_field_label(path)}: {_renamed('record', o['name'], n['name'])}")
            return
        key = (o["name"], n["name"], path)
        if key in self._records_seen:  # a recursive type: its fields were compared at its first use
            return
        self._records_seen.add(key)
        of = {f["name"]: f for f in o["fields"]}
        nf = {f["name"]: f for f in n["fields"]}
        removed = [name for name in of if name not in nf]
        added = [name for name in nf if name not in of]
        renamed: dict[str, str] = {}
        for r in removed:  # a removed field and an added one of the same type (or naming it as an alias)
            for a in added:
                if a in renamed.values():
                    continue
                same = _describe(of[r]["type"], self.old_named) == _describe(nf[a]["type"], self.new_named)
                if r in (nf[a].get("aliases") or ()) or same:
                    renamed[r] = a
                    break
        for r, a in renamed.items():
            self.add(f"field '{_join(path, r)}' renamed to '{_join(path, a)}' (removed and added with the same type "
                     f"in one change): readers match fields by name, so a consumer on {self.ol} never sees "
                     f"'{a}' and one on {self.nl} never sees '{r}'; keep '{r}' and add the new field with a default")
        for r in removed:
            if r not in renamed and "default" not in of[r]:
                self.add(f"field '{_join(path, r)}' removed, and it has no default in {self.ol}: a consumer on "
                         f"{self.ol} cannot read events written with {self.nl}")
        for a in added:
            if a in renamed.values():
                continue
            if "default" not in nf[a]:
                self.add(f"field '{_join(path, a)}' added without a default: a consumer on {self.nl} cannot read "
                         f"events written with {self.ol}; give it a default (an optional field: "
                         "[\"null\", T] with default null)")
            else:
                self.default(nf[a], _join(path, a))
        for name in of.keys() & nf.keys():
            self.types(of[name]["type"], nf[name]["type"], _join(path, name))

    def default(self, field: dict, path: str) -> None:
        t = _deref(field["type"], self.new_named)
        if _kind(t) != "union":
            return  # fastavro's parse already checked the default against the type
        first = _deref(t[0], self.new_named)
        ok = field["default"] is None if first == "null" else validate(
            field["default"], _inline(first, self.new_named), raise_errors=False)
        if not ok:
            self.add(f"field '{path}' added with default {field['default']!r}, which is not a value of its union's "
                     f"first branch ({_describe(first, self.new_named)}): the Avro spec takes a union field's "
                     "default from the first branch (put null first for an optional field)")


def _inline(s: Any, named: dict[str, dict], defined: set[str] | None = None) -> Any:
    """A parsed sub-schema made standalone (each named type it uses defined inline once), for ``validate``."""
    defined = set() if defined is None else defined
    if isinstance(s, str) and s in named:
        if s in defined:
            return s
        s = named[s]
    if isinstance(s, list):
        return [_inline(b, named, defined) for b in s]
    if not isinstance(s, dict):
        return s
    t = s.get("type")
    if t in _NAMED:
        if s["name"] in defined:
            return s["name"]
        defined.add(s["name"])
        if "fields" in s:
            return {**s, "fields": [{**f, "type": _inline(f["type"], named, defined)} for f in s["fields"]]}
        return s
    if t == "array":
        return {**s, "items": _inline(s["items"], named, defined)}
    if t == "map":
        return {**s, "values": _inline(s["values"], named, defined)}
    if isinstance(t, (dict, list)) or (isinstance(t, str) and t in named):
        return _inline(t, named, defined)
    return s


def structural_problems(old: dict, new: dict, old_label: str = "old", new_label: str = "new") -> list[str]:
    """The rules above, for a change from ``old`` to ``new``: one message per problem, naming the field."""
    return _Rules(old, new, old_label, new_label).run()


# ---- Avro resolution, both ways ---------------------------------------------------------------

def _sample(s: Any, named: dict[str, dict], i: int, depth: int = 0) -> Any:
    s = _deref(s, named)
    k = _kind(s)
    if k == "union":
        if depth > 6 and "null" in s:
            return None
        return _sample(s[i % len(s)], named, i, depth + 1)
    if k == "record":
        return {f["name"]: _sample(f["type"], named, i + j, depth + 1) for j, f in enumerate(s["fields"])}
    if k == "enum":
        return s["symbols"][i % len(s["symbols"])]
    if k == "fixed":
        return bytes((i + j) % 256 for j in range(s["size"]))
    if k == "array":
        return [] if depth > 6 else [_sample(s["items"], named, i + j, depth + 1) for j in range(i % 3)]
    if k == "map":
        return {} if depth > 6 else {f"k{j}": _sample(s["values"], named, i + j, depth + 1) for j in range(i % 3)}
    logical = s.get("logicalType") if isinstance(s, dict) else None
    if logical == "uuid":
        return f"00000000-0000-4000-8000-{i:012d}"
    if logical == "decimal":
        from decimal import Decimal

        return Decimal(i)
    return {"null": None, "boolean": i % 2 == 1, "int": i + 1, "long": 1_700_000_000_000 + i, "float": i + 0.5,
            "double": i + 0.25, "bytes": bytes([i % 256]), "string": f"s{i}"}[k]


def _widest(named: dict[str, dict], parsed: Any) -> int:
    n = 3
    stack = [parsed]
    seen: set[int] = set()
    while stack:
        s = _deref(stack.pop(), named)
        if id(s) in seen:
            continue
        seen.add(id(s))
        k = _kind(s)
        if k == "union":
            n = max(n, len(s))
            stack.extend(s)
        elif k == "record":
            stack.extend(f["type"] for f in s["fields"])
        elif k == "enum":
            n = max(n, len(s["symbols"]))
        elif k == "array":
            stack.append(s["items"])
        elif k == "map":
            stack.append(s["values"])
    return min(n, 32)


def sample_records(schema: dict) -> list[dict]:
    """Records of ``schema`` that between them take every union branch and enum symbol, and arrays and
    maps with 0, 1 and 2 entries (each record differs: strings and numbers carry its index)."""
    parsed = _parse(schema)
    named = _named_types(parsed)
    return [_sample(parsed, named, i) for i in range(_widest(named, parsed))]


def _same_type(a: dict, b: dict) -> bool:
    strip = {"doc", "default", "aliases", "order"}

    def norm(s: Any) -> Any:
        if isinstance(s, dict):
            return {k: norm(v) for k, v in s.items() if k not in strip}
        if isinstance(s, list):
            return [norm(v) for v in s]
        return s

    return json.dumps(norm(a), sort_keys=True) == json.dumps(norm(b), sort_keys=True)


def _read_back(written: dict, writer: Any, reader: Any) -> dict:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, writer, written)
    buf.seek(0)
    return fastavro.schemaless_reader(buf, writer, reader)


def resolution_problems(old: dict, new: dict, old_label: str = "old", new_label: str = "new") -> list[str]:
    """Write ``sample_records`` with one schema, read them with the other, both ways; what goes wrong."""
    problems = []
    for writer, reader, wl, rl, way in ((old, new, old_label, new_label, "backward"),
                                        (new, old, new_label, old_label, "forward")):
        wp, rp = _parse(writer), _parse(reader)
        wf = {f["name"]: f for f in wp["fields"]}
        for i, record in enumerate(sample_records(writer)):
            try:
                got = _read_back(record, wp, rp)
            except Exception as e:  # noqa: BLE001 - every resolution failure is the finding
                problems.append(f"{old_label} -> {new_label}: {way}: sample record {i} written with {wl} does not "
                                f"read with {rl}: {type(e).__name__}: {e}")
                break
            bad = []
            for f in rp["fields"]:
                if f["name"] in wf:
                    if _same_type(wf[f["name"]]["type"], f["type"]) and to_wire(got[f["name"]]) != to_wire(
                            record[f["name"]]):
                        bad.append(f"'{f['name']}' changed from {record[f['name']]!r} to {got[f['name']]!r}")
                elif "default" in f and to_wire(got[f["name"]]) != f["default"]:
                    bad.append(f"'{f['name']}' is {got[f['name']]!r}, not its default {f['default']!r}")
            if bad:
                problems.append(f"{old_label} -> {new_label}: {way}: sample record {i} written with {wl} and read "
                                f"with {rl}: {'; '.join(bad)}")
                break
    return problems


# ---- the checks -------------------------------------------------------------------------------

def check_full(old: dict, new: dict, old_label: str = "old", new_label: str = "new") -> list[str]:
    """Every reason ``new`` is not FULL-compatible with ``old`` ([] when it is)."""
    try:
        _parse(old)
    except Exception as e:  # noqa: BLE001
        return [f"{old_label}: not a valid Avro schema: {e}"]
    try:
        _parse(new)
    except Exception as e:  # noqa: BLE001
        return [f"{new_label}: not a valid Avro schema: {e}"]
    return structural_problems(old, new, old_label, new_label) + resolution_problems(old, new, old_label, new_label)


def check_history(current: dict | None = None, versions: list[tuple[str, dict]] | None = None,
                  current_label: str = "current") -> list[str]:
    """``current`` (default: the shipped schema) against every released version (default: ``history/``)."""
    current = event_schema() if current is None else current
    versions = history() if versions is None else versions
    if not versions:
        return [f"no released versions found in schemas/{HISTORY_DIR}/"]
    return [p for label, old in versions for p in check_full(old, current, label, current_label)]


def registry_check(url: str, subject: str, schema: dict, user_info: str | None = None,
                   timeout: float = 10) -> tuple[bool, list[str]]:
    """A Confluent-compatible registry's own verdict: is ``schema`` compatible with the latest version
    under ``subject``, by the subject's compatibility mode? (True, []) or (False, its messages)."""
    path = f"/compatibility/subjects/{urllib.parse.quote(subject, safe='')}/versions/latest?verbose=true"
    body = json.dumps({"schema": json.dumps(schema), "schemaType": "AVRO"}).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=body, method="POST",
                                     headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    if user_info:
        request.add_header("Authorization", "Basic " + base64.b64encode(user_info.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            answer = json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"registry {url}: POST {path}: HTTP {e.code}: {e.read()[:500]!r}") from None
    return bool(answer.get("is_compatible")), [str(m) for m in answer.get("messages") or ()]


def _iter_lines(problems: list[str]) -> Iterator[str]:
    for p in problems:
        yield f"  - {p}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m schemas.compat",
                                description="Check the event schema is FULL-compatible with every released version.")
    p.add_argument("--schema", help="the candidate schema (default: the shipped schemas/mm_embedding_event.avsc)")
    p.add_argument("--history", help="the released versions' folder (default: schemas/history/)")
    p.add_argument("--registry-url", help="also ask this Confluent-compatible registry (its subject's mode)")
    p.add_argument("--subject", help="the registry subject (<topic>-value)")
    p.add_argument("--registry-user-info", help="user:password for the registry's basic auth")
    args = p.parse_args(argv)
    current = json.loads(Path(args.schema).read_text()) if args.schema else event_schema()
    versions = history(args.history)
    problems = check_history(current, versions)
    names = ", ".join(label for label, _ in versions) or "none"
    if problems:
        print(f"NOT FULL-compatible with the released versions ({names}):", *_iter_lines(problems), sep="\n")
    else:
        print(f"FULL-compatible with every released version ({names}): structural rules and fastavro resolution "
              "both ways")
    if args.registry_url:
        if not args.subject:
            p.error("--registry-url needs --subject")
        ok, messages = registry_check(args.registry_url, args.subject, current, args.registry_user_info)
        print(f"registry {args.registry_url} subject {args.subject}: "
              f"{'compatible' if ok else 'NOT compatible'}", *_iter_lines(messages), sep="\n")
        problems += [] if ok else [f"registry: {m}" for m in messages or ["not compatible"]]
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
