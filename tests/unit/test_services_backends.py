"""The test servers' two backends (tests/support/services.py) and the markers tests/conftest.py adds.

No Docker engine is needed: where one must answer, a fake engine on loopback answers the two requests
a ping makes (``/version``, ``/_ping``) and records every request, so "built without contacting
Docker" is checked, not assumed.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import services

TESTS = Path(__file__).resolve().parents[1]
CONFTEST = TESTS / "conftest.py"
FAKE_API = "1.44"


def public(obj) -> set[str]:
    """Public names, without evaluating properties (a container's host needs it started)."""
    return {n for n in dir(obj) if not n.startswith("_")}


@pytest.fixture
def dead_docker_host(monkeypatch) -> str:
    """DOCKER_HOST at a loopback port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = f"tcp://127.0.0.1:{port}"
    monkeypatch.setenv("DOCKER_HOST", host)
    return host


class FakeEngine(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeEngineHandler)
        self.requests: list[str] = []


class FakeEngineHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path == "/version":
            body = json.dumps({"ApiVersion": FAKE_API, "MinAPIVersion": "1.24", "Version": "26.1.0"}).encode()
        elif self.path == f"/v{FAKE_API}/_ping":
            body = b"OK"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_engine(monkeypatch):
    engine = FakeEngine()
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{engine.server_address[1]}")
    yield engine
    engine.shutdown()
    engine.server_close()


# ---- selection --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["native", " Native "])
def test_native_is_taken_without_asking_docker(monkeypatch, value):
    monkeypatch.setenv(services.SERVICES_ENV, value)
    monkeypatch.setattr(services, "ping_docker", lambda *a, **k: pytest.fail("native must not ping Docker"))
    backend = services.resolve_backend()
    assert backend.kind == "native" and backend.docker_api is None
    server = services.make("kafka", backend)
    try:
        assert isinstance(server, services.KafkaBroker) and server.backend == "native"
    finally:
        server.stop()


@pytest.mark.parametrize("value", [None, "", "auto"])
@pytest.mark.parametrize("where", ["closed port", "missing socket"])
def test_auto_without_an_engine_is_native_and_quick(monkeypatch, tmp_path, dead_docker_host, value, where):
    if value is None:
        monkeypatch.delenv(services.SERVICES_ENV, raising=False)
    else:
        monkeypatch.setenv(services.SERVICES_ENV, value)
    host = dead_docker_host if where == "closed port" else f"unix://{tmp_path}/docker.sock"
    monkeypatch.setenv("DOCKER_HOST", host)
    t0 = time.monotonic()
    backend = services.resolve_backend()
    assert time.monotonic() - t0 < 3
    assert backend.kind == "native"
    assert host in backend.reason and "auto" in backend.reason


def test_auto_gives_up_on_an_engine_that_never_answers(monkeypatch):
    # Accepts connections (the kernel's backlog) but never replies: only the timeout ends the ping.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{s.getsockname()[1]}")
        t0 = time.monotonic()
        backend = services.resolve_backend("auto", timeout=0.5)
        took = time.monotonic() - t0
    assert backend.kind == "native"
    assert 0.4 < took < 2.5, took


def test_containers_without_an_engine_is_an_error_naming_the_variable(monkeypatch, dead_docker_host):
    monkeypatch.setenv(services.SERVICES_ENV, "containers")
    with pytest.raises(services.ServicesUnavailable, match="VLLM_MM_EVENTS_SERVICES=containers") as e:
        services.resolve_backend()
    assert dead_docker_host in str(e.value)
    with pytest.raises(services.ServicesUnavailable, match="VLLM_MM_EVENTS_SERVICES"):
        services.make("minio")  # what a server fixture does


@pytest.mark.parametrize("value", ["docker", "nativ", "1", "native,containers"])
def test_an_invalid_value_is_an_error_listing_the_choices(monkeypatch, value):
    monkeypatch.setenv(services.SERVICES_ENV, value)
    with pytest.raises(ValueError, match="VLLM_MM_EVENTS_SERVICES") as e:
        services.resolve_backend()
    assert all(choice in str(e.value) for choice in ("native", "containers", "auto"))


@pytest.mark.parametrize("value", ["auto", "containers"])
def test_an_answering_engine_gives_containers_with_its_api_version(monkeypatch, fake_engine, value):
    monkeypatch.setenv(services.SERVICES_ENV, value)
    backend = services.resolve_backend()
    assert (backend.kind, backend.docker_api) == ("containers", FAKE_API)
    assert fake_engine.requests == ["/version", f"/v{FAKE_API}/_ping"]
    for name in services.SERVICES:
        server = services.make(name, backend)
        assert isinstance(server, services.CONTAINERS[name])
        assert server.container.get_docker_client().client.api.api_version == FAKE_API
    assert len(fake_engine.requests) == 2  # building them asked the engine nothing


# ---- container definitions ----------------------------------------------------------------------

def test_definitions_are_built_without_contacting_docker(fake_engine):
    from testcontainers.core.container import DockerContainer

    servers = [cls() for cls in services.CONTAINERS.values()]
    assert fake_engine.requests == []
    for server in servers:
        with pytest.raises(RuntimeError, match="not started"):
            server.host  # noqa: B018
        server.stop()  # nothing started, nothing to do
    assert fake_engine.requests == []
    # The control: left to itself, testcontainers asks the engine at construction.
    DockerContainer("busybox:1.37")
    assert fake_engine.requests == ["/version"]


@pytest.mark.parametrize("name", services.SERVICES)
def test_images_are_pinned(name):
    cls = services.CONTAINERS[name]
    server = cls()
    assert server.container.image == cls.image
    repository, _, tag = cls.image.rpartition(":")
    assert repository and "/" not in tag and tag not in ("", "latest")
    assert server.backend == f"container {cls.image}"


def test_kafka_image_is_the_native_kafka_minor():
    # Confluent Platform x.y ships Apache Kafka (x-4).y.
    cp = [int(p) for p in services.KAFKA_IMAGE.rpartition(":")[2].split(".")]
    ak = [int(p) for p in services.KAFKA_VERSION.split(".")]
    assert services.KAFKA_IMAGE.startswith("confluentinc/cp-kafka:")
    assert (cp[0] - 4, cp[1]) == (ak[0], ak[1])


@pytest.mark.parametrize("name, port", [("kafka", 9093), ("minio", 9000), ("postgres", 5432)])
def test_exposed_ports(name, port):
    server = services.CONTAINERS[name]()
    assert server.container_port == port
    assert server.container.ports == {str(port): None}  # published on a random host port at start


def test_kafka_definition_is_kraft_with_the_native_broker_settings():
    env = services.KafkaContainerBroker().container.env
    assert services.KafkaContainerBroker().container.kraft_enabled
    for key, value in services.KAFKA_SETTINGS.items():
        assert env["KAFKA_" + key.upper().replace(".", "_")] == value, key
    assert services.KAFKA_SETTINGS["num.partitions"] == "3"


def test_minio_definition_has_the_native_credentials():
    container = services.MinioContainerServer().container
    assert (container.access_key, container.secret_key) == (services.MINIO_USER, services.MINIO_PASSWORD)
    assert container.env["MINIO_ROOT_USER"] == services.MINIO_USER
    assert container.env["MINIO_ROOT_PASSWORD"] == services.MINIO_PASSWORD


def test_postgres_definition_has_password_auth_and_the_database():
    container = services.PostgresContainerServer().container
    assert services.POSTGRES_IMAGE == "pgvector/pgvector:pg16"
    assert (container.username, container.password, container.dbname) == (
        services.PG_USER, services.PG_PASSWORD, services.PG_DB)
    assert {k: container.env[k] for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB",
                                          "POSTGRES_HOST_AUTH_METHOD")} == {
        "POSTGRES_USER": services.PG_USER, "POSTGRES_PASSWORD": services.PG_PASSWORD,
        "POSTGRES_DB": services.PG_DB, "POSTGRES_HOST_AUTH_METHOD": "scram-sha-256"}


# ---- same interface as the native servers ---------------------------------------------------------

@pytest.mark.parametrize("name", services.SERVICES)
def test_both_backends_offer_the_interface_tests_use(name):
    native, container = services.NATIVE[name](), services.CONTAINERS[name]()
    try:
        interface = set(services.INTERFACE[name])
        assert interface <= public(native), interface - public(native)
        assert interface <= public(container), interface - public(container)
        # Anything public on the native class is in the interface, hence on the container class too.
        assert public(services.NATIVE[name]) <= interface, public(services.NATIVE[name]) - interface
        for method in ("start", "stop", *(a for a in ("client", "create_bucket", "uri") if a in interface)):
            assert callable(getattr(native, method)) and callable(getattr(container, method))
    finally:
        native.stop()


def test_both_backends_give_the_same_addresses_for_the_same_host_and_port():
    """The clients' view (bootstrap, endpoint, env, dsn, uri) comes from host and port alone."""
    pairs = [(services.KafkaBroker(), services.KafkaContainerBroker(), ("bootstrap",)),
             (services.MinioServer(), services.MinioContainerServer(), ("endpoint", "env")),
             (services.PostgresServer(), services.PostgresContainerServer(), ("dsn", "env"))]
    for native, container, attrs in pairs:
        try:
            container._address = (native.host, native.port)  # as start() sets it
            for attr in attrs:
                assert getattr(container, attr) == getattr(native, attr), attr
        finally:
            container._address = None
            native.stop()
    # ... and natively they stay on loopback, as before the container backend.
    k, m, pg, pgc = services.KafkaBroker(), services.MinioServer(), services.PostgresServer(), \
        services.PostgresContainerServer()
    try:
        assert k.bootstrap == f"127.0.0.1:{k.port}" and m.endpoint == f"http://127.0.0.1:{m.port}"
        pgc._address = ("127.0.0.1", pg.port)
        assert pgc.uri("t") == pg.uri("t") == f"pgvector://{services.PG_USER}@127.0.0.1:{pg.port}/{services.PG_DB}/t"
    finally:
        for server in (k, m, pg):
            server.stop()


# ---- markers (tests/conftest.py) ------------------------------------------------------------------

@pytest.fixture
def conftest_module(request):
    return next(p for p in request.config.pluginmanager.get_plugins()
                if getattr(p, "__file__", None) and Path(p.__file__).resolve() == CONFTEST)


@pytest.mark.parametrize("fixturenames, params, path, expected", [
    (["tmp_path"], {}, "unit/test_x.py", set()),
    (["kafka", "tmp_path"], {}, "contract/test_x.py", {"kafka"}),
    # a module fixture that needs the engine, Kafka and MinIO: fixturenames holds the closure
    (["published", "tiny_llava", "kafka", "minio", "postgres"], {}, "e2e/test_x.py",
     {"vllm", "kafka", "minio", "postgres"}),
    (["sink_and_reader"], {"sink_and_reader": "kafka"}, "contract/test_x.py", {"kafka"}),
    (["sink_and_reader"], {"sink_and_reader": "file"}, "contract/test_x.py", set()),
    (["store"], {"store": "s3"}, "contract/test_x.py", {"minio"}),
    (["sink_uri"], {"sink_uri": "pgvector"}, "contract/test_x.py", {"postgres"}),
    (["sink_uri"], {"sink_uri": "qdrant"}, "contract/test_x.py", set()),
    (["rendered"], {}, "helm/test_chart.py", {"helm"}),
    # the module's own broker behind Toxiproxy: Kafka all the same, and Toxiproxy
    (["kafka_proxy", "proxied_kafka", "toxiproxy", "tmp_path"], {}, "backends/test_x.py", {"kafka", "toxiproxy"}),
    (["s3_proxy", "minio", "toxiproxy"], {}, "backends/test_x.py", {"minio", "toxiproxy"}),
])
def test_markers_for(conftest_module, fixturenames, params, path, expected):
    assert conftest_module.markers_for(fixturenames, params, TESTS / path) == expected


SYNTHETIC_CONFTEST = f"""
import runpy
# The real tests/conftest.py, hooks and fixtures, in this directory.
globals().update({{k: v for k, v in runpy.run_path({str(CONFTEST)!r}).items() if not k.startswith("__")}})
"""
SYNTHETIC_TESTS = """
import pytest

@pytest.fixture
def kafka():  # overrides the real server fixture: nothing starts
    return "broker"

@pytest.fixture
def tiny_llava():
    return "model"

@pytest.fixture
def published(tiny_llava, kafka):
    return "events"

@pytest.fixture(params=["file", "kafka"])
def sink_and_reader(request):  # listed in DYNAMIC_FIXTURE_MARKERS
    return request.getfixturevalue("kafka") if request.param == "kafka" else None

@pytest.fixture(params=["file", "kafka"])
def unlisted(request):  # not listed: its kafka param goes unmarked
    return request.getfixturevalue("kafka") if request.param == "kafka" else None

def test_plain():
    pass

def test_engine_and_broker(published):
    pass

def test_sink(sink_and_reader):
    pass

def test_unlisted(unlisted):
    pass
"""


def run_pytest(directory: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=directory,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})))


