"""Bytes per second of the worker sidecar at production object sizes, against the raw clients, in one run.

    .venv/bin/python benchmarks/publisher_bytes.py              # 2-3 minutes; MinIO starts itself
    .venv/bin/python benchmarks/publisher_bytes.py --quick      # tiny objects, ~10 s (the CI smoke test)

Objects as vision encoders produce them: 576 x 4096 (LLaVA-1.5-7B, one image) and 1296 x 3584
(Qwen2-VL-7B, a high-resolution image), in bfloat16 and float32. Every figure is measured in this
run, on the same bytes, against the same MinIO (native, tests/support/services.py) and the same
directory:

  sidecar->S3      the real worker sidecar process (``publisher.sidecar.process``, as vLLM starts it), fed as
                   the engine feeds it: a memfd ring (``SharedRing``) it maps, one memcpy per item
                   into the ring (``DeviceToHostCapture`` on CPU), an ``ItemCaptured`` message, the
                   region reused when the sidecar says ``RegionsFreed``. It serializes (safetensors),
                   hashes (SHA-256) and PUTs (``S3LeanClient``, If-None-Match, checksum header).
  boto3            ``put_object`` from a thread pool of the same size, the same bytes and headers
                   (the SHA-256 for ``ChecksumSHA256`` computed per object, as any checksummed upload must).
  lean             ``S3LeanClient.put_if_absent`` alone, same pool, same hashing.
  sidecar->local   the same sidecar storing into a local directory (``LocalDirStore``, fsync=true:
                   group commit with one syncfs per batch).
  files            plain ``open/write/fsync/close`` of the same bytes, one file each, same pool.
  sha256           ``hashlib.sha256`` over the same bytes on one core: the floor of any checksummed upload.

Each (object, thread count) runs every configuration in 3 rounds of 160 MB, the order rotated
per round; figures are medians. Upload threads scale for 576x4096 bf16 and 1296x3584 float32
(``--scale-all``: every object); the others run at 2, the publisher's default. MB/s counts
object bytes stored (header + tensor) over wall time, from the first item handed over to the
last one stored. ``CPU s/GB`` is the CPU time of the process doing the upload
(the sidecar; or this process for the raw clients) per GB stored: what sizing a host needs,
since the servers share this machine's cores. Prints the tables; no assertions.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

MODEL = "bench/vision-encoder"
FULL_KINDS = [(576, 4096, "bfloat16"), (576, 4096, "float32"), (1296, 3584, "bfloat16"), (1296, 3584, "float32")]
SCALE_KINDS = [(576, 4096, "bfloat16"), (1296, 3584, "float32")]
QUICK_KINDS = [(16, 128, "bfloat16"), (32, 256, "float32")]


@dataclass
class Result:
    seconds: float
    nbytes: int  # object bytes stored in ``seconds``
    items: int
    cpu_s: float
    connections: int = 0  # the sidecar's connections to the S3 server: its PUT concurrency

    @property
    def mb_s(self) -> float:
        return self.nbytes / self.seconds / 1e6

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_s / (self.nbytes / 1e9)


class Kind:
    """One object shape and dtype: a few distinct encoder outputs, and their stored objects."""

    def __init__(self, rows: int, cols: int, dtype: str, distinct: int = 4):
        import torch

        self.rows, self.cols, self.dtype = rows, cols, dtype
        g = torch.Generator().manual_seed(rows * cols)
        self.tensors = [torch.randn(rows, cols, generator=g).to(getattr(torch, dtype)) for _ in range(distinct)]
        self.objects = [self.encode(t, dtype) for t in self.tensors]

    @staticmethod
    def encode(tensor, storage_dtype: str):
        from publisher.sidecar.encode import encode_embedding

        return encode_embedding(tensor, mm_hash=uuid.uuid4().hex, modality="image", model=MODEL,
                                storage_dtype=storage_dtype)

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.cols} {self.dtype}"

    @property
    def object_bytes(self) -> int:
        return len(self.objects[0].data)

    def count(self, target_bytes: int, minimum: int) -> int:
        return max(minimum, target_bytes // self.object_bytes)


# ---- the sidecar, fed as the engine feeds it --------------------------------------------------

RING_BYTES = 256 << 20


class SidecarFeeder:
    """A real worker sidecar and its ring, fed item by item the way the connector's worker half does."""

    def __init__(self, kind: Kind, object_store: str, threads: int, storage_dtype: str | None = None,
                 endpoint: str | None = None):
        import psutil

        from publisher.config import PublisherConfig
        from publisher.sidecar.messages import ItemsCaptured, WorkerInit
        from publisher.sidecar.process import Sidecar
        from publisher.sidecar.ring import SharedRing
        from publisher.vllm.capture import DeviceToHostCapture
        from schemas.uris import StoreLocation

        self.kind = kind
        self.storage_dtype = storage_dtype or kind.dtype
        self.port = int(endpoint.rsplit(":", 1)[1]) if endpoint else None
        config = PublisherConfig.from_dict({"object_store": object_store, "s3_endpoint_url": endpoint,
                                            "storage_dtype": self.storage_dtype, "upload_threads": threads,
                                            "max_inflight_bytes": RING_BYTES, "spool_dir": ""})
        self.prefix = StoreLocation.parse(object_store).prefix
        self.ring = SharedRing(config.max_inflight_bytes)
        self.sidecar = Sidecar(WorkerInit(config.to_dict(), MODEL, self.ring.fd, self.ring.size),
                               pass_fds=(self.ring.fd,))
        self.capture = DeviceToHostCapture(self.ring, lambda items: self.sidecar.send(ItemsCaptured(tuple(items))))
        self.proc = psutil.Process(self.sidecar.pid)
        self.sent = self.freed = 0
        self.object_bytes = len(kind.encode(kind.tensors[0], self.storage_dtype).data)
        self.measure(2, "warmup")  # connections, imports, first directories

    def _apply(self, msg) -> None:
        from publisher.sidecar.messages import RegionsFreed

        if isinstance(msg, RegionsFreed):
            for offset in msg.offsets:
                self.ring.allocator.free(offset)
            self.freed += len(msg.offsets)

    def _feed(self, sub: str) -> None:
        from publisher.sidecar.messages import ItemCaptured
        from schemas.objects import object_key

        t = self.kind.tensors[self.sent % len(self.kind.tensors)]
        conn, allocator = self.sidecar.conn, self.ring.allocator
        while conn.poll():
            self._apply(conn.recv())
        offset = allocator.alloc(t.numel() * t.element_size())
        while offset is None:  # backpressure=block: wait for the sidecar to free a region
            self._apply(conn.recv())
            offset = allocator.alloc(t.numel() * t.element_size())
        mm_hash = uuid.uuid4().hex
        key = object_key(f"{self.prefix}/{sub}".strip("/"), MODEL, mm_hash, self.storage_dtype)
        self.capture.capture(t, offset, ItemCaptured(offset, self.kind.dtype, tuple(t.shape), key, mm_hash,
                                                     "image", "ENCODER"))
        self.sent += 1

    def measure(self, n: int, sub: str) -> Result:
        """Store ``n`` items under ``<prefix>/<sub>/``: from the first handed over to the last region freed."""
        cpu0 = sum(self.proc.cpu_times()[:2])
        t0 = time.perf_counter()
        for _ in range(n):
            self._feed(sub)
        while self.freed < self.sent:
            self._apply(self.sidecar.conn.recv())
        seconds = time.perf_counter() - t0
        cpu = sum(self.proc.cpu_times()[:2]) - cpu0
        conns = sum(1 for c in self.proc.net_connections("tcp") if c.raddr and c.raddr.port == self.port)
        return Result(seconds, n * self.object_bytes, n, cpu, conns if self.port else 0)

    def close(self) -> None:
        report = self.sidecar.close(60)
        stored = report.get("uploaded", 0) + report.get("already_stored", 0)
        if stored != self.sent or report.get("upload_failed"):
            raise RuntimeError(f"the sidecar stored {stored} of {self.sent} objects: {report}")


