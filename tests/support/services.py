"""Real servers for tests and benchmarks, started on loopback without Docker.

- Apache Kafka (KRaft, single node): jars from Maven Central, fetched once with Maven.
- MinIO: built once from the Go module proxy (AGPL-3.0: run unmodified as a test server,
  never shipped).
- PostgreSQL 16 + pgvector: the binaries inside the ``pgserver`` wheel, run as a real server
  on a TCP port with password auth (as a dedicated non-root user when we are root).

Binaries are cached under ``$VLLM_MM_EVENTS_CACHE`` (default ``~/.cache/vllm-mm-events``),
keyed by version. ``python tests/support/services.py ensure`` fetches/builds them;
``... run`` starts both and prints their addresses (for manual work).
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

KAFKA_VERSION = "4.1.1"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"  # github.com/minio/minio, Feb 2026
CACHE = Path(os.environ.get("VLLM_MM_EVENTS_CACHE", Path.home() / ".cache" / "vllm-mm-events"))
MINIO_USER, MINIO_PASSWORD = "mmevents", "mmevents-secret-key"

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


class KafkaBroker:
    name = f"Apache Kafka {KAFKA_VERSION} (KRaft, single node)"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kafka-"))
        self.port, self.controller_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "KafkaBroker":
        libs = kafka_libs()
        props = self.dir / "server.properties"
        props.write_text("\n".join([
            "process.roles=broker,controller", "node.id=1",
            f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={self.dir / 'data'}",
            "offsets.topic.replication.factor=1", "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1", "group.initial.rebalance.delay.ms=0",
            "num.partitions=3", "auto.create.topics.enable=true", "",
        ]))
        cp = f"{libs}/*"
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        subprocess.run(["java", "-cp", cp, "kafka.tools.StorageTool", "format", "--standalone", f"--cluster-id={cluster_id}",
                        "-c", str(props)], check=True, capture_output=True)
        log = self.dir / "kafka.log"
        self.proc = subprocess.Popen(
            ["java", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", cp, "kafka.Kafka", str(props)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.stop)  # never leave a broker behind, even if the caller forgets
        wait_port(self.port, 90, self.proc, log)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            md = admin.list_topics(timeout=5)
            if md.brokers:
                return
            time.sleep(0.2)
        raise TimeoutError("Kafka broker did not report itself ready")

    def stop(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


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


class MinioServer:
    name = f"MinIO {MINIO_VERSION}"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="minio-"))
        self.port, self.console_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs (credentials through the standard AWS variables)."""
        return {"AWS_ACCESS_KEY_ID": MINIO_USER, "AWS_SECRET_ACCESS_KEY": MINIO_PASSWORD,
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> "MinioServer":
        log = self.dir / "minio.log"
        env = dict(os.environ, MINIO_ROOT_USER=MINIO_USER, MINIO_ROOT_PASSWORD=MINIO_PASSWORD,
                   MINIO_BROWSER="off", MINIO_UPDATE="off")
        self.proc = subprocess.Popen(
            [str(minio_binary()), "server", "--quiet", "--address", f"127.0.0.1:{self.port}",
             "--console-address", f"127.0.0.1:{self.console_port}", str(self.dir / "data")],
            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.stop)
        wait_port(self.port, 60, self.proc, log)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/minio/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("MinIO did not become ready")

    def client(self):
        import boto3

        e = self.env
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name=e["AWS_REGION"])

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- PostgreSQL + pgvector ------------------------------------------------------------------

PG_USER, PG_PASSWORD, PG_DB = "mmevents", "mmevents-pg-secret", "vectors"
PG_SYSTEM_USER = "mmevents-pg"  # PostgreSQL refuses to run as root


def postgres_bin() -> Path:
    """The wheel's PostgreSQL 16 + pgvector. As root, a copy in a world-readable directory:
    the server runs as another user, who may not traverse into a private checkout's .venv."""
    import pgserver
    from importlib.metadata import version

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


class PostgresServer:
    name = "PostgreSQL 16 + pgvector (pgserver wheel binaries)"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.port = free_port()
        self._as_user: dict = {}

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{PG_DB}"

    def uri(self, table: str) -> str:
        """The sink URI; the password travels as PGPASSWORD, never in the URI."""
        return f"pgvector://{PG_USER}@127.0.0.1:{self.port}/{PG_DB}/{table}"

    @property
    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": PG_PASSWORD}

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


def main(argv: list[str]) -> int:
    if argv[:1] == ["ensure"]:
        print("kafka jars:", kafka_libs())
        print("minio:", minio_binary())
        return 0
    if argv[:1] == ["run"]:
        k, m = KafkaBroker().start(), MinioServer().start()
        print(f"kafka {k.bootstrap}\nminio {m.endpoint} (user {MINIO_USER})\nCtrl-C to stop", flush=True)
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
