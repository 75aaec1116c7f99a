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
    PUT and HEAD, the per-item calls, go through ``S3PutHeadClient`` (SigV4 over keep-alive
    connections, a fraction of boto3's CPU); GET uses boto3. Credentials come from the
    standard AWS chain and are never logged.
    """

    CONTENT_TYPE = CONTENT_TYPE

    def __init__(self, bucket: str, endpoint_url: str | None = None, region: str | None = None,
                 max_connections: int = 10):
        from publisher.stores.s3_put_head import S3PutHeadClient

        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self._max_connections = max_connections
        self._lite = S3PutHeadClient(endpoint_url, region)
        self._boto = None
        # S3 calls are round trips: batches go out in parallel.
        self._pool = ThreadPoolExecutor(max_connections, thread_name_prefix="mm-events-s3")

    def _client(self):
        if self._boto is None:
            import boto3
            from botocore.config import Config

            cfg = Config(max_pool_connections=self._max_connections, retries={"max_attempts": 5, "mode": "standard"},
                         s3={"addressing_style": "path" if self.endpoint_url else "auto"})
            # A client per store; botocore clients are thread-safe, sessions are not.
            self._boto = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url,
                                                        region_name=self.region, config=cfg)
        return self._boto

    def uri(self, key: str) -> str:
        return object_uri("s3", self.bucket, key)

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str]) -> bool:
        sha_hex = metadata.get("sha256") or hashlib.sha256(data).hexdigest()
        sha_b64 = base64.b64encode(bytes.fromhex(sha_hex)).decode()
        from publisher.stores.s3_put_head import S3Error

        try:
            return self._lite.put_if_absent(self.bucket, key, data, sha_hex, sha_b64, metadata, self.CONTENT_TYPE)
        except S3Error as e:
            if e.code in self.PERMANENT_CODES or e.status == 403:
                raise PermanentStoreError(f"{self.uri(key)}: {e}") from None
            raise  # 5xx, throttling: the uploader retries until its deadline

    def put_many(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[bool]:
        return list(self._pool.map(lambda item: self.put_if_absent(*item), items))

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
        from botocore.exceptions import ClientError, NoCredentialsError

        try:
            r = self._client().get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                raise ObjectNotFound(self.uri(key)) from None
            if code in self.PERMANENT_CODES:
                raise PermanentStoreError(f"{self.uri(key)}: {code}") from None
            raise
        except NoCredentialsError:
            raise PermanentStoreError(f"{self.uri(key)}: no AWS credentials in the standard chain") from None
        body = r["Body"]
        try:
            if max_bytes is not None and int(r.get("ContentLength") or 0) > max_bytes:
                raise ObjectTooLarge(f"{self.uri(key)}: {r['ContentLength']} bytes, over the {max_bytes}-byte cap")
            data = body.read() if max_bytes is None else body.read(max_bytes + 1)
        finally:
            body.close()
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(f"{self.uri(key)}: over the {max_bytes}-byte cap")
        return data