# ---- the raw clients, from a thread pool ------------------------------------------------------

def pooled(fn, kind: Kind, n: int, threads: int) -> Result:
    datas = [o.data for o in kind.objects]
    c0, t0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: fn(i, datas[i % len(datas)]), range(n)))
    return Result(time.perf_counter() - t0, n * kind.object_bytes, n, time.process_time() - c0)


def checksum(data: bytes) -> tuple[str, str]:
    digest = hashlib.sha256(data).digest()
    return digest.hex(), base64.b64encode(digest).decode()


def run_boto3(kind: Kind, n: int, threads: int, minio, bucket: str) -> Result:
    import boto3
    from botocore.config import Config

    e = minio.env
    client = boto3.session.Session().client(
        "s3", endpoint_url=minio.endpoint, aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name=e["AWS_REGION"],
        config=Config(max_pool_connections=max(10, threads), s3={"addressing_style": "path"}))
    client.head_bucket(Bucket=bucket)  # warm the connection pool's first connection

    def put(i: int, data: bytes) -> None:
        sha_hex, sha_b64 = checksum(data)
        client.put_object(Bucket=bucket, Key=f"boto3/{uuid.uuid4().hex}", Body=data, IfNoneMatch="*",
                          ChecksumSHA256=sha_b64, ContentType="application/vnd.safetensors",
                          Metadata={"sha256": sha_hex, "dtype": kind.dtype, "shape": f"[{kind.rows}, {kind.cols}]"})

    return pooled(put, kind, n, threads)