@pytest.fixture
def synthetic(tmp_path) -> Path:
    (tmp_path / "conftest.py").write_text(SYNTHETIC_CONFTEST)
    (tmp_path / "test_synthetic.py").write_text(textwrap.dedent(SYNTHETIC_TESTS))
    return tmp_path


def collected(directory: Path, expression: str) -> set[str]:
    r = run_pytest(directory, "--collect-only", "-m", expression)
    assert r.returncode in (0, 5), r.stdout + r.stderr
    return {line.split("::", 1)[1] for line in r.stdout.splitlines() if "::" in line}


def test_markers_select_through_the_real_hook(synthetic):
    assert collected(synthetic, "kafka") == {"test_engine_and_broker", "test_sink[kafka]"}
    assert collected(synthetic, "vllm") == {"test_engine_and_broker"}
    assert collected(synthetic, "not (kafka or minio or postgres or vllm or helm)") == {
        "test_plain", "test_sink[file]", "test_unlisted[file]", "test_unlisted[kafka]"}


def test_markers_are_registered_without_pyproject(synthetic):
    r = run_pytest(synthetic, "--markers")
    lines = [line for line in r.stdout.splitlines() if line.startswith("@pytest.mark.")]
    for name in ("kafka", "minio", "postgres", "vllm", "helm"):
        assert sum(line.startswith(f"@pytest.mark.{name}:") for line in lines) == 1, name


def test_a_server_fixture_reached_without_its_marker_fails_the_test(synthetic):
    r = run_pytest(synthetic, "-m", "not kafka", "-rA")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "ERROR at teardown of test_unlisted[kafka]" in out
    assert "needs ['kafka'] but is not marked so" in out and "DYNAMIC_FIXTURE_MARKERS" in out
    assert "4 passed, 2 deselected, 1 error" in out


def test_an_invalid_services_value_stops_the_run_at_once(synthetic):
    r = run_pytest(synthetic, "--collect-only", env={services.SERVICES_ENV: "dockr"})
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, r.stdout + r.stderr
    assert "VLLM_MM_EVENTS_SERVICES='dockr'" in r.stderr
