"""PostgreSQL for tests: a database created for the test session and dropped after it.

The server on 127.0.0.1:5432 (user postgres, trust auth) when one answers; otherwise a private
server from the OS packages (initdb + postgres) in a temp directory, removed afterwards. Either way
no state survives a run. `pg_schema_url` adds a fresh schema per test (via search_path), so tests
start empty without paying for a database each.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from extproc.devstack import free_port, tcp_open, wait_until

# Overridable so the private-server path can be exercised on a machine that has a server.
ADMIN_URL = os.environ.get("EXTPROC_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _answers(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


def _pg_binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [p for p in [shutil.which(name)] if p]
    if not found:
        pytest.fail(f"no PostgreSQL answers on {ADMIN_URL} and {name} is not installed (apt-get install postgresql)")
    return found[-1]


@contextmanager
def private_server() -> Iterator[str]:
    """initdb + postgres on a free port; the admin URL. PostgreSQL refuses to run as root, so as
    root it runs as the `postgres` OS user the package creates."""
    initdb, postgres = _pg_binary("initdb"), _pg_binary("postgres")
    as_user: list[str] = []
    workdir = tempfile.mkdtemp(prefix="extproc-pg-")
    try:
        if os.geteuid() == 0:
            as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(workdir, "postgres")
        data = os.path.join(workdir, "data")
        subprocess.run(
            [*as_user, initdb, "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port = free_port()
        proc = subprocess.Popen(
            [*as_user, postgres, "-D", data, "-k", workdir, "-p", str(port), "-h", "127.0.0.1", "-c", "fsync=off"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            wait_until("postgres", lambda: tcp_open(port) and _answers(url), [proc], 30)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _with_db(url: str, dbname: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + dbname


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of an empty database with a random name, for this test session only."""
    with ExitStack() as stack:
        admin = ADMIN_URL if _answers(ADMIN_URL) else stack.enter_context(private_server())
        name = "extproc_test_" + secrets.token_hex(6)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield _with_db(admin, name)
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    """pg_url with a new empty schema first on the search_path, dropped after the test."""
    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield f"{pg_url}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
