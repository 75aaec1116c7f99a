"""PostgreSQL with pgvector: ``pgvector://user@host:port/database/table``.

The password comes from libpq's usual places (``PGPASSWORD``, ``~/.pgpass``), never the
URI. One row per point, keyed by a uuid; an upsert is one transaction of
``INSERT ... ON CONFLICT (id) DO UPDATE``, durable once committed. An HNSW index is
created with the table (pgvector indexes at most 2,000 dimensions; wider tables are
searched exactly).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from consumers.errors import Transient
from consumers.sinks.base import PAYLOAD_FIELDS, Hit, VectorSink
from consumers.vectors import Point

_OPS = {"cosine": ("<=>", "vector_cosine_ops"), "dot": ("<#>", "vector_ip_ops"), "l2": ("<->", "vector_l2_ops")}
HNSW_MAX_DIM = 2000
_COLUMNS = ("id", "embedding", *PAYLOAD_FIELDS)


def _pg_text(s: str) -> str:
    """PostgreSQL text and jsonb cannot hold NUL: it is stored as the six characters ``\\u0000``."""
    return s.replace("\0", "\\u0000") if "\0" in s else s


def _shut_down(conn, timed_out: threading.Event) -> None:
    """The watchdog: end the wait of a query on ``conn`` (shutdown wakes the waiting thread; unlike close,
    it leaves the descriptor to its owner)."""
    timed_out.set()
    try:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except Exception:  # noqa: BLE001 - the connection was closed meanwhile
        return
    with sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _vector_literal(v: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


class PgvectorSink(VectorSink):
    scheme = "pgvector"

    def __init__(self, uri: str, distance: str = "cosine"):
        super().__init__(uri, distance)
        u = urlsplit(uri)
        self.database, self.table = [p for p in unquote(u.path).split("/") if p]
        self._conninfo = {"host": u.hostname, "port": u.port or 5432, "dbname": self.database,
                          "user": unquote(u.username) if u.username else None, "connect_timeout": 10,
                          "application_name": "vllm-mm-events"}
        self._conn = None

    def _connect(self):
        import psycopg

        if self._conn is None or self._conn.closed:
            settings = {k: v for k, v in self._conninfo.items() if v is not None}
            statement_timeout_ms = int(max(1.0, self.OP_TIMEOUT_S - 10) * 1000)
            try:
                self._conn = psycopg.connect(**settings, options=f"-c statement_timeout={statement_timeout_ms}")
            except psycopg.OperationalError as e:
                raise Transient("sink", f"{self.name}: cannot connect: {str(e).strip().splitlines()[0]}") from None
        return self._conn

    # SQLSTATE classes a retry can fix: connection (08), resources (53), operator intervention (57),
    # system (58), rollback (40: serialization, deadlock), object in use (55). Everything else, e.g.
    # 22 data exception or 54 program limit (an index row too large), is about the data.
    TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "55", "57", "58")
    # The server refusing this client, not the data: authorization (28), a privilege not granted (42501,
    # e.g. CREATE on the schema: PostgreSQL 15+ no longer grants it to everyone), the table, schema or
    # database gone (42P01, 3F000, 3D000), a read-only standby after a failover (25006). Every event of a
    # batch would be refused alike: retried until the operator fixes it (and counted), never dead-lettered.
    REFUSAL_SQLSTATES = ("28", "42501", "42P01", "3F000", "3D000", "25006")

    # libpq waits on a query's answer without a timeout, and a server that accepts and never answers
    # (stopped, or a network path that drops packets) would hold the writer for good. A running server
    # cancels a statement itself after statement_timeout (so an abandoned one does not keep its locks);
    # for one that does not run, a watchdog shuts the connection's socket down a little later: the
    # wait ends, the operation fails as Transient, and the next one connects again.
    OP_TIMEOUT_S = 120.0

    def _run(self, fn, recreate: bool = False):
        """Run ``fn(conn)`` in one transaction; connection-level failures are Transient, errors about
        the data are raised as they are (the caller isolates the event that caused them). ``recreate``
        (upsert): a table dropped while in use (42P01) is made again, see ``VectorSink.collection_gone``."""
        import psycopg

        conn = self._connect()
        timed_out = threading.Event()
        watchdog = threading.Timer(self.OP_TIMEOUT_S, _shut_down, (conn, timed_out))
        watchdog.daemon = True
        watchdog.start()
        try:
            with conn.transaction():
                result = fn(conn)
        except psycopg.Error as e:
            watchdog.cancel()  # before the close: the watchdog must not shut down a descriptor reused meanwhile
            if timed_out.is_set():
                conn.close()
                raise Transient("sink", f"{self.name}: no answer in {self.OP_TIMEOUT_S:.0f} s") from None
            state = e.sqlstate or ""
            if recreate and state == "42P01":  # the transaction is rolled back: the connection serves on
                self.collection_gone(e)
            refusal = state.startswith(self.REFUSAL_SQLSTATES)
            if not refusal and (not isinstance(e, psycopg.OperationalError) or (
                    state and state[:2] not in self.TRANSIENT_SQLSTATE_CLASSES)):
                raise
            conn.close()
            raise Transient("sink", f"{self.name}: {str(e).strip().splitlines()[0]}") from None
        finally:
            watchdog.cancel()
        if timed_out.is_set():  # it fired as the operation ended: the socket is shut, connect again next time
            conn.close()
        return result

    def _ident(self):
        from psycopg import sql

        return sql.Identifier(self.table)

    def describe(self) -> tuple[int, bool] | None:
        def q(conn):
            row = conn.execute(
                # quote_ident: DDL quotes the name, so "Images" is not the table images (to_regclass folds case)
                "SELECT a.atttypmod FROM pg_attribute a WHERE a.attrelid = to_regclass(quote_ident(%s)) "
                "AND a.attname = 'embedding'", (self.table,)).fetchone()
            return None if row is None else (int(row[0]), False)
        return self._run(q)

    def create(self, dim: int, multivector: bool) -> None:
        from psycopg import sql

        op_class = _OPS[self.distance][1]

        def ddl(conn):
            # "IF NOT EXISTS" is not safe against a concurrent creator (both pass the check, one fails on
            # a catalog unique index): consumers starting together take turns on one advisory lock,
            # held until this transaction ends.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('vllm-mm-events:ddl'))")
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {t} (id uuid PRIMARY KEY, embedding vector({d}) NOT NULL, "
                "request_id text NOT NULL, event_id text NOT NULL, item_index integer NOT NULL, "
                "mm_hash text NOT NULL, modality text NOT NULL, model text NOT NULL, uri text NOT NULL, "
                "event_time timestamptz NOT NULL, pooling text NOT NULL, metadata jsonb NOT NULL)"
            ).format(t=self._ident(), d=sql.Literal(dim)))
            conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (request_id)").format(
                i=sql.Identifier(f"{self.table}_request_id"), t=self._ident()))
            if dim <= HNSW_MAX_DIM:
                conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} USING hnsw (embedding {ops})").format(
                    i=sql.Identifier(f"{self.table}_embedding_hnsw"), t=self._ident(), ops=sql.SQL(op_class)))
        self._run(ddl)

    def upsert(self, points: list[Point]) -> None:
        from psycopg import sql

        cols = sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
        values = sql.SQL("%s, %s::vector, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s / 1000.0), %s, %s::jsonb")
        updates = sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in _COLUMNS[1:])
        stmt = sql.SQL("INSERT INTO {t} ({cols}) VALUES ({v}) ON CONFLICT (id) DO UPDATE SET {u}").format(
            t=self._ident(), cols=cols, v=values, u=updates)
        t = _pg_text
        rows = [(p.id, _vector_literal(p.vector), t(p.payload["request_id"]), t(p.payload["event_id"]),
                 p.payload["item_index"], t(p.payload["mm_hash"]), t(p.payload["modality"]), t(p.payload["model"]),
                 t(p.payload["uri"]), p.payload["event_time"], t(p.payload["pooling"]),
                 json.dumps({t(k): t(v) for k, v in p.payload["metadata"].items()}))
                for p in points]

        def write(conn):
            with conn.cursor() as cur:
                cur.executemany(stmt, rows)
        self._run(write, recreate=True)

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        from psycopg import sql

        op = _OPS[self.distance][0]
        stmt = sql.SQL("SELECT id::text, embedding {op} %s::vector AS d, request_id, event_id, item_index, mm_hash, "
                       "modality, model, uri, (extract(epoch FROM event_time) * 1000)::bigint, pooling, metadata "
                       "FROM {t} ORDER BY d LIMIT %s").format(op=sql.SQL(op), t=self._ident())
        rows = self._run(lambda conn: conn.execute(stmt, (_vector_literal(vector), k)).fetchall())
        hits = []
        for r in rows:
            score = 1.0 - r[1] if self.distance == "cosine" else -r[1]  # <#> is the negative inner product
            hits.append(Hit(r[0], float(score), self._payload(r[2:])))
        return hits

    @staticmethod
    def _payload(r) -> dict[str, Any]:
        return dict(zip(PAYLOAD_FIELDS, r))  # the SELECTs list the columns in this order

    def count(self) -> int:
        from psycopg import sql

        return self._run(lambda conn: conn.execute(sql.SQL("SELECT count(*) FROM {t}").format(t=self._ident()))
                         .fetchone()[0])

    def retrieve(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        from psycopg import sql

        stmt = sql.SQL("SELECT id::text, request_id, event_id, item_index, mm_hash, modality, model, uri, "
                       "(extract(epoch FROM event_time) * 1000)::bigint, pooling, metadata FROM {t} "
                       "WHERE id = ANY(%s::uuid[])").format(t=self._ident())
        rows = self._run(lambda conn: conn.execute(stmt, (list(ids),)).fetchall())
        return {r[0]: self._payload(r[1:]) for r in rows}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
