"""Real servers for tests and benchmarks: native processes on loopback, or Docker containers.

Native (no Docker; what CI runs):

- Apache Kafka (KRaft, single node): jars from Maven Central, fetched once with Maven.
- MinIO: built once from the Go module proxy (AGPL-3.0: run unmodified as a test server,
  never shipped).
- PostgreSQL 16 + pgvector: the binaries inside the ``pgserver`` wheel, run as a real server
  on a TCP port with password auth (as a dedicated non-root user when we are root).
- Toxiproxy (network faults between a client and a server: latency, resets, stalls, a proxy
  down): built once from the Go module proxy; ``ToxiproxyServer`` runs it, ``ToxicProxy`` drives
  one proxy through its HTTP API (urllib only).
- A Confluent-compatible Schema Registry: Apicurio Registry's Quarkus distribution from Maven
  Central (``io.apicurio:apicurio-registry-app:<v>:tar.gz:all``), run on a JDK >= 21 with H2 file
  storage; ``SchemaRegistryServer`` (native on any backend), with the fault operations below.

Binaries are cached under ``$VLLM_MM_EVENTS_CACHE`` (default ``~/.cache/vllm-mm-events``),
keyed by version. ``python tests/support/services.py ensure`` fetches/builds them;
``... run`` starts Kafka and MinIO and prints their addresses (for manual work).

Containers (testcontainers, for a contributor with a Docker engine): the same three servers
from pinned images, behind the same attributes (see ``INTERFACE``). ``$VLLM_MM_EVENTS_SERVICES``
picks the backend: ``native``, ``containers`` or ``auto`` (default: containers when a Docker
engine answers a short ping, else native). ``make(service)`` builds an unstarted server on it.

Faults, for reliability tests (Kafka and MinIO; see ``FAULTS``). Natively each server is one process
group of its own:

- ``kill()``: SIGKILL the whole process group and wait until no process of it is left. Its port(s) stay
  reserved for it (a bound, non-listening socket: connections are refused and no other socket on this
  machine is given the port) and its data directory is kept.
- ``terminate()``: a clean shutdown (SIGTERM, wait) that, unlike ``stop()``, keeps the port(s) and data.
- ``pause()`` / ``resume()``: SIGSTOP / SIGCONT the process group. Paused, the server hangs: the kernel
  still accepts connections into the listen backlog and open connections stay open, nothing answers.
- ``restart()``: start the same server again on the same port(s) and data directory (Kafka: same KRaft
  metadata and log dirs, hence the same cluster id, topics and committed offsets; MinIO: same data and
  credentials, hence the same buckets and objects) and wait until it serves again. After ``kill()`` or
  ``terminate()``, or on a running (or paused) server: a clean shutdown first. Not after ``stop()``,
  which removes the data for good.
- ``alive``: the server's process exists (paused or not); ``paused``: it is paused.

Every wait is bounded; a timeout's error carries the server's log tail. On containers, ``pause()``,
``resume()``, ``alive`` and ``paused`` are Docker's pause/unpause/inspect; ``kill()``, ``terminate()``
and ``restart()`` raise NotImplementedError (see ``CONTAINER_FAULTS_UNSUPPORTED``).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

KAFKA_VERSION = "4.1.1"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"  # github.com/minio/minio, Feb 2026
# github.com/Shopify/toxiproxy/v2, Mar 2025: the newest the Go module proxy serves (its @v/list stops at
# v2.5.0, but v2.6.0 ... v2.12.0 are served when asked for by version; v2.12.1 and v2.13.0 are not).
TOXIPROXY_VERSION = "v2.12.0"
CACHE = Path(os.environ.get("VLLM_MM_EVENTS_CACHE", Path.home() / ".cache" / "vllm-mm-events"))
MINIO_USER, MINIO_PASSWORD = "mmevents", "mmevents-secret-key"

# Broker settings both backends get: server.properties natively, KAFKA_* variables in the container.
KAFKA_SETTINGS = {
    "offsets.topic.replication.factor": "1", "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1", "group.initial.rebalance.delay.ms": "0",
    "num.partitions": "3", "auto.create.topics.enable": "true",
}

KAFKA_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-simple</artifactId>
      <version>2.0.17</version></dependency>
  </dependencies>
</project>
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not open after {timeout}s; log:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_bytes()[-chars:].decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"


def _thread_states(pid: int) -> list[str]:
    """The scheduler state letter of each thread of ``pid`` (``T``: stopped); [] once it is gone."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError, IndexError):  # a thread that just ended
            states.append(stat.read_text().rpartition(")")[2].split()[0])
    return states


class ServerExited(RuntimeError):
    """A native server's process ended while something waited for it."""


class _Waits:
    """Hooks the readiness waits call: the native servers check their process and show their log."""

    def _check_process(self) -> None:
        pass

    def _log_hint(self) -> str:
        return ""

    def _poll_ready(self, probe: Callable[[], bool], what: str, timeout: float, interval: float = 0.2) -> None:
        """Until ``probe()`` is true (an exception from it means "not yet"), checking the process meanwhile;
        then a TimeoutError naming ``what``, the last answer and the log."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._check_process()
            try:
                if probe():
                    return
                last = "not ready"
            except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
                last = str(e)
            time.sleep(interval)
        raise TimeoutError(f"{what} not ready after {timeout:g}s ({last}){self._log_hint()}")


def json_call(what: str, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 10) -> Any:
    """One JSON HTTP request; the decoded answer (None when empty). An error status raises RuntimeError
    naming ``what``, the request and the server's answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{what} {method} {urllib.parse.urlsplit(url).path}: HTTP {e.code}: "
                           f"{e.read()[:800]!r}") from None
    return json.loads(raw) if raw.strip() else None


