"""Shared fixtures: real Redis, real MLflow registry, real servers, the reference model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.procs import REFERENCE, RedisServer, Server, bootstrap_registry


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole run (killable by tests that need it)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """REDIS_URL when given, else the private server's URL."""
    return os.environ.get("TEST_REDIS_URL") or redis_server.url


@pytest.fixture(scope="session")
def registry_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A fresh sqlite MLflow registry bootstrapped with the reference model."""
    return bootstrap_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The committed reference model package."""
    return REFERENCE


@pytest.fixture
def start_server(
    tmp_path: Path, registry_env: dict[str, str], redis_url: str
) -> Iterator[Callable[..., Server]]:
    """Factory: start a real Granian server with extra env; all stopped at teardown."""
    started: list[Server] = []

    def start(wait_ready: bool = True, **env: str) -> Server:
        full = {
            **registry_env,
            "REDIS_URL": redis_url,
            "HEIMDALL_POOL_WORKERS": "2",
            "HEIMDALL_LOG_LEVEL": "INFO",
            "OTEL_SDK_DISABLED": "false",
            **env,
        }
        server = Server(full, tmp_path / f"server-{len(started)}.log")
        started.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, registry_env: dict[str, str], redis_url: str
) -> Iterator[Server]:
    """One server per module for read-mostly tests."""
    env = {
        **registry_env,
        "REDIS_URL": redis_url,
        "HEIMDALL_POOL_WORKERS": "2",
        "HEIMDALL_CACHE_PREFIX": f"heimdall:test:{os.getpid()}:",
    }
    server = Server(env, tmp_path_factory.mktemp("srv") / "server.log").start()
    yield server
    server.stop()
