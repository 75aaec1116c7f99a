"""Shared fixtures: real servers, the tiny model, markers, and CI strictness.

In CI (``CI=true``) a skipped test is a failure: end-to-end tests must run, not skip.

The servers run natively or in containers (``$VLLM_MM_EVENTS_SERVICES``, see tests/support/services.py).
Every test is marked with what it needs (``kafka``, ``minio``, ``postgres``, ``toxiproxy``,
``schema_registry``, ``vllm``, ``helm``), from the fixtures it uses, so ``pytest -m "not (kafka or minio or
postgres or toxiproxy or schema_registry or vllm or helm)"`` runs the tests that need none of them.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))

import services  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# ---- markers --------------------------------------------------------------------------------

MARKERS = {
    "kafka": "needs the Kafka broker (fixture kafka; native or container)",
    "minio": "needs the MinIO S3 server (fixture minio; native or container)",
    "postgres": "needs PostgreSQL + pgvector (fixture postgres; native or container)",
    "toxiproxy": "puts Toxiproxy (network faults) between a client and a server (fixture toxiproxy; native)",
    "schema_registry": "needs the Confluent-compatible Schema Registry (fixture schema_registry: Apicurio; native)",
    "vllm": "runs the real vLLM engine on a tiny model (fixtures tiny_llava, tiny_qwen2_vl, tiny_qwen2_audio)",
    "helm": "runs the helm and kubeconform CLIs (tests/helm)",
}
# Fixture -> marker; item.fixturenames includes fixtures used through other fixtures.
FIXTURE_MARKERS = {"kafka": "kafka", "minio": "minio", "postgres": "postgres", "tiny_llava": "vllm",
                   "tiny_qwen2_vl": "vllm", "tiny_qwen2_audio": "vllm",
                   "toxiproxy": "toxiproxy", "proxied_kafka": "kafka", "schema_registry": "schema_registry",
                   "schema_registry_with_auth": "schema_registry"}
# Parametrized fixtures that reach a server through request.getfixturevalue() for one param only,
# which item.fixturenames cannot see: (fixture, param) -> marker. A test that uses a server fixture
# without its marker fails at teardown (see _markers_cover_the_servers_used), so a gap here shows.
DYNAMIC_FIXTURE_MARKERS = {
    ("sink_and_reader", "kafka"): "kafka",  # tests/contract/test_event_sink.py
    ("store", "s3"): "minio",  # tests/contract/test_object_store.py
    ("sink_uri", "pgvector"): "postgres",  # tests/contract/test_vector_sink.py
    ("shared_sink_uri", "pgvector"): "postgres",  # tests/contract/test_vector_sink.py
    ("stream", "kafka"): "kafka",  # tests/contract/test_event_source.py
    ("dlq", "kafka"): "kafka",  # tests/contract/test_dead_letters.py
    ("family_run", "qwen2_vl"): "vllm",  # tests/e2e/test_modalities.py
    ("family_run", "qwen2_audio"): "vllm",
}
PATH_MARKERS = {Path(__file__).parent / "helm": "helm"}


def markers_for(fixturenames, params: dict, path: Path) -> set[str]:
    """The markers a test gets from its fixtures, its fixtures' params and its path."""
    marks = {FIXTURE_MARKERS[f] for f in fixturenames if f in FIXTURE_MARKERS}
    marks |= {m for (fixture, param), m in DYNAMIC_FIXTURE_MARKERS.items()
              if fixture in fixturenames and params.get(fixture) == param}
    marks |= {m for directory, m in PATH_MARKERS.items() if Path(path).is_relative_to(directory)}
    return marks


def pytest_configure(config):
    # Also registered here, so the markers work whatever pyproject.toml says (once: `pytest --markers`).
    registered = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, help_text in MARKERS.items():
        if name not in registered:
            config.addinivalue_line("markers", f"{name}: {help_text}")
    try:
        services.services_choice()  # a typo fails the run at once, not in the first server fixture
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        for name in sorted(markers_for(item.fixturenames, callspec.params if callspec else {}, item.path)):
            item.add_marker(name)


