"""S3 and S3-compatible stores (MinIO, Ceph, R2, ...)."""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor

from publisher.stores.base import ObjectInfo, ObjectNotFound, ObjectStore
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
        return self._lite.put_if_absent(self.bucket, key, data, sha_hex, sha_b64, metadata, self.CONTENT_TYPE)

    def put_many(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[bool]:
        return list(self._pool.map(lambda item: self.put_if_absent(*item), items))

    def head_many(self, keys: list[str]) -> list[ObjectInfo | None]:
        return list(self._pool.map(self.head, keys))

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def head(self, key: str) -> ObjectInfo | None:
        r = self._lite.head(self.bucket, key)
        return None if r is None else ObjectInfo(key, r[0], r[1])

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self._client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(self.uri(key)) from None
            raise
