"""S3 and S3-compatible stores (MinIO, Ceph, R2, ...)."""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor

from publisher.stores.base import ObjectInfo, ObjectNotFound, ObjectStore, ObjectTooLarge, PermanentStoreError
from schemas.objects import CONTENT_TYPE
from schemas.uris import object_uri


class S3Store(ObjectStore):
    """S3 and S3-compatible stores (MinIO, Ceph, R2, ...).

    Writes use ``If-None-Match: *`` (put-if-absent) and carry ``x-amz-checksum-sha256``,
    so the server rejects corrupted bodies; the SHA-256 is the one the event names.
    PUT, HEAD and GET, the per-item calls, go through ``S3LeanClient`` (SigV4 over keep-alive
    connections, a fraction of boto3's CPU). Credentials come from the standard AWS chain and
    are never logged.
    """

    CONTENT_TYPE = CONTENT_TYPE

    def __init__(self, bucket: str, endpoint_url: str | None = None, region: str | None = None,
                 max_connections: int = 10):
        from publisher.stores.s3_lean import S3LeanClient

        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self._lite = S3LeanClient(endpoint_url, region)
        # S3 calls are round trips: batches go out in parallel.
        self._pool = ThreadPoolExecutor(max_connections, thread_name_prefix="mm-events-s3")

    def uri(self, key: str) -> str:
        return object_uri("s3", self.bucket, key)

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str]) -> bool:
        sha_hex = metadata.get("sha256") or hashlib.sha256(data).hexdigest()
        sha_b64 = base64.b64encode(bytes.fromhex(sha_hex)).decode()
        from publisher.stores.s3_lean import S3Error

        try:
            return self._lite.put_if_absent(self.bucket, key, data, sha_hex, sha_b64, metadata, self.CONTENT_TYPE)
        except S3Error as e:
            if e.code in self.PERMANENT_CODES or e.status == 403:
                raise PermanentStoreError(f"{self.uri(key)}: {e}") from None
            raise  # 5xx, throttling: the uploader retries until its deadline

    def put_many(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[bool]:
        # A key twice in one batch is put once, its first item (as the local store does): put in parallel,
        # the two would race for the conditional PUT, and either could win.
        first: dict[str, int] = {}
        for i, (key, _, _) in enumerate(items):
            first.setdefault(key, i)
        stored = dict(zip(first, self._pool.map(lambda i: self.put_if_absent(*items[i]), first.values())))
        return [stored[key] if first[key] == i else False for i, (key, _, _) in enumerate(items)]

    def head_many(self, keys: list[str]) -> list[ObjectInfo | None]:
        return list(self._pool.map(self.head, keys))

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def head(self, key: str) -> ObjectInfo | None:
        r = self._lite.head(self.bucket, key)
        return None if r is None else ObjectInfo(key, r[0], r[1])

    # Codes that retrying does not fix without an operator (they are retried a bounded number of times).
    PERMANENT_CODES = ("AccessDenied", "NoSuchBucket", "InvalidBucketName", "AllAccessDisabled", "InvalidObjectState",
                       "403", "InvalidAccessKeyId", "SignatureDoesNotMatch")

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        from publisher.stores.s3_lean import ObjectOverCap, S3Error

        try:
            data = self._lite.get(self.bucket, key, max_bytes)
        except ObjectOverCap as e:
            size = f"{e.size} bytes, " if e.size is not None else ""
            raise ObjectTooLarge(f"{self.uri(key)}: {size}over the {max_bytes}-byte cap") from None
        except S3Error as e:
            if e.code in self.PERMANENT_CODES or e.status == 403:
                raise PermanentStoreError(f"{self.uri(key)}: {e}") from None
            raise  # 5xx, throttling: the caller retries
        if data is None:
            raise ObjectNotFound(self.uri(key))
        return data
