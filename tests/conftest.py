"""Shared fixtures: real servers, the tiny model, and CI strictness.

In CI (``CI=true``) a skipped test is a failure: end-to-end tests must run, not skip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))

import services  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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


@pytest.fixture(scope="session")
def kafka(pytestconfig):
    broker = services.KafkaBroker().start()
    announce(pytestconfig, f"Kafka: {broker.name} at {broker.bootstrap}")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def minio(pytestconfig):
    server = services.MinioServer().start()
    announce(pytestconfig, f"S3: {server.name} at {server.endpoint}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres(pytestconfig):
    server = services.PostgresServer().start()
    announce(pytestconfig, f"PostgreSQL: {server.name} at 127.0.0.1:{server.port}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from publisher.demo import tiny_llava

    return tiny_llava.build(tmp_path_factory.mktemp("models") / "tiny-llava")
