"""Shared fixtures. Redis: a throwaway server per test session, never a shared instance.
PostgreSQL: a database per test session (tests/pgfixture.py), dropped afterwards."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.devstack import free_port, tcp_open, wait_until
from tests.pgfixture import pg_schema_url, pg_url

__all__ = ["pg_schema_url", "pg_url"]


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """testcontainers when a Docker engine answers; otherwise `redis-server` from PATH on a free
    port (scripts/test installs it when missing)."""
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (bash scripts/test installs it)")
    port = free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until("redis-server", lambda: tcp_open(port), [proc], 10)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