@pytest.fixture(autouse=True)
def _markers_cover_the_servers_used(request):
    """After each test, request.fixturenames also lists fixtures fetched with getfixturevalue(); one
    that needs a server its markers do not name would make ``-m "not kafka"`` start Kafka anyway."""
    yield
    needed = {FIXTURE_MARKERS[f] for f in request.fixturenames if f in FIXTURE_MARKERS}
    missing = needed - {m.name for m in request.node.iter_markers()}
    if missing:
        pytest.fail(f"{request.node.nodeid} uses a fixture that needs {sorted(missing)} but is not marked so; "
                    f"add its (fixture, param) to DYNAMIC_FIXTURE_MARKERS in tests/conftest.py", pytrace=False)


# ---- CI strictness, summary -------------------------------------------------------------------

def pytest_runtest_logreport(report):
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"


SERVERS_RAN: list[str] = []


def announce(config, line: str) -> None:
    """Remember which real server ran; the summary prints it (see pytest_terminal_summary)."""
    SERVERS_RAN.append(line)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.section("servers that ran")
    for line in SERVERS_RAN or ["none (no test needed one)"]:
        terminalreporter.write_line(f"[services] {line}")


# ---- servers ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def services_backend(pytestconfig) -> services.Backend:
    """Native servers or containers, resolved once (a Docker ping at most)."""
    backend = services.resolve_backend()
    announce(pytestconfig, f"backend {backend.kind}: {backend.reason}")
    return backend


@pytest.fixture(scope="session")
def kafka(pytestconfig, services_backend):
    broker = services.make("kafka", services_backend).start()
    announce(pytestconfig, f"Kafka ({broker.backend}): {broker.name} at {broker.bootstrap}")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def minio(pytestconfig, services_backend):
    server = services.make("minio", services_backend).start()
    announce(pytestconfig, f"S3 ({server.backend}): {server.name} at {server.endpoint}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres(pytestconfig, services_backend):
    server = services.make("postgres", services_backend).start()
    announce(pytestconfig, f"PostgreSQL ({server.backend}): {server.name} at {server.host}:{server.port}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def toxiproxy(pytestconfig) -> services.ToxiproxyServer:
    """Toxiproxy, native on any backend (a Go binary: nothing to containerize); tests make their proxies
    with ``toxiproxy.proxy(...)`` and delete them when done."""
    server = services.ToxiproxyServer().start()
    announce(pytestconfig, f"Toxiproxy (native): {server.name} (reports {server.version!r}) at {server.api}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def schema_registry(pytestconfig) -> services.SchemaRegistryServer:
    """Apicurio Registry, native on any backend (a JVM distribution from Maven Central), used through its
    Confluent-compatible API at ``schema_registry.url``. Tests use subjects of their own; one that kills or
    pauses it brings it back before it ends (its storage survives a restart)."""
    server = services.SchemaRegistryServer().start()
    announce(pytestconfig, f"Schema Registry (native): {server.name} at {server.url}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def schema_registry_with_auth(pytestconfig) -> services.SchemaRegistryServer:
    """A second registry that takes only HTTP basic auth (``server.user_info``), for the clients' auth settings."""
    server = services.SchemaRegistryServer(user_info=services.REGISTRY_USER_INFO).start()
    announce(pytestconfig, f"Schema Registry (native, basic auth): {server.name} at {server.url}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxied_kafka(pytestconfig, toxiproxy):
    """(broker, proxy): a native Kafka broker of the module's own behind a Toxiproxy proxy, leaving the
    session's ``kafka`` untouched by the faults. The broker advertises the proxy's port (see
    ``KafkaBroker(advertised_port=...)``), so a client bootstrapped at ``proxy.listen`` stays behind the
    proxy, while ``broker.bootstrap`` reaches the broker directly (to check what it holds)."""
    listen = services.free_port()
    broker = services.KafkaBroker(advertised_port=listen)
    proxy = toxiproxy.proxy(f"kafka-{uuid.uuid4().hex[:8]}", f"127.0.0.1:{broker.proxied_port}", listen)
    try:
        broker.start()
        announce(pytestconfig, f"Kafka (native, own broker behind Toxiproxy): {broker.name} at {broker.bootstrap}, "
                               f"proxied at {proxy.listen}")
        yield broker, proxy
    finally:
        broker.stop()
        proxy.delete()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from publisher.vllm.demo import tiny_llava

    return tiny_llava.build(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    import tiny_qwen2_vl

    return tiny_qwen2_vl.build(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def tiny_qwen2_audio(tmp_path_factory) -> Path:
    import tiny_qwen2_audio

    return tiny_qwen2_audio.build(tmp_path_factory.mktemp("models") / "tiny-qwen2-audio")
