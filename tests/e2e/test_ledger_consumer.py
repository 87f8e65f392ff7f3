"""`ledger.consumer: false`: the servers leave the ledger to `extproc db consume`, a process of its
own. Through real Envoy, the real server and a real Redis: the server never opens the ledger, its
records wait in Redis, and the separate consumer moves every one of them, once, then stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from redis import Redis

from extproc.devstack import Stack, free_port
from extproc.store.redis import tenant_tag

from .conftest import extproc_status, grown, ledger_records, make_stack, scrape, scrape_port, series

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hello"}]}
TENANT = "apart"


def stream_ids(redis_url: str, prefix: str) -> list[str]:
    """Request ids of the records waiting in the tenant's usage stream."""
    with Redis.from_url(redis_url, decode_responses=True) as r:
        entries = r.xrange(f"{prefix}{tenant_tag(TENANT)}:usage")
    return [json.loads(fields["data"])["request_id"] for _, fields in entries]


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_records_wait_in_redis_until_db_consume_moves_them(
    tmp_path: Path, redis_url: str, request: pytest.FixtureRequest, db: str
) -> None:
    """SQLite (the default ledger) and PostgreSQL (production's): on PostgreSQL the server starts
    without the URL's variable in its environment, though gateway.yaml names it (it never opens
    the ledger); only the consumer has it."""
    ledger: dict[str, object] = {"consumer": False}
    db_env: dict[str, str] = {}
    if db == "postgres":
        # A name nobody's environment has: the server cannot find it anywhere.
        name = f"LEDGER_URL_{uuid.uuid4().hex[:8].upper()}"
        ledger["database_url_env"] = name
        db_env = {name: request.getfixturevalue("pg_schema_url")}
    stack, admin = make_stack(tmp_path, redis_url, overrides={"ledger": ledger})
    assert not set(db_env) & {*os.environ, *stack.env}
    if db_env:
        done = admin.cli("db", "migrate", env=db_env)
        assert done.returncode == 0, done.stderr
    secret, _ = admin.key(TENANT, "k")
    prefix = admin.config.store.redis_prefix
    ledger_path = admin.config.ledger_path

    def in_ledger() -> list[str]:
        if not db_env and not ledger_path.exists():
            return []
        return [rec.request_id for rec in ledger_records(admin.config, db_env)]

    stack.start()
    consumer: subprocess.Popen[str] | None = None
    try:
        sent: list[str] = []
        with httpx.Client(base_url=stack.base_url, headers={"authorization": f"Bearer {secret}"}, timeout=30) as c:
            for i in range(6):
                r = c.post(CHAT, json={**BODY, "stream": i % 2 == 1})
                assert r.status_code == 200, r.text
                sent.append(r.headers["x-gateway-request-id"])
        # A server that ran a consumer would have moved them within ~0.1 s.
        time.sleep(1.5)
        assert sorted(stream_ids(redis_url, prefix)) == sorted(sent)
        assert not ledger_path.exists(), "the server opened the ledger itself"
        assert in_ledger() == []

        ops_port = free_port()
        consumer = subprocess.Popen(
            [
                sys.executable,
                *("-m", "extproc", "db", "consume", "--config", str(admin.config_path)),
                *("--metrics-listen", f"127.0.0.1:{ops_port}"),
            ],
            env={**os.environ, "REDIS_URL": redis_url, **db_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        got: list[str] = []
        while time.monotonic() < deadline:
            got = in_ledger()
            if set(sent) <= set(got):
                break
            assert consumer.poll() is None, consumer.communicate()
            time.sleep(0.2)
        assert sorted(got) == sorted(sent), "every record in the ledger, once"
        records = {rec.request_id: rec for rec in ledger_records(admin.config, db_env)}
        assert [records[rid].stream for rid in sent] == [False, True] * 3
        assert all(records[rid].tenant == TENANT and records[rid].output_tokens > 0 for rid in sent)
        # Acknowledged and deleted from the stream once committed.
        deadline = time.monotonic() + 10
        while stream_ids(redis_url, prefix) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stream_ids(redis_url, prefix) == []

        # Its ops port: what it moved, and the backlog (measured every 5 s) back to zero.
        deadline = time.monotonic() + 15
        while True:
            m = scrape_port(ops_port)
            if m.get(series("gateway_ledger_backlog_records")) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert m[series("gateway_ledger_records_total", result="inserted")] == 6
        assert m[series("gateway_ledger_records_total", result="dead_lettered")] == 0
        assert m[series("gateway_ledger_backlog_records")] == 0
        assert m[series("gateway_ledger_insert_failures_total")] == 0
        status = httpx.get(f"http://127.0.0.1:{ops_port}/status", timeout=5).json()
        assert status["role"] == "ledger consumer" and status["records_inserted"] == 6 and status["ready"]
        assert httpx.get(f"http://127.0.0.1:{ops_port}/healthz", timeout=5).status_code == 200
        shown = extproc_status(f"http://127.0.0.1:{ops_port}")
        assert shown.returncode == 0, shown.stderr
        assert "ledger consumer" in shown.stdout and "records inserted" in shown.stdout
        assert "0 records in Redis" in shown.stdout

        consumer.send_signal(signal.SIGTERM)
        _, err = consumer.communicate(timeout=20)
        assert consumer.returncode == 0, err
        assert "6 records inserted" in err
        consumer = None
    finally:
        if consumer is not None:
            consumer.kill()
            consumer.wait(10)
        stack.stop()


def test_db_consume_refuses_the_embedded_backend(tmp_path: Path) -> None:
    _, admin = make_stack(tmp_path, None)
    done = admin.cli("db", "consume")
    assert done.returncode == 2
    assert "store.backend is embedded" in done.stderr


def test_a_server_running_the_consumer_exports_its_figures(stack: Stack, api_key: str) -> None:
    """The session's stack (Redis backend, the consumer in the server): its /metrics carry the same
    gateway_ledger_* figures, and a served request's record counts as inserted."""
    families: set[str] = set()
    before = scrape(stack, families)
    assert {"gateway_ledger_records", "gateway_ledger_insert_failures", "gateway_ledger_backlog_records"} <= families
    r = httpx.post(f"{stack.base_url}{CHAT}", json=BODY, headers={"authorization": f"Bearer {api_key}"}, timeout=30)
    assert r.status_code == 200
    got = grown(stack, before, {series("gateway_ledger_records_total", result="inserted"): 1}, wait=10)
    assert got[series("gateway_ledger_records_total", result="inserted")] >= 1
