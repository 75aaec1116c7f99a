"""CPU per S3 call: boto3 (the raw client) vs the publisher's S3LeanClient, against a real MinIO.

    .venv/bin/python benchmarks/s3_client.py [--objects 500] [--size 8528] [--json PATH]

Both clients write the same objects (If-None-Match: *, x-amz-checksum-sha256, user
metadata), HEAD them and GET them back, single-threaded; CPU is this process's user+system time, so
the server's share is not counted. Prints microseconds per call and the ratio.
"""

import argparse
import base64
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))


def measure(fn, n):
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.process_time() - c0) / n * 1e6, (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=500)
    ap.add_argument("--size", type=int, default=8528, help="bytes per object (8528: one tiny-LLaVA item)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list (\"kind\": \"s3_call\")")
    args = ap.parse_args()
    from publisher.stores.s3_lean import S3LeanClient

    import services

    minio = services.MinioServer().start()
    os.environ.update(minio.env)
    bucket = minio.create_bucket(f"bench-{uuid.uuid4().hex[:8]}")
    boto = minio.client()
    lite = S3LeanClient(minio.endpoint, "us-east-1")
    data = os.urandom(args.size)
    sha = hashlib.sha256(data).hexdigest()
    b64 = base64.b64encode(bytes.fromhex(sha)).decode()
    meta = {"sha256": sha, "dtype": "float32", "shape": "[16, 128]"}
    n = args.objects
    rows = {
        "PUT boto3": measure(lambda i: boto.put_object(Bucket=bucket, Key=f"b/{i}", Body=data, Metadata=meta,
                                                       IfNoneMatch="*", ChecksumSHA256=b64), n),
        "PUT S3LeanClient": measure(lambda i: lite.put_if_absent(bucket, f"l/{i}", data, sha, b64, meta,
                                                            "application/octet-stream"), n),
        "HEAD boto3": measure(lambda i: boto.head_object(Bucket=bucket, Key=f"b/{i}"), n),
        "HEAD S3LeanClient": measure(lambda i: lite.head(bucket, f"l/{i}"), n),
        "GET boto3": measure(lambda i: boto.get_object(Bucket=bucket, Key=f"b/{i}")["Body"].read(), n),
        "GET S3LeanClient": measure(lambda i: lite.get(bucket, f"l/{i}"), n),
    }
    minio.stop()
    print(f"{minio.name}, {n} objects of {args.size} bytes, one thread")
    print(f"{'call':20s} {'CPU us/call':>12s} {'wall us/call':>13s}")
    for k, (cpu, wall) in rows.items():
        print(f"{k:20s} {cpu:12.0f} {wall:13.0f}")
    out = []
    for op in ("PUT", "HEAD", "GET"):
        ratio = rows[f"{op} S3LeanClient"][0] / rows[f"{op} boto3"][0]
        print(f"{op}: S3LeanClient uses {ratio:.2f}x the CPU of boto3")
        out.append({"kind": "s3_call", "call": op, "object_bytes": args.size, "calls": n,
                    "boto3_cpu_us": rows[f"{op} boto3"][0], "lean_cpu_us": rows[f"{op} S3LeanClient"][0],
                    "ratio": ratio})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