def run_lean(kind: Kind, n: int, threads: int, minio, bucket: str) -> Result:
    from publisher.stores.s3_lean import S3LeanClient

    client = S3LeanClient(minio.endpoint, "us-east-1")

    def put(i: int, data: bytes) -> None:
        sha_hex, sha_b64 = checksum(data)
        meta = {"sha256": sha_hex, "dtype": kind.dtype, "shape": f"[{kind.rows}, {kind.cols}]"}
        if not client.put_if_absent(bucket, f"lean/{uuid.uuid4().hex}", data, sha_hex, sha_b64, meta,
                                    "application/vnd.safetensors"):
            raise RuntimeError("a fresh key already existed")

    return pooled(put, kind, n, threads)


def run_files(kind: Kind, n: int, threads: int, root: Path) -> Result:
    root.mkdir(parents=True, exist_ok=True)

    def write(i: int, data: bytes) -> None:
        fd = os.open(root / f"{i}.safetensors", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    return pooled(write, kind, n, threads)


def run_sha256(kind: Kind, n: int) -> Result:
    datas = [o.data for o in kind.objects]
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        hashlib.sha256(datas[i % len(datas)]).digest()
    return Result(time.perf_counter() - t0, n * kind.object_bytes, n, time.process_time() - c0)


def run_memcpy(kind: Kind, n: int) -> Result:
    """One user-space copy of the same bytes on one core: what each remaining copy costs."""
    views = [memoryview(o.data) for o in kind.objects]
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        bytes(views[i % len(views)])
    return Result(time.perf_counter() - t0, n * kind.object_bytes, n, time.process_time() - c0)


def empty_bucket(client, bucket: str) -> None:
    token = None
    while True:
        page = client.list_objects_v2(Bucket=bucket, **({"ContinuationToken": token} if token else {}))
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


# ---- copies per byte, ring -> socket ----------------------------------------------------------

def count_copies() -> list[tuple[str, int]]:
    """Follow one object from the ring to the socket and count the user-space copies of its bytes.

    Instrumented, not assumed: the encoded object's bytes are checked against the ring's memory
    (shared or not), and the buffers http.client hands to the socket are checked against the
    object's buffer."""
    import http.client

    import numpy as np
    import torch

    from publisher.sidecar.encode import encode_embedding
    from publisher.sidecar.ring import SharedRing

    ring = SharedRing(1 << 20)
    src = torch.randn(64, 128).to(torch.bfloat16)
    host = ring.view(0, src.dtype, src.shape)
    host.copy_(src)
    rows = []
    for storage in ("bfloat16", "float32"):
        obj = encode_embedding(host, mm_hash="h", modality="image", model=MODEL, storage_dtype=storage)
        tensor_shares_ring = np.shares_memory(np.frombuffer(obj.data, np.uint8), ring.tensor.numpy())
        # http.client with a bytes body: the body goes to sock.sendall as is (no join with the headers)?
        sent = []

        class Sock:
            def sendall(self, data):
                sent.append(data)

        c = http.client.HTTPConnection("localhost")
        c.sock = Sock()
        c.putrequest("PUT", "/b/k")
        c.putheader("content-length", str(len(obj.data)))
        c.endheaders(obj.data)
        body_passed_as_is = any(s is obj.data for s in sent)
        conversion = 1 if storage != "bfloat16" else 0
        join = 0 if tensor_shares_ring else 1
        http_copy = 0 if body_passed_as_is else 1
        rows.append((f"ring {src.dtype} -> stored {storage}", conversion, join, http_copy))
    return rows


# ---- the run ----------------------------------------------------------------------------------

def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny objects, 16 per figure, one round: proves it works")
    ap.add_argument("--threads", help="upload threads (and raw-client pool sizes) to scale over (default 1,2,4; "
                                      "--quick: 2)")
    ap.add_argument("--scale-all", action="store_true",
                    help="scale every object over --threads (default: 576x4096 bf16 and 1296x3584 float32; the "
                         "others at 2 threads, the publisher's default)")
    ap.add_argument("--mb", type=int, default=160, help="MB stored per figure and round")
    ap.add_argument("--rounds", type=int, help="rounds, alternating the order of the configurations (default 3; "
                                               "--quick: 1); figures are medians")
    ap.add_argument("--endpoint", help="an S3 server to use instead of starting MinIO (credentials: AWS_* env)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list (\"kind\": \"bytes\")")
    args = ap.parse_args()
    threads_list = [int(t) for t in (args.threads or ("2" if args.quick else "1,2,4")).split(",")]
    rounds = args.rounds or (1 if args.quick else 3)
    target = 0 if args.quick else args.mb << 20
    kinds = [Kind(*k) for k in (QUICK_KINDS if args.quick else FULL_KINDS)]
    default_threads = 2 if 2 in threads_list else threads_list[0]
    groups = [(k, t) for k in kinds for t in threads_list
              if args.scale_all or args.quick or (k.rows, k.cols, k.dtype) in SCALE_KINDS or t == default_threads]

    import services

    if args.endpoint:
        minio, started = services.RunningS3(args.endpoint), None
    else:
        minio = started = services.MinioServer().start()
    os.environ.update(minio.env)  # the sidecar's S3 credentials come from the standard chain
    work = Path(tempfile.mkdtemp(prefix="mm-bytes-"))
    admin = minio.client()
    bucket = minio.create_bucket(f"bytes-{uuid.uuid4().hex[:8]}")
    print(f"{minio.name} at {minio.endpoint}; local store under {work}; {os.cpu_count()} CPUs; "
          f"{'16 objects' if args.quick else f'{args.mb} MB'} per figure, {rounds} round(s)", flush=True)

    results: dict[tuple[str, int], dict[str, list[Result]]] = {}
    floors: dict[str, dict[str, list[Result]]] = {}
    t_start = time.perf_counter()
    try:
        for kind, threads in groups:
            n = kind.count(target, 16)
            if kind.name not in floors:
                floors[kind.name] = {"sha256": [run_sha256(kind, n) for _ in range(3)],
                                     "memcpy": [run_memcpy(kind, n) for _ in range(3)]}
            feeders = {"sidecar->S3": SidecarFeeder(kind, f"s3://{bucket}/sidecar", threads, endpoint=minio.endpoint),
                       "sidecar->local": SidecarFeeder(kind, (work / "local").as_uri(), threads)}
            if kind.dtype == "bfloat16" and threads == default_threads:  # the old default: widen to float32
                feeders["sidecar->S3 float32"] = SidecarFeeder(kind, f"s3://{bucket}/f32", threads, "float32",
                                                               endpoint=minio.endpoint)
            configs = [*feeders, "boto3", "lean", "files"]
            out = results[(kind.name, threads)] = {name: [] for name in configs}
            try:
                for rnd in range(rounds):
                    names = configs[rnd % len(configs):] + configs[:rnd % len(configs)]  # alternate the order
                    for name in names:
                        if name in feeders:
                            out[name].append(feeders[name].measure(n, f"r{rnd}"))
                        elif name == "boto3":
                            out[name].append(run_boto3(kind, n, threads, minio, bucket))
                        elif name == "lean":
                            out[name].append(run_lean(kind, n, threads, minio, bucket))
                        else:
                            out[name].append(run_files(kind, n, threads, work / "files"))
                        shutil.rmtree(work / "files", ignore_errors=True)
                        shutil.rmtree(work / "local" / f"r{rnd}", ignore_errors=True)
                        empty_bucket(admin, bucket)
            finally:
                for f in feeders.values():
                    f.close()
            print(f"  {kind.name:18s} threads={threads}: " + ", ".join(
                f"{name} {median_mb_s(rs):.0f}" for name, rs in out.items()) + " MB/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if started:
            started.stop()
    rows = report(kinds, groups, results, floors, time.perf_counter() - t_start)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def median_mb_s(rs: list[Result]) -> float:
    return statistics.median(r.mb_s for r in rs)


def median_cpu(rs: list[Result]) -> float:
    return statistics.median(r.cpu_s_per_gb for r in rs)


def report(kinds, groups, results, floors, elapsed) -> list[dict]:
    print(f"\nWorker sidecar, MB/s of stored objects (median of rounds; {os.cpu_count()} CPUs shared with MinIO; "
          f"{elapsed:.0f} s)")
    print("ratios: the sidecar against the raw client at the same thread count, in the same rounds")
    cols = ["object", "threads", "sidecar->S3", "boto3", "lean", "vs boto3", "vs lean", "sidecar->local",
            "files+fsync", "vs files", "sha256 1 core", "S3 conns"]
    table, rows = [], []
    for kind, threads in groups:
        r = results[(kind.name, threads)]
        s3, b, lean, loc, files = (median_mb_s(r[k]) for k in ("sidecar->S3", "boto3", "lean", "sidecar->local",
                                                                "files"))
        rows.append({"kind": "bytes", "object": kind.name, "threads": threads, "sidecar_s3_MB_s": s3,
                     "boto3_MB_s": b, "lean_MB_s": lean, "sidecar_local_MB_s": loc, "files_MB_s": files,
                     "sha256_MB_s": median_mb_s(floors[kind.name]["sha256"]),
                     "sidecar_s3_cpu_s_per_GB": median_cpu(r["sidecar->S3"])})
        table.append([kind.name, threads, f"{s3:.0f}", f"{b:.0f}", f"{lean:.0f}", fmt_ratio(s3, b),
                      fmt_ratio(s3, lean), f"{loc:.0f}", f"{files:.0f}", fmt_ratio(loc, files),
                      f"{median_mb_s(floors[kind.name]['sha256']):.0f}",
                      max(x.connections for x in r["sidecar->S3"])])
    print_table(cols, table)

    print("\nCPU seconds per GB stored, of the uploading process only (the sidecar; this process for raw clients)")
    cols = ["object", "threads", "sidecar->S3", "boto3", "lean", "sidecar->local", "files+fsync", "sha256",
            "memcpy"]
    table = []
    for kind, threads in groups:
        r = results[(kind.name, threads)]
        table.append([kind.name, threads, *(f"{median_cpu(r[k]):.2f}" for k in (
            "sidecar->S3", "boto3", "lean", "sidecar->local", "files")),
            f"{median_cpu(floors[kind.name]['sha256']):.2f}", f"{median_cpu(floors[kind.name]['memcpy']):.2f}"])
    print_table(cols, table)

    widened = [(kind, threads) for kind, threads in groups if "sidecar->S3 float32" in results[(kind.name, threads)]]
    if widened:
        print("\nstorage_dtype for a bfloat16 encoder, sidecar->S3 in the same rounds: native stores what the "
              "encoder produced; float32 (the old default) widens it")
        cols = ["object", "storage_dtype", "stored bytes/item", "stored MB/s", "encoder MB/s", "CPU s/GB of encoder"]
        table = []
        for kind, threads in widened:
            for dtype, key in (("native", "sidecar->S3"), ("float32", "sidecar->S3 float32")):
                rs = results[(kind.name, threads)][key]
                encoder = kind.rows * kind.cols * 2
                per_item = rs[0].nbytes // rs[0].items
                table.append([kind.name, dtype, f"{per_item:,d}", f"{median_mb_s(rs):.0f}",
                              f"{median_mb_s(rs) * encoder / per_item:.0f}",
                              f"{median_cpu(rs) * per_item / encoder:.2f}"])
        print_table(cols, table)

    print("\nUser-space copies of each byte from the ring to the socket (instrumented on the real encode path)")
    print_table(["path", "dtype conversion", "serialize (join)", "http.client"], count_copies())
    print("plus the kernel's copy into the socket buffer (or the page cache, for the local store).")

    per_gb = statistics.median(median_cpu(results[(k.name, t)]["sidecar->S3"]) for k, t in groups)
    print(f"\nSizing: the sidecar spends {per_gb:.2f} CPU s per GB stored to S3 (median over the rows above): "
          f"2 GB/s takes ~{2 * per_gb:.1f} cores of worker sidecars, the store's own CPU elsewhere.")
    return rows


def print_table(cols: list[str], rows: list[list]) -> None:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join((str(v).ljust(w) if i == 0 else str(v).rjust(w))
                               for i, (v, w) in enumerate(zip(r, widths))) + " |")


if __name__ == "__main__":
    main()