class _NativeServer(_Waits):
    """A native server: one process in a process group of its own, with the fault operations (see the
    module docstring). Subclasses give ``_argv()``, ``_ports()``, ``_log`` and call ``_launch()``."""

    dir: Path
    name: str
    _log: Path
    _restart_timeout: float

    def _init_process(self) -> None:
        self.proc: subprocess.Popen | None = None
        self._paused = False
        self._removed = False  # stop() removed the data directory
        self._reservations: list[socket.socket] = []
        self._launches = 0
        self._log_offset = 0

    def _argv(self) -> tuple[list[str], dict[str, str] | None]:
        raise NotImplementedError

    def _ports(self) -> tuple[int, ...]:
        raise NotImplementedError

    # -- hooks of the readiness waits ----------------------------------------------------------------

    def _check_process(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerExited(f"{self.name} exited with {self.proc.returncode}; log ({self._log}):\n"
                               f"{log_tail(self._log)}")

    def _log_hint(self) -> str:
        return f"; log ({self._log}):\n{log_tail(self._log)}"

    # -- launching --------------------------------------------------------------------------------------

    def _spawn(self) -> None:
        self._release_ports()
        argv, env = self._argv()
        self._launches += 1
        with self._log.open("wb" if self._launches == 1 else "ab") as out:
            if self._launches > 1:
                out.write(f"\n==== launch {self._launches} at {time.strftime('%H:%M:%S')} ====\n".encode())
                out.flush()
            self._log_offset = out.tell()
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self._paused = False

    def _launch(self, timeout: float) -> None:
        """Start the process and wait until it serves, within ``timeout`` seconds. A start that fails to
        bind a port (still held by a socket of the previous run, or by anyone) is retried until then."""
        deadline = time.monotonic() + timeout
        port = self._ports()[0]
        while True:
            self._spawn()
            try:
                while True:
                    self._check_process()
                    with socket.socket() as s:
                        if s.connect_ex(("127.0.0.1", port)) == 0:
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.name}: port {port} not open after {timeout:g}s{self._log_hint()}")
                    time.sleep(0.1)
                self._wait_ready(max(1.0, deadline - time.monotonic()))
                return
            except ServerExited:
                if b"already in use" not in self._log.read_bytes()[self._log_offset:]:
                    raise
                if time.monotonic() + 1 > deadline:
                    raise TimeoutError(f"{self.name}: port(s) {self._ports()} still in use after {timeout:g}s"
                                       f"{self._log_hint()}") from None
                time.sleep(0.5)  # bind failed (address already in use): try again

    def _wait_ready(self, timeout: float) -> None:
        raise NotImplementedError

    # -- ports kept while the server is down ---------------------------------------------------------

    def _reserve_ports(self) -> None:
        """Hold the server's ports while it is down: a bound socket that never listens refuses
        connections, and the kernel gives a bound port to no other socket (bind to port 0, or the
        source port of a connect: which could otherwise connect a client to itself on this port)."""
        self._release_ports()
        for port in self._ports():
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the old run's TIME_WAIT sockets
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()  # best effort: restart() copes with a busy port by retrying
                continue
            self._reservations.append(s)

    def _release_ports(self) -> None:
        while self._reservations:
            self._reservations.pop().close()

    # -- faults -----------------------------------------------------------------------------------------

    def _started_proc(self, op: str) -> subprocess.Popen:
        if self._removed:
            raise RuntimeError(f"{op}(): {self.name} was stopped for good (stop() removed its data directory)")
        if self.proc is None:
            raise RuntimeError(f"{op}(): {self.name} was never started")
        return self.proc

    def _running_proc(self, op: str) -> subprocess.Popen:
        proc = self._started_proc(op)
        if proc.poll() is not None:
            raise RuntimeError(f"{op}(): {self.name} is not running (exit status {proc.returncode})")
        return proc

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.proc.pid, sig)

    def _reap(self, deadline: float, what: str) -> None:
        """Wait until the process has exited and no process of its group is left."""
        assert self.proc is not None
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} (pid {self.proc.pid}) still running after {what}"
                               f"{self._log_hint()}") from None
        while True:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: process group {self.proc.pid} not empty after {what}"
                                   f"{self._log_hint()}")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        """The server's process exists, paused or not."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def paused(self) -> bool:
        return self.alive and self._paused

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL the process group and wait until it is gone; the port(s) stay reserved, the data kept.
        A server that is already down stays down."""
        if self._started_proc("kill").poll() is None:
            self._signal_group(signal.SIGKILL)
        self._reap(time.monotonic() + timeout, "SIGKILL")
        self._paused = False
        self._reserve_ports()

    def terminate(self, timeout: float = 60) -> None:
        """Shut down cleanly (SIGTERM to the group, wait), keeping the port(s) and the data, unlike stop().
        A server that does not exit within ``timeout`` is SIGKILLed and TimeoutError raised."""
        proc = self._started_proc("terminate")
        if proc.poll() is None:
            self._signal_group(signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(f"{self.name} did not shut down within {timeout:g}s of SIGTERM; SIGKILLed "
                                   f"it instead (data and port(s) kept){self._log_hint()}") from None
        self._reap(time.monotonic() + 10, "SIGTERM")
        self._paused = False
        self._reserve_ports()

    def pause(self, timeout: float = 10) -> None:
        """SIGSTOP the process group; returns once every thread of the server is stopped."""
        proc = self._running_proc("pause")
        self._signal_group(signal.SIGSTOP)
        self._paused = True
        deadline = time.monotonic() + timeout
        while not all(state in "tTZX" for state in _thread_states(proc.pid)):  # Z, X: a thread ending
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: threads not all stopped {timeout:g}s after SIGSTOP "
                                   f"({''.join(_thread_states(proc.pid))}){self._log_hint()}")
            time.sleep(0.02)

    def resume(self, timeout: float = 10) -> None:
        """SIGCONT the process group (harmless when it is not paused)."""
        proc = self._running_proc("resume")
        self._signal_group(signal.SIGCONT)
        self._paused = False
        deadline = time.monotonic() + timeout
        while any(state in "tT" for state in _thread_states(proc.pid)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: still stopped {timeout:g}s after SIGCONT{self._log_hint()}")
            time.sleep(0.02)

    def restart(self, timeout: float | None = None) -> Any:
        """Start the server again on the same port(s) and data directory and wait until it serves
        (``timeout``: the class's default). After kill()/terminate(), or a crash; a running or paused
        server is shut down cleanly first."""
        proc = self._started_proc("restart")
        if proc.poll() is None:
            self.terminate()
        else:
            self._reap(time.monotonic() + 10, "its exit")
        try:
            self._launch(self._restart_timeout if timeout is None else timeout)
        except BaseException:
            if not self.alive:
                self._reserve_ports()  # down still: keep its ports for the next restart()
            raise
        return self

    def stop(self) -> None:
        """Clean shutdown for good: the process, its port reservation and its data directory go."""
        if self.alive:
            self._signal_group(signal.SIGCONT)  # a paused server could not act on SIGTERM
        _stop(self.proc)
        self._release_ports()
        self._removed = True
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- Kafka -------------------------------------------------------------------------------

def kafka_libs() -> Path:
    libs = CACHE / f"kafka-{KAFKA_VERSION}" / "libs"
    if (libs / ".complete").exists():
        return libs
    if not shutil.which("mvn") or not shutil.which("java"):
        raise RuntimeError("Kafka needs java and mvn on PATH")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "pom.xml").write_text(KAFKA_POM)
        tmp = Path(d) / "libs"
        subprocess.check_call(["mvn", "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"], cwd=d)
        libs.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(libs, ignore_errors=True)
        shutil.copytree(tmp, libs)
    (libs / ".complete").write_text("ok\n")
    return libs


