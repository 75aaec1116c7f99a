"""``S3LeanClient``: the three S3 calls on the per-item paths, PutObject, HeadObject and GetObject.

boto3 spends one to three milliseconds of CPU per call building, signing and parsing
requests (``benchmarks/s3_client.py`` prints the figures); on the publisher's per-item path
and the consumer's per-event path that is the largest cost after the S3 server itself. This
client signs with AWS Signature V4 over ``http.client`` keep-alive connections, reuses the
SHA-256 the object already carries as the payload hash (the body is never hashed twice), and
reads a GET's body straight into one buffer of its announced length, refusing one over the
caller's cap before reading it. Credentials still come from the standard AWS chain
(botocore's resolver: env, profiles, IRSA web identity, instance metadata), refreshed as
botocore refreshes them. Everything else (bucket creation, listing) stays on boto3.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import html
import http.client
import threading
from urllib.parse import quote, urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class S3Error(RuntimeError):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"S3 {status} {code}: {message}")
        self.status, self.code = status, code


class ObjectOverCap(Exception):
    """A GET whose body is longer than the caller's cap; nothing past the cap was read."""

    def __init__(self, size: int | None):
        super().__init__(f"{size} bytes" if size is not None else "over the cap")
        self.size = size


class S3LeanClient:
    """SigV4-signed PUT (put-if-absent, checksummed), HEAD and GET over per-thread keep-alive connections."""

    def __init__(self, endpoint_url: str | None, region: str | None, timeout: float = 30.0,
                 head_timeout: float = 5.0):
        """``timeout``: seconds per socket operation; ``head_timeout`` for HEADs, which carry no body (the
        scheduler sidecar checks objects with them on its only thread)."""
        import botocore.session

        session = botocore.session.get_session()
        self.region = region or session.get_config_variable("region") or "us-east-1"
        self._credentials = session.get_credentials()
        if self._credentials is None:
            raise RuntimeError("no AWS credentials found in the standard chain (env, profile, IRSA, instance role)")
        u = urlsplit(endpoint_url or f"https://s3.{self.region}.amazonaws.com")
        self.secure = u.scheme == "https"
        self.host = u.netloc
        self.timeout, self.head_timeout = timeout, head_timeout
        self._local = threading.local()
        self._key_cache: tuple[str, str, bytes] | None = None  # (date, secret, signing key)

    # ---- HTTP ---------------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            cls = http.client.HTTPSConnection if self.secure else http.client.HTTPConnection
            c = self._local.conn = cls(self.host, timeout=self.timeout)
        return c

    def _request(self, method: str, bucket: str, key: str, headers: dict[str, str], body: bytes,
                 payload_sha256: str, max_body: int | None = None,
                 timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request; ``timeout`` (seconds per socket operation) instead of the client's own."""
        path = "/" + quote(bucket, safe="") + "/" + quote(key, safe="/~")
        headers = self._sign(method, path, headers, payload_sha256)
        for attempt in (0, 1):  # a keep-alive connection the server closed: reconnect once
            conn = self._conn()
            conn.timeout = timeout or self.timeout
            reused = conn.sock is not None
            if reused:
                conn.sock.settimeout(conn.timeout)
            try:
                conn.request(method, path, body=body or None, headers=headers)
                r = conn.getresponse()
                got = {k.lower(): v for k, v in r.getheaders()}
                return r.status, got, self._read_body(r, max_body if r.status == 200 else None)
            except ObjectOverCap:
                self._drop(conn)  # the unread rest of the body would poison the keep-alive connection
                raise
            except TimeoutError:
                self._drop(conn)
                if attempt or not reused:  # a server that does not answer: asking again would double the wait
                    raise  # (a kept-alive connection a middlebox dropped silently gets one fresh try)
            except (http.client.HTTPException, ConnectionError, OSError):
                self._drop(conn)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        self._local.conn = None

    @staticmethod
    def _read_body(r: http.client.HTTPResponse, cap: int | None) -> bytes:
        """The whole body, read into one buffer of its announced length (no chunk joins: one copy from
        the socket); ``ObjectOverCap`` before reading a body longer than ``cap``."""
        if r.length is None or r.length == 0:  # chunked, or empty: read() also ends the response, so the
            # connection can carry the next request (an unfinished one makes http.client refuse it)
            data = r.read() if cap is None else r.read(cap + 1)
            if cap is not None and len(data) > cap:
                raise ObjectOverCap(None)
            return data
        if cap is not None and r.length > cap:
            raise ObjectOverCap(r.length)
        buf = bytearray(r.length)
        view, at = memoryview(buf), 0
        while at < len(buf):
            n = r.readinto(view[at:])
            if not n:
                raise http.client.IncompleteRead(bytes(buf[:at]), len(buf) - at)
            at += n
        return buf

    def _sign(self, method: str, path: str, headers: dict[str, str], payload_sha256: str) -> dict[str, str]:
        creds = self._credentials.get_frozen_credentials()
        now = dt.datetime.now(dt.timezone.utc)
        amz_date, date = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        h = {k.lower(): str(v).strip() for k, v in headers.items()}
        h["host"] = self.host
        h["x-amz-date"] = amz_date
        h["x-amz-content-sha256"] = payload_sha256
        if creds.token:
            h["x-amz-security-token"] = creds.token
        names = sorted(h)
        canonical = "\n".join([method, path, "", *(f"{n}:{h[n]}" for n in names), "", ";".join(names),
                               payload_sha256])
        scope = f"{date}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(date, creds.secret_key), to_sign.encode(), hashlib.sha256).hexdigest()
        h["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                              f"SignedHeaders={';'.join(names)}, Signature={signature}")
        return h

    def _signing_key(self, date: str, secret: str) -> bytes:
        cached = self._key_cache
        if cached and cached[0] == date and cached[1] == secret:
            return cached[2]
        k = hmac.new(("AWS4" + secret).encode(), date.encode(), hashlib.sha256).digest()
        for part in (self.region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        self._key_cache = (date, secret, k)
        return k

    # ---- the three calls ----------------------------------------------------------------
    def put_if_absent(self, bucket: str, key: str, data: bytes, sha256_hex: str, sha256_b64: str,
                      metadata: dict[str, str], content_type: str) -> bool:
        headers = {"if-none-match": "*", "x-amz-checksum-sha256": sha256_b64, "content-type": content_type,
                   "content-length": str(len(data)), **{f"x-amz-meta-{k}": v for k, v in metadata.items()}}
        status, _, body = self._request("PUT", bucket, key, headers, data, sha256_hex)
        if status == 200:
            return True
        if status in (409, 412):  # exists, or a concurrent writer of the same (content-addressed) bytes
            return False
        raise S3Error(status, _xml_field(body, "Code"), _xml_field(body, "Message"))

    def head(self, bucket: str, key: str) -> tuple[int, dict[str, str]] | None:
        status, headers, _ = self._request("HEAD", bucket, key, {}, b"", EMPTY_SHA256, timeout=self.head_timeout)
        if status == 404:
            return None
        if status != 200:
            raise S3Error(status, "HeadObject", f"status {status}")
        meta = {k[len("x-amz-meta-"):]: v for k, v in headers.items() if k.startswith("x-amz-meta-")}
        return int(headers.get("content-length", 0)), meta

    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes (a ``bytearray``), ``None`` if there is no such key, ``ObjectOverCap`` if it is
        longer than ``max_bytes`` (refused from its Content-Length, before the body is read)."""
        status, _, body = self._request("GET", bucket, key, {}, b"", EMPTY_SHA256, max_body=max_bytes)
        if status == 200:
            return body
        code = _xml_field(body, "Code") if body else str(status)
        if status == 404 and code in ("NoSuchKey", "404"):
            return None
        raise S3Error(status, code, _xml_field(body, "Message") if body else f"status {status}")


def _xml_field(body: bytes, name: str) -> str:
    text = body.decode(errors="replace")
    start = text.find(f"<{name}>")
    end = text.find(f"</{name}>")
    return html.unescape(text[start + len(name) + 2:end]) if start >= 0 and end > start else text[:200]