class _KafkaClients(_Waits):
    """What tests use of a broker, whichever backend runs it (``host``/``port``: where clients connect)."""

    host: str
    port: int

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def _wait_ready(self, timeout: float = 60) -> None:
        """Until a metadata request lists the broker and every partition has a leader (after a restart,
        once the logs are recovered and the broker unfenced: topics and the group coordinator serve)."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._check_process()
            try:
                md = admin.list_topics(timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            except KafkaException as e:
                last = str(e)
            else:
                leaderless = [f"{t.topic}[{p.id}]" for t in md.topics.values() for p in t.partitions.values()
                              if p.leader < 0 or p.error is not None]
                if md.brokers and not leaderless:
                    return
                last = f"brokers {sorted(md.brokers)}, partitions without a leader: {leaderless[:10]}"
            time.sleep(0.2)
        raise TimeoutError(f"Kafka broker at {self.bootstrap} not ready after {timeout:g}s ({last})"
                           f"{self._log_hint()}")


class RunningKafka(_KafkaClients):
    """A broker someone else runs (a benchmark's ``--bootstrap``): used as it is, never started or stopped."""

    def __init__(self, bootstrap: str):
        host, port = bootstrap.rsplit(":", 1)
        self.host, self.port, self.name = host, int(port), f"Kafka at {bootstrap}"

    def stop(self) -> None:
        pass


class KafkaBroker(_KafkaClients, _NativeServer):
    name = f"Apache Kafka {KAFKA_VERSION} (KRaft, single node)"
    backend = "native"
    host = "127.0.0.1"
    _restart_timeout = 180.0  # after SIGKILL the broker recovers its logs first

    def __init__(self, advertised_port: int | None = None) -> None:
        """``advertised_port``: also listen on ``proxied_port`` (listener PROXIED), advertised as
        127.0.0.1:``advertised_port``, where a proxy (Toxiproxy) forwarding to ``proxied_port`` listens.
        Clients connect to the advertised address after bootstrap, so a client that bootstraps through
        the proxy stays behind it; ``bootstrap`` (listener PLAINTEXT) stays direct."""
        self.dir = Path(tempfile.mkdtemp(prefix="kafka-"))
        self.port, self.controller_port = free_port(), free_port()
        self.advertised_port = advertised_port
        self.proxied_port = free_port() if advertised_port is not None else None
        self._log = self.dir / "kafka.log"
        self.cluster_id: str | None = None
        self._init_process()

    def _ports(self) -> tuple[int, ...]:
        return self.port, self.controller_port, *((self.proxied_port,) if self.proxied_port else ())

    def _argv(self) -> tuple[list[str], dict[str, str] | None]:
        return (["java", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", f"{kafka_libs()}/*",
                 "kafka.Kafka", str(self.dir / "server.properties")], None)

    def start(self) -> "KafkaBroker":
        libs = kafka_libs()
        props = self.dir / "server.properties"
        listeners, advertised = f"PLAINTEXT://127.0.0.1:{self.port}", f"PLAINTEXT://127.0.0.1:{self.port}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        if self.proxied_port is not None:  # brokers talk to each other on PLAINTEXT still (its default)
            listeners += f",PROXIED://127.0.0.1:{self.proxied_port}"
            advertised += f",PROXIED://127.0.0.1:{self.advertised_port}"
            protocols += ",PROXIED:PLAINTEXT"
        props.write_text("\n".join([
            "process.roles=broker,controller", "node.id=1",
            f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
            f"listeners={listeners},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners={advertised}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map={protocols}",
            f"log.dirs={self.dir / 'data'}",
            *(f"{key}={value}" for key, value in KAFKA_SETTINGS.items()), "",
        ]))
        cp = f"{libs}/*"
        # Formatted once: restart() reuses the KRaft metadata and log dirs, hence this cluster id.
        self.cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        subprocess.run(["java", "-cp", cp, "kafka.tools.StorageTool", "format", "--standalone",
                        f"--cluster-id={self.cluster_id}", "-c", str(props)], check=True, capture_output=True)
        atexit.register(self.stop)  # never leave a broker behind, even if the caller forgets
        self._launch(150)
        return self


# ---- MinIO -------------------------------------------------------------------------------

def minio_binary() -> Path:
    binary = CACHE / f"minio-{MINIO_VERSION}" / "minio"
    if binary.exists():
        return binary
    if not shutil.which("go"):
        raise RuntimeError("MinIO is built from the Go module proxy; go is not on PATH")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, GOBIN=d, CGO_ENABLED="0")
        subprocess.check_call(["go", "install", f"github.com/minio/minio@{MINIO_VERSION}"], env=env)
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(d) / "minio", binary)
    return binary


class _S3Clients(_Waits):
    """What tests use of an S3 server, whichever backend runs it."""

    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs (credentials through the standard AWS variables)."""
        return {"AWS_ACCESS_KEY_ID": MINIO_USER, "AWS_SECRET_ACCESS_KEY": MINIO_PASSWORD,
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}

    def _wait_ready(self, timeout: float = 30) -> None:
        def probe() -> bool:
            with urllib.request.urlopen(f"{self.endpoint}/minio/health/ready", timeout=2) as r:
                return r.status == 200
        self._poll_ready(probe, f"MinIO at {self.endpoint}", timeout)

    def client(self):
        import boto3

        e = self.env
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name=e["AWS_REGION"])

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


class RunningS3(_S3Clients):
    """An S3 server someone else runs (a benchmark's ``--endpoint``): used as it is, never started or
    stopped; credentials from the standard AWS variables."""

    def __init__(self, endpoint: str):
        from urllib.parse import urlsplit

        u = urlsplit(endpoint)
        self.host, self.port, self.name = u.hostname, u.port or (443 if u.scheme == "https" else 80), "S3 server"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
                "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1"), "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        pass


class MinioServer(_S3Clients, _NativeServer):
    name = f"MinIO {MINIO_VERSION}"
    backend = "native"
    host = "127.0.0.1"
    _restart_timeout = 60.0

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="minio-"))
        self.port, self.console_port = free_port(), free_port()
        self._log = self.dir / "minio.log"
        self._init_process()

    def _ports(self) -> tuple[int, ...]:
        return self.port, self.console_port

    def _argv(self) -> tuple[list[str], dict[str, str] | None]:
        env = dict(os.environ, MINIO_ROOT_USER=MINIO_USER, MINIO_ROOT_PASSWORD=MINIO_PASSWORD,
                   MINIO_BROWSER="off", MINIO_UPDATE="off")
        return ([str(minio_binary()), "server", "--quiet", "--address", f"127.0.0.1:{self.port}",
                 "--console-address", f"127.0.0.1:{self.console_port}", str(self.dir / "data")], env)

    def start(self) -> "MinioServer":
        atexit.register(self.stop)
        self._launch(90)
        return self


# ---- Toxiproxy ---------------------------------------------------------------------------

def toxiproxy_binary() -> Path:
    """Toxiproxy's server (``cmd/server``, installed as ``server``), built once and cached as ``toxiproxy-server``."""
    binary = CACHE / f"toxiproxy-{TOXIPROXY_VERSION}" / "toxiproxy-server"
    if binary.exists():
        return binary
    if not shutil.which("go"):
        raise RuntimeError("Toxiproxy is built from the Go module proxy; go is not on PATH")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, GOBIN=d, CGO_ENABLED="0")
        subprocess.check_call(["go", "install", f"github.com/Shopify/toxiproxy/v2/cmd/server@{TOXIPROXY_VERSION}"],
                              env=env)
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(d) / "server", binary)
    return binary


class ToxiproxyServer(_NativeServer):
    """Toxiproxy: TCP proxies put between a client and a server, whose faults ("toxics") tests switch on
    and off through its HTTP API on ``port``. A client pointed at a proxy's listen port instead of the
    server gets the faults; ``proxy()`` makes one."""

    name = f"Toxiproxy {TOXIPROXY_VERSION}"
    backend = "native"
    host = "127.0.0.1"
    _restart_timeout = 30.0

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="toxiproxy-"))
        self.port = free_port()
        self._log = self.dir / "toxiproxy.log"
        self.version: str | None = None  # what its /version answered
        self._init_process()

    def _ports(self) -> tuple[int, ...]:
        return (self.port,)

    def _argv(self) -> tuple[list[str], dict[str, str] | None]:
        return ([str(toxiproxy_binary()), "-host", self.host, "-port", str(self.port)],
                dict(os.environ, LOG_LEVEL="info"))  # its default, trace, logs every byte moved

    @property
    def api(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _wait_ready(self, timeout: float = 30) -> None:
        def probe() -> bool:
            self.version = self.call("GET", "/version", timeout=2)["version"]
            return True
        self._poll_ready(probe, f"Toxiproxy at {self.api}", timeout, interval=0.1)

    def start(self) -> "ToxiproxyServer":
        atexit.register(self.stop)
        self._launch(30)
        return self

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        """One API request; the decoded JSON answer (None when empty). An error status raises RuntimeError."""
        return json_call("Toxiproxy", method, self.api + path, body, {"Content-Type": "application/json"}, timeout)

    def proxy(self, name: str, upstream: str, listen_port: int = 0) -> "ToxicProxy":
        """A new proxy, enabled and without toxics: it listens on 127.0.0.1:``listen_port`` (0: a free
        port) and forwards each connection to ``upstream`` (host:port)."""
        got = self.call("POST", "/proxies", {"name": name, "listen": f"{self.host}:{listen_port}",
                                             "upstream": upstream, "enabled": True})
        return ToxicProxy(self, name, got["listen"], upstream)


@dataclass(frozen=True)
class ToxicProxy:
    """One Toxiproxy proxy. Toxics act on the data of its connections, existing and new, in one
    direction: ``downstream`` (server to client) or ``upstream`` (client to server)."""

    server: ToxiproxyServer
    name: str
    listen: str  # host:port, where clients connect
    upstream: str

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def add_toxic(self, kind: str, stream: str = "downstream", name: str | None = None, toxicity: float = 1.0,
                  **attributes: int) -> str:
        """Add a toxic of type ``kind`` (one of Toxiproxy's: latency, reset_peer, timeout, bandwidth,
        limit_data, slicer, slow_close) to a ``toxicity`` share of connections; returns its name
        (default ``<kind>_<stream>``)."""
        body = {"type": kind, "stream": stream, "toxicity": toxicity, "attributes": attributes}
        if name:
            body["name"] = name
        return self.server.call("POST", f"/proxies/{self.name}/toxics", body)["name"]

    def latency(self, ms: int, jitter_ms: int = 0, stream: str = "downstream") -> str:
        """Data waits ``ms`` (+- ``jitter_ms``) before it is passed on."""
        return self.add_toxic("latency", stream, latency=ms, jitter=jitter_ms)

    def reset_peer(self, after_ms: int = 0, stream: str = "downstream") -> str:
        """A connection is reset (TCP RST, unsent data dropped) ``after_ms`` after its first data."""
        return self.add_toxic("reset_peer", stream, timeout=after_ms)

    def timeout(self, ms: int = 0, stream: str = "downstream") -> str:
        """No data passes; connections are closed after ``ms`` (0: held open, silent, until removed)."""
        return self.add_toxic("timeout", stream, timeout=ms)

    def bandwidth(self, kb_per_s: int, stream: str = "downstream") -> str:
        """At most ``kb_per_s`` KB/s."""
        return self.add_toxic("bandwidth", stream, rate=kb_per_s)

    def limit_data(self, nbytes: int, stream: str = "downstream") -> str:
        """A connection is closed once ``nbytes`` have passed."""
        return self.add_toxic("limit_data", stream, bytes=nbytes)

    def remove_toxic(self, name: str) -> None:
        self.server.call("DELETE", f"/proxies/{self.name}/toxics/{name}")

    def toxics(self) -> list[dict[str, Any]]:
        return self.server.call("GET", f"/proxies/{self.name}/toxics")

    def set_enabled(self, enabled: bool) -> None:
        """Disabled: the proxy closes its connections and stops listening (connections are refused)."""
        self.server.call("POST", f"/proxies/{self.name}", {"enabled": enabled})

    def heal(self) -> None:
        """No toxics left, enabled."""
        for toxic in self.toxics():
            self.remove_toxic(toxic["name"])
        self.set_enabled(True)

    def delete(self) -> None:
        self.server.call("DELETE", f"/proxies/{self.name}")


# ---- Schema Registry (Apicurio, Confluent-compatible API) --------------------------------------

# Apicurio Registry's own distribution from Maven Central: the Quarkus fast-jar (quarkus-run.jar + lib/)
# that its release attaches as io.apicurio:apicurio-registry-app:<v>:tar.gz:all (no runner jar is published;
# the plain -app jar is the unaugmented module). Its classes are Java 21 (class file 65): it needs a JDK >= 21.
APICURIO_VERSION = "3.3.3"
APICURIO_JAVA = 21
APICURIO_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local</groupId><artifactId>apicurio-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>io.apicurio</groupId><artifactId>apicurio-registry-app</artifactId>
      <version>{APICURIO_VERSION}</version><classifier>all</classifier><type>tar.gz</type>
      <exclusions><exclusion><groupId>*</groupId><artifactId>*</artifactId></exclusion></exclusions></dependency>
  </dependencies>
</project>
"""
REGISTRY_USER_INFO = "mmevents:registry-secret"  # the tests' registry with basic auth (conftest)
JAVA_ENV = "VLLM_MM_EVENTS_JAVA"  # a java binary (>= APICURIO_JAVA) for the registry, if PATH's is older


def apicurio_home() -> Path:
    """The unpacked distribution (``quarkus-run.jar``, ``lib/``, ``app/``, ``quarkus/``), fetched once."""
    home = CACHE / f"apicurio-registry-{APICURIO_VERSION}"
    if (home / ".complete").exists():
        return home
    if not shutil.which("mvn"):
        raise RuntimeError("the Schema Registry (Apicurio) comes from Maven Central; mvn is not on PATH")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "pom.xml").write_text(APICURIO_POM)
        subprocess.check_call(["mvn", "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={d}/dist"],
                              cwd=d)
        (archive,) = Path(d, "dist").glob("apicurio-registry-app-*.tar.gz")
        staging = Path(d) / "home"
        staging.mkdir()
        subprocess.check_call(["tar", "-xzf", str(archive), "-C", str(staging)])
        if not (staging / "quarkus-run.jar").exists():
            raise RuntimeError(f"{archive.name} has no quarkus-run.jar: {sorted(p.name for p in staging.iterdir())}")
        home.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(staging, home)
    (home / ".complete").write_text("ok\n")
    return home


def _java_release(java: str) -> int | None:
    """The feature release of a java binary (17, 21, 25, ...): from its JDK's ``release`` file, else
    from ``java -version``."""
    real = Path(java).resolve()
    release = real.parent.parent / "release"
    text = release.read_text() if release.exists() else ""
    if 'JAVA_VERSION="' not in text:
        try:
            text = subprocess.run([str(real), "-version"], capture_output=True, text=True, timeout=30).stderr
        except (OSError, subprocess.TimeoutExpired):
            return None
    for marker in ('JAVA_VERSION="', 'version "'):
        if marker in text:
            head = text.split(marker, 1)[1].split('"', 1)[0].split(".")[0].split("-")[0]
            return int(head) if head.isdigit() else None
    return None


def java_for_registry(minimum: int = APICURIO_JAVA) -> str:
    """A java binary of release >= ``minimum``: ``$VLLM_MM_EVENTS_JAVA``, ``$JAVA_HOME``, PATH's, then
    the JDKs under /usr/lib/jvm (newest first; this machine's image has a Temurin JDK beside Debian's)."""
    candidates = [os.environ.get(JAVA_ENV, "")]
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    candidates.append(shutil.which("java") or "")
    candidates += sorted((str(p) for p in Path("/usr/lib/jvm").glob("*/bin/java")), reverse=True)
    seen = []
    for java in filter(None, candidates):
        if not os.access(java, os.X_OK) or java in seen:
            continue
        seen.append(java)
        release = _java_release(java)
        if release is not None and release >= minimum:
            return java
    raise RuntimeError(f"Apicurio Registry {APICURIO_VERSION} needs Java >= {minimum}; none found among "
                       f"{seen or 'no java binaries'} (set {JAVA_ENV} to one)")


class SchemaRegistryServer(_NativeServer):
    """Apicurio Registry on loopback, used through its Confluent-compatible API (``url``:
    ``/apis/ccompat/v7``, what ``SchemaRegistryClient`` and the product's ``schema_registry_url`` take).
    Storage is an H2 database in a file under ``dir``, so a restart() keeps every subject, schema id and
    compatibility setting (as Kafka keeps its topics); the fault operations are the native servers' own."""

    name = f"Apicurio Registry {APICURIO_VERSION} (Confluent-compatible API, H2 file storage)"
    backend = "native"
    host = "127.0.0.1"
    _restart_timeout = 120.0

    def __init__(self, user_info: str | None = None) -> None:
        """``user_info``: ``user:password``; the API then takes only requests with that HTTP basic auth
        (Quarkus' embedded user realm and an ``authenticated`` policy on /apis/*), else answers 401."""
        self.dir = Path(tempfile.mkdtemp(prefix="registry-"))
        self.port, self.management_port = free_port(), free_port()
        self.user_info = user_info
        self._log = self.dir / "registry.log"
        self._init_process()

    def _ports(self) -> tuple[int, ...]:
        return self.port, self.management_port

    def _argv(self) -> tuple[list[str], dict[str, str] | None]:
        settings = {
            "quarkus.http.host": self.host, "quarkus.http.port": self.port,
            "quarkus.management.host": self.host, "quarkus.management.port": self.management_port,
            # WRITE_DELAY=0: each commit is on disk before the answer, so a SIGKILL (kill()) loses nothing acknowledged
            "apicurio.datasource.url": f"jdbc:h2:file:{self.dir / 'data' / 'registry'};WRITE_DELAY=0",
            "apicurio.storage.snapshot.location": self.dir / "snapshots",
            "quarkus.otel.sdk.disabled": "true",
        }
        if self.user_info:
            user, _, password = self.user_info.partition(":")
            settings.update({
                "quarkus.http.auth.basic": "true", "quarkus.security.users.embedded.plain-text": "true",
                f"quarkus.security.users.embedded.users.{user}": password,
                f"quarkus.security.users.embedded.roles.{user}": "sr-admin",
                "quarkus.http.auth.permission.registry.paths": "/apis/*",
                "quarkus.http.auth.permission.registry.policy": "authenticated",
            })
        return ([java_for_registry(), "-Xmx384m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                 *(f"-D{k}={v}" for k, v in settings.items()), "-jar", str(apicurio_home() / "quarkus-run.jar")],
                None)

    @property
    def url(self) -> str:
        """The Confluent-compatible API's base URL."""
        return f"http://{self.host}:{self.port}/apis/ccompat/v7"

    def _wait_ready(self, timeout: float = 60) -> None:
        self._poll_ready(lambda: isinstance(self.call("GET", "/subjects", timeout=2), list),
                         f"Schema Registry at {self.url}", timeout)

    def start(self) -> "SchemaRegistryServer":
        apicurio_home()
        atexit.register(self.stop)
        self._launch(150)
        return self

    def call(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        """One request to the Confluent-compatible API; the decoded JSON answer. An error status raises
        RuntimeError with the registry's error (``error_code``, ``message``)."""
        headers = {"Content-Type": "application/vnd.schemaregistry.v1+json",
                   "Accept": "application/vnd.schemaregistry.v1+json"}
        if self.user_info:
            headers["Authorization"] = "Basic " + base64.b64encode(self.user_info.encode()).decode()
        return json_call("Schema Registry", method, self.url + path, body, headers, timeout)

    def set_compatibility(self, subject: str, level: str) -> str:
        """PUT /config/<subject>: the subject's compatibility mode (NONE, BACKWARD, FORWARD, FULL, ..._TRANSITIVE)."""
        return self.call("PUT", f"/config/{urllib.parse.quote(subject, safe='')}", {"compatibility": level})[
            "compatibility"]

    def compatibility(self, subject: str) -> str:
        return self.call("GET", f"/config/{urllib.parse.quote(subject, safe='')}")["compatibilityLevel"]

    def register(self, subject: str, schema: dict) -> int:
        """POST /subjects/<subject>/versions: the schema's id (the same id for the same schema)."""
        return self.call("POST", f"/subjects/{urllib.parse.quote(subject, safe='')}/versions",
                         {"schema": json.dumps(schema), "schemaType": "AVRO"})["id"]

    def check_compatibility(self, subject: str, schema: dict) -> tuple[bool, list[str]]:
        """The registry's own check of ``schema`` against the subject's latest version, by the subject's mode."""
        got = self.call("POST", f"/compatibility/subjects/{urllib.parse.quote(subject, safe='')}/versions/latest"
                                "?verbose=true", {"schema": json.dumps(schema), "schemaType": "AVRO"})
        return bool(got["is_compatible"]), [str(m) for m in got.get("messages") or ()]

    def versions(self, subject: str) -> list[int]:
        return self.call("GET", f"/subjects/{urllib.parse.quote(subject, safe='')}/versions")


# ---- PostgreSQL + pgvector ------------------------------------------------------------------

PG_USER, PG_PASSWORD, PG_DB = "mmevents", "mmevents-pg-secret", "vectors"
PG_SYSTEM_USER = "mmevents-pg"  # PostgreSQL refuses to run as root


def postgres_bin() -> Path:
    """The wheel's PostgreSQL 16 + pgvector. As root, a copy in a world-readable directory:
    the server runs as another user, who may not traverse into a private checkout's .venv."""
    from importlib.metadata import version

    import pgserver

    install = Path(pgserver.__file__).parent / "pginstall"
    if os.geteuid() != 0:
        return install / "bin"
    shared = Path(tempfile.gettempdir()) / f"vllm-mm-events-pgserver-{version('pgserver')}"
    if not (shared / ".complete").exists():
        # Same layout as site-packages: the binaries find their libraries through
        # RPATH $ORIGIN/../../../pgserver.libs.
        staging = Path(tempfile.mkdtemp(prefix="pgserver-copy-", dir=shared.parent))
        shutil.copytree(install, staging / "pgserver" / "pginstall", symlinks=True)
        shutil.copytree(install.parent.parent / "pgserver.libs", staging / "pgserver.libs", symlinks=True)
        (staging / ".complete").touch()
        for root, dirs, _files in os.walk(staging):
            os.chmod(root, 0o755)
        try:
            os.rename(staging, shared)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return shared / "pgserver" / "pginstall" / "bin"


class _PostgresClients:
    """What tests use of a PostgreSQL server, whichever backend runs it."""

    host: str
    port: int

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@{self.host}:{self.port}/{PG_DB}"

    def uri(self, table: str) -> str:
        """The sink URI; the password travels as PGPASSWORD, never in the URI."""
        return f"pgvector://{PG_USER}@{self.host}:{self.port}/{PG_DB}/{table}"

    @property
    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": PG_PASSWORD}


class RunningPostgres:
    """A PostgreSQL + pgvector someone else runs (a benchmark's ``--pgvector pgvector://user@host:port/db``):
    used as it is, never started or stopped; the password from PGPASSWORD."""

    def __init__(self, base_uri: str):
        self.base_uri, self.name, self.env = base_uri.rstrip("/"), "PostgreSQL", {}

    def uri(self, table: str) -> str:
        return f"{self.base_uri}/{table}"

    def stop(self) -> None:
        pass


class PostgresServer(_PostgresClients):
    name = "PostgreSQL 16 + pgvector (pgserver wheel binaries)"
    backend = "native"
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.port = free_port()
        self._as_user: dict = {}

    def _run(self, *args: str) -> None:
        r = subprocess.run([str(postgres_bin() / args[0]), *args[1:]], capture_output=True, text=True,
                           **self._as_user)
        if r.returncode:
            raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stderr[-2000:]}")

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam(PG_SYSTEM_USER)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                PG_SYSTEM_USER], check=True)
                pw = pwd.getpwnam(PG_SYSTEM_USER)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        pwfile = self.dir / "pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        if self._as_user:
            os.chown(pwfile, self._as_user["user"], self._as_user["group"])
        data = self.dir / "data"
        self._run("initdb", "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                  "--encoding=UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.dir / "postgres.log"), "-w", "-t", "60", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off", "start")
        atexit.register(self.stop)
        import psycopg

        with psycopg.connect(f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {PG_DB}")
        return self

    def stop(self) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
            except RuntimeError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- Containers (testcontainers) ------------------------------------------------------------

# Pinned images. testcontainers' KafkaContainer drives Confluent's image scripts (/etc/confluent/docker),
# so the broker is cp-kafka: Confluent Platform 8.1.x ships Apache Kafka 4.1.x (KAFKA_VERSION), KRaft only.
KAFKA_IMAGE = "confluentinc/cp-kafka:8.1.1"
# MinIO publishes no images since October 2025 (Docker Hub's minio/minio is gone): this is the last MinIO
# release, built unmodified by coollabsio (the image testcontainers-python now defaults to). The native
# server is a later source snapshot; the S3 API the tests use is the same.
MINIO_IMAGE = "ghcr.io/coollabsio/minio:RELEASE.2025-10-15T17-29-55Z"
POSTGRES_IMAGE = "pgvector/pgvector:pg16"  # PostgreSQL 16 + pgvector, as the pgserver wheel
TESTCONTAINERS_REQUIREMENT = "testcontainers[kafka,minio,postgres]>=4.15,<5"


def _testcontainers(module: str) -> Any:
    """``testcontainers.community.<module>`` (4.15 moved the modules there; the old paths warn)."""
    try:
        return importlib.import_module(f"testcontainers.community.{module}")
    except ImportError as e:
        raise ServicesUnavailable(f"the container backend needs {TESTCONTAINERS_REQUIREMENT!r} ({e})") from e


def _default_docker_api() -> str:
    import docker.constants

    return docker.constants.DEFAULT_DOCKER_API_VERSION


class _ContainerServer:
    """A testcontainers container behind the native server's interface.

    The definition is built without Docker: testcontainers' constructor makes a docker SDK client,
    which asks the engine for its API version unless given one, so we give one (the version the
    engine reported when ``resolve_backend`` pinged it; the SDK's default when building offline)."""

    image: str
    container_port: int  # the port inside the container that clients reach

    def __init__(self, docker_api: str | None = None) -> None:
        self.docker_api = docker_api or _default_docker_api()
        self.container = self._define({"docker_client_kw": {"version": self.docker_api}})
        self._address: tuple[str, int] | None = None

    def _define(self, docker_kw: dict) -> Any:
        raise NotImplementedError

    @property
    def backend(self) -> str:
        return f"container {self.image}"

    @property
    def host(self) -> str:
        return self._started()[0]

    @property
    def port(self) -> int:
        return self._started()[1]

    def _started(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError(f"{type(self).__name__} ({self.image}) is not started")
        return self._address

    def _start_container(self) -> None:
        self.container.start()

    def _wait_ready(self) -> None:
        pass

    def start(self) -> Any:
        try:
            self._start_container()
            self._address = (self.container.get_container_host_ip(),
                             int(self.container.get_exposed_port(self.container_port)))
            self._wait_ready()
        except BaseException:
            self._address = None
            with contextlib.suppress(Exception):  # the start error is the one to report
                self.container.stop()
            raise
        atexit.register(self.stop)  # testcontainers' reaper also removes it if this process dies
        return self

    def stop(self) -> None:
        if self._address is not None:
            self._address = None
            self.container.stop()


CONTAINER_FAULTS_UNSUPPORTED = (
    "{op}() is not available on the container backend: the container publishes its port on a random host "
    "port, and Docker gives a stopped container a new random host port when it starts again (moby/moby#31926, "
    "#8723); the Kafka container also advertises the first one (written into its start script). So no restart() "
    "could bring the server back on the same port, and a kill() or terminate() would lose the session's server. "
    "pause()/resume() work (docker pause/unpause); for kill/terminate/restart run the native backend "
    "({env}=native).")


class _ContainerFaults:
    """The fault operations Docker can give without moving the server's port (see CONTAINER_FAULTS_UNSUPPORTED)."""

    container: Any
    _address: tuple[str, int] | None
    _started: Any  # _ContainerServer's: the address, or RuntimeError when not started

    def _state(self) -> str:
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        return wrapped.status  # created, running, paused, restarting, removing, exited, dead

    @property
    def alive(self) -> bool:
        return self._address is not None and self._state() in ("running", "paused")

    @property
    def paused(self) -> bool:
        return self._address is not None and self._state() == "paused"

    def pause(self, timeout: float = 10) -> None:
        """docker pause: the cgroup freezer stops every process of the container; connections stay open."""
        self._started()
        self.container.get_wrapped_container().pause()

    def resume(self, timeout: float = 10) -> None:
        """docker unpause (nothing to do when it is not paused)."""
        self._started()
        if self._state() == "paused":
            self.container.get_wrapped_container().unpause()

    def kill(self, timeout: float = 30) -> None:
        raise NotImplementedError(CONTAINER_FAULTS_UNSUPPORTED.format(op="kill", env=SERVICES_ENV))

    def terminate(self, timeout: float = 60) -> None:
        raise NotImplementedError(CONTAINER_FAULTS_UNSUPPORTED.format(op="terminate", env=SERVICES_ENV))

    def restart(self, timeout: float | None = None) -> Any:
        raise NotImplementedError(CONTAINER_FAULTS_UNSUPPORTED.format(op="restart", env=SERVICES_ENV))


class KafkaContainerBroker(_KafkaClients, _ContainerFaults, _ContainerServer):
    image = KAFKA_IMAGE
    name = f"Apache Kafka 4.1 (Confluent Platform {KAFKA_IMAGE.rsplit(':', 1)[1]}, KRaft, single node)"
    container_port = 9093  # KafkaContainer's external listener; it advertises the mapped host port

    def _define(self, docker_kw: dict) -> Any:
        container = _testcontainers("kafka").KafkaContainer(self.image, port=self.container_port,
                                                            **docker_kw).with_kraft()
        for key, value in KAFKA_SETTINGS.items():
            container.with_env("KAFKA_" + key.upper().replace(".", "_"), value)
        return container.with_env("KAFKA_HEAP_OPTS", "-Xmx512m")

    def _start_container(self) -> None:
        self.container.start(timeout=120)  # first start formats the KRaft log; slow machines need > 30 s


class MinioContainerServer(_S3Clients, _ContainerFaults, _ContainerServer):
    image = MINIO_IMAGE
    name = f"MinIO {MINIO_IMAGE.rsplit(':', 1)[1]}"
    container_port = 9000

    def _define(self, docker_kw: dict) -> Any:
        container = _testcontainers("minio").MinioContainer(self.image, port=self.container_port,
                                                            access_key=MINIO_USER, secret_key=MINIO_PASSWORD,
                                                            **docker_kw)
        # MinioContainer sets the deprecated MINIO_ACCESS_KEY/MINIO_SECRET_KEY; the native server's variables too.
        return container.with_envs(MINIO_ROOT_USER=MINIO_USER, MINIO_ROOT_PASSWORD=MINIO_PASSWORD,
                                   MINIO_BROWSER="off", MINIO_UPDATE="off")


class PostgresContainerServer(_PostgresClients, _ContainerServer):
    image = POSTGRES_IMAGE
    name = f"PostgreSQL 16 + pgvector ({POSTGRES_IMAGE})"
    container_port = 5432

    def _define(self, docker_kw: dict) -> Any:
        container = _testcontainers("postgres").PostgresContainer(
            self.image, port=self.container_port, username=PG_USER, password=PG_PASSWORD, dbname=PG_DB,
            driver=None, **docker_kw)
        # PostgresContainer sets POSTGRES_* only at start; set them now so the definition carries them.
        # Password auth over TCP, as the native server (initdb --auth=scram-sha-256).
        container.with_envs(POSTGRES_USER=PG_USER, POSTGRES_PASSWORD=PG_PASSWORD, POSTGRES_DB=PG_DB,
                            POSTGRES_HOST_AUTH_METHOD="scram-sha-256")
        return container.with_command("postgres -c fsync=off")

    def _wait_ready(self, timeout: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


# ---- Backend selection ------------------------------------------------------------------------

SERVICES_ENV = "VLLM_MM_EVENTS_SERVICES"
SERVICES_CHOICES = ("native", "containers", "auto")
DOCKER_PING_TIMEOUT = 2.0  # seconds; auto must not stall a machine without an engine

SERVICES = ("kafka", "minio", "postgres")
NATIVE: dict[str, type] = {"kafka": KafkaBroker, "minio": MinioServer, "postgres": PostgresServer}
CONTAINERS: dict[str, type] = {"kafka": KafkaContainerBroker, "minio": MinioContainerServer,
                               "postgres": PostgresContainerServer}
# The fault operations of Kafka and MinIO (see the module docstring; on containers some raise
# NotImplementedError, see CONTAINER_FAULTS_UNSUPPORTED).
FAULTS = ("alive", "paused", "kill", "terminate", "pause", "resume", "restart")
# What tests, benchmarks and tests/conftest.py use of each server; both backends provide all of it.
INTERFACE = {
    "kafka": ("name", "backend", "host", "port", "bootstrap", "start", "stop", *FAULTS),
    "minio": ("name", "backend", "host", "port", "endpoint", "env", "client", "create_bucket", "start", "stop",
              *FAULTS),
    "postgres": ("name", "backend", "host", "port", "dsn", "uri", "env", "start", "stop"),
}


class Server(Protocol):
    name: str
    backend: str  # "native" or "container <image>"
    host: str
    port: int

    def start(self) -> Any: ...

    def stop(self) -> None: ...


class ServicesUnavailable(RuntimeError):
    """The chosen backend cannot run here."""


@dataclass(frozen=True)
class Backend:
    kind: str  # "native" or "containers"
    reason: str  # how VLLM_MM_EVENTS_SERVICES resolved, for the test summary
    docker_api: str | None = None  # the engine's API version (containers)


def services_choice(raw: str | None = None) -> str:
    """``$VLLM_MM_EVENTS_SERVICES`` (or ``raw``) checked: native, containers or auto (unset or empty)."""
    raw = os.environ.get(SERVICES_ENV, "") if raw is None else raw
    choice = raw.strip().lower() or "auto"
    if choice not in SERVICES_CHOICES:
        raise ValueError(f"{SERVICES_ENV}={raw!r}: expected one of {', '.join(SERVICES_CHOICES)} (default auto)")
    return choice


def ping_docker(timeout: float = DOCKER_PING_TIMEOUT) -> tuple[str | None, str]:
    """(API version, where) of the Docker engine testcontainers would use, when one answers a ping
    within ``timeout`` seconds; else (None, what happened). Any exception means no engine."""
    try:
        from testcontainers.core.docker_client import get_docker_host

        import docker
    except ImportError as e:
        return None, f"docker SDK not importable ({e}); install {TESTCONTAINERS_REQUIREMENT!r}"
    where = "the default Docker socket"
    try:
        host = get_docker_host()  # DOCKER_HOST, ~/.testcontainers.properties tc.host or the docker context
        where = host or where
        environment = dict(os.environ, DOCKER_HOST=host) if host else None
        # No version given: the SDK's first request asks the engine for it, under the same timeout.
        client = docker.from_env(environment=environment, timeout=timeout,
                                 use_ssh_client=bool(host and host.startswith("ssh://")))
        try:
            if not client.ping():
                return None, f"{where}: ping did not answer OK"
            return client.api.api_version, where
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - whatever failed, there is no usable engine
        return None, f"{where}: {type(e).__name__}: {str(e)[:300]}"


def resolve_backend(raw: str | None = None, timeout: float = DOCKER_PING_TIMEOUT) -> Backend:
    """Which backend runs the servers, from ``$VLLM_MM_EVENTS_SERVICES`` (or ``raw``)."""
    choice = services_choice(raw)
    if choice == "native":
        return Backend("native", f"{SERVICES_ENV}=native")
    api, where = ping_docker(timeout)
    if api:
        return Backend("containers", f"{SERVICES_ENV}={choice}: Docker engine at {where} answered (API {api})", api)
    if choice == "containers":
        raise ServicesUnavailable(
            f"{SERVICES_ENV}=containers, but no Docker engine answered within {timeout:g}s ({where}). "
            f"Start one (or point DOCKER_HOST at it), or set {SERVICES_ENV}=native or auto.")
    return Backend("native", f"{SERVICES_ENV}=auto: no Docker engine answered ({where})")


def make(service: str, backend: Backend | None = None) -> Server:
    """An unstarted server for ``service`` (kafka, minio, postgres) on ``backend`` (default: resolved now)."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}: expected one of {', '.join(SERVICES)}")
    backend = backend or resolve_backend()
    if backend.kind == "native":
        return NATIVE[service]()
    return CONTAINERS[service](docker_api=backend.docker_api)


def main(argv: list[str]) -> int:
    if argv[:1] == ["ensure"]:
        print("kafka jars:", kafka_libs())
        print("minio:", minio_binary())
        print("toxiproxy:", toxiproxy_binary())
        print("schema registry (apicurio):", apicurio_home(), "java:", java_for_registry())
        return 0
    if argv[:1] == ["run"]:
        backend = resolve_backend()
        k, m = make("kafka", backend).start(), make("minio", backend).start()
        print(f"{backend.reason}\nkafka {k.bootstrap} ({k.backend})\nminio {m.endpoint} ({m.backend}, "
              f"user {MINIO_USER})\nCtrl-C to stop", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            k.stop()
            m.stop()
        return 0
    print("usage: services.py ensure | run", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
