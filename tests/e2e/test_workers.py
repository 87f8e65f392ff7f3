"""`extproc serve --workers 2` through a real Envoy and Redis: both workers take traffic, the
supervisor's /metrics is their sum, key and limit changes reach every worker, every request is
billed once, a killed worker is restarted, SIGTERM stops them all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from extproc.devstack import Stack, free_port, free_ports_run
from extproc.envoyconf import LocalPorts
from tests.e2e.conftest import (
    Admin,
    extproc_status,
    ledger_records,
    make_stack,
    openai_client,
    scrape,
    total,
    write_config,
)

HI: list[Any] = [{"role": "user", "content": "hi"}]


def serve_command(config: Path, listen: str, metrics: str, *extra: str) -> list[str]:
    """`extproc serve` as an operator runs it."""
    py = [sys.executable, "-m", "extproc"]
    return [*py, "serve", "--config", str(config), "--listen", listen, "--metrics-listen", metrics, *extra]


def server_env(**extra: str) -> dict[str, str]:
    """The environment plus the provider keys gateway.yaml names (any value: nothing is called)."""
    return {**os.environ, "OPENAI_API_KEY": "x", "ANTHROPIC_API_KEY": "y", **extra}


def worker_status(stack: Stack) -> dict[str, Any]:
    r = httpx.get(f"http://127.0.0.1:{stack.ports.metrics}/status", timeout=5)
    assert r.status_code == 200
    out: dict[str, Any] = r.json()
    return out


def worker_requests(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = {}
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return total(samples, "gateway_requests_total")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[Stack, Admin]]:
    ports = LocalPorts(
        listener=free_port(), admin=free_port(), extproc=free_ports_run(2), mock=free_port(), metrics=free_port()
    )
    overrides = {"server": {"workers": 2, "worker_listen": "ports"}}
    stack, admin = make_stack(
        tmp_path_factory.mktemp("workers"),
        redis_url,
        prefix=f"wk{uuid.uuid4().hex[:8]}:",
        overrides=overrides,
        ports=ports,
        workers=2,
        extproc_endpoints=2,
    )
    stack.start()
    yield stack, admin
    stack.stop()


def test_check_accepts_one_endpoint_per_worker_and_names_a_missing_one(workers: tuple[Stack, Admin]) -> None:
    stack, _ = workers
    envoy = str(stack.workdir / "envoy.yaml")  # the stack's: two extproc endpoints
    env = server_env()
    out = {}
    for n in (2, 3):
        server = {"workers": n, "worker_listen": "ports", "listen": f"127.0.0.1:{stack.ports.extproc}"}
        config = write_config(stack.workdir / f"check{n}", redis=True, overrides={"server": server})
        out[n] = subprocess.run(
            [sys.executable, "-m", "extproc", "check", "--config", str(config), "--envoy", envoy],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
    assert out[2].returncode == 0, out[2].stdout + out[2].stderr
    assert out[3].returncode != 0
    missing = f"127.0.0.1:{stack.ports.extproc + 2}, not endpoints of envoy.yaml cluster 'extproc'"
    assert missing in out[3].stdout + out[3].stderr


def test_both_workers_serve_and_metrics_are_their_sum(workers: tuple[Stack, Admin]) -> None:
    stack, admin = workers
    secret, _ = admin.key("e2e", f"wk{uuid.uuid4().hex[:6]}")
    client = openai_client(stack, secret)
    status = worker_status(stack)
    ops_ports = [w["ops_port"] for w in status["workers"]]
    assert len(ops_ports) == 2 and all(ops_ports)
    before = [worker_requests(p) for p in ops_ports]
    summed_before = total(scrape(stack), "gateway_requests_total")
    for _ in range(40):
        client.chat.completions.create(model="gpt-5.5", messages=HI)
    time.sleep(0.5)  # metrics are recorded in each request's finish
    after = [worker_requests(p) for p in ops_ports]
    grew = [a - b for a, b in zip(after, before, strict=True)]
    print(f"requests per worker: {grew}")
    assert sum(grew) == 40
    assert all(g >= 5 for g in grew), f"a worker took (almost) nothing: {grew}"
    samples = scrape(stack)
    assert total(samples, "gateway_requests_total") - summed_before == 40
    assert total(samples, "gateway_workers") == 2
    assert total(samples, "gateway_worker_up") == 2
    assert total(samples, "gateway_build_info") == 1  # the same build in both: not summed
    status = worker_status(stack)
    assert status["ready"] is True and status["store"] == "redis"
    listens = sorted(w["listen"] for w in status["workers"])
    assert listens == [f"127.0.0.1:{stack.ports.extproc}", f"127.0.0.1:{stack.ports.extproc + 1}"]
    ready = httpx.get(f"http://127.0.0.1:{stack.ports.metrics}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    for port in ops_ports:  # each worker froze what it built at start (no full GC walks it)
        assert httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()["gc_frozen_objects"] > 10_000
    out = extproc_status(f"http://127.0.0.1:{stack.ports.metrics}")
    assert out.returncode == 0, out.stderr
    for w in status["workers"]:
        assert re.search(rf"worker {w['index']} +pid {w['pid']} on {re.escape(w['listen'])}, ready", out.stdout)


def test_every_request_billed_once_across_workers(workers: tuple[Stack, Admin]) -> None:
    stack, admin = workers
    secret, _ = admin.key("e2e", f"bill{uuid.uuid4().hex[:6]}")
    client = openai_client(stack, secret)
    ids = []
    for i in range(20):
        stream = i % 2 == 0
        raw = client.chat.completions.with_raw_response.create(model="gpt-5.5", messages=HI, stream=stream)
        if stream:
            for _ in raw.parse():
                pass
        ids.append(raw.headers["x-gateway-request-id"])
    deadline = time.monotonic() + 20
    while True:
        records = [r for r in ledger_records(admin.config, {"REDIS_URL": admin.redis_url or ""}) if r.request_id in ids]
        if len(records) >= 20 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert sorted(r.request_id for r in records) == sorted(ids)  # each once
    assert all(r.output_tokens > 0 and Decimal(r.cost_usd or "0") > 0 for r in records)


def test_key_and_limit_changes_reach_every_worker(workers: tuple[Stack, Admin]) -> None:
    stack, admin = workers
    tenant = f"wk{uuid.uuid4().hex[:8]}"
    secret, key = admin.key(tenant, "k")
    client = openai_client(stack, secret)
    for _ in range(10):  # both workers have the key cached
        client.chat.completions.create(model="gpt-5.5", messages=HI)
    done = admin.cli("limits", "set", "--tenant", tenant, "--rpm", "3")
    assert done.returncode == 0, done.stderr
    time.sleep(0.5)
    passed = 0
    for _ in range(12):
        try:
            client.with_options(max_retries=0).chat.completions.create(model="gpt-5.5", messages=HI)
            passed += 1
        except openai.RateLimitError as err:
            assert err.code == "rate_limit_exceeded"
    assert passed == 3  # one limit across both workers, not 3 per worker
    assert admin.cli("keys", "revoke", key.id).returncode == 0
    time.sleep(1.0)
    for _ in range(10):
        with pytest.raises(openai.AuthenticationError):
            client.with_options(max_retries=0).chat.completions.create(model="gpt-5.5", messages=HI)


def test_a_killed_worker_is_restarted(workers: tuple[Stack, Admin]) -> None:
    stack, admin = workers
    status = worker_status(stack)
    victim = status["workers"][1]
    os.kill(int(victim["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = worker_status(stack)
        w = now["workers"][1]
        if w["restarts"] == 1 and w["ready"] and w["pid"] != victim["pid"]:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"worker not restarted: {now}")
    secret, _ = admin.key("e2e", f"after{uuid.uuid4().hex[:6]}")
    client = openai_client(stack, secret)
    for _ in range(20):
        client.chat.completions.create(model="gpt-5.5", messages=HI)
    assert total(scrape(stack), "gateway_worker_restarts_total", worker="1") == 1


def test_sigterm_stops_every_worker(tmp_path: Path, redis_url: str) -> None:
    """Also: a worker's death closes its pipe (no orphan keeps the port)."""
    config = write_config(tmp_path, redis=True, overrides={"server": {"workers": 2}})
    port, metrics = free_port(), free_port()
    env = server_env(REDIS_URL=redis_url)
    proc = subprocess.Popen(
        serve_command(config, f"127.0.0.1:{port}", f"127.0.0.1:{metrics}"),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        pids: list[int] = []
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{metrics}/status", timeout=2).json()
                if status["ready"]:
                    pids = [w["pid"] for w in status["workers"]]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert len(pids) == 2, "two workers on one port (reuse_port) did not start"
        assert {w["listen"] for w in status["workers"]} == {f"127.0.0.1:{port}"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
    assert "worker-0" in err and "worker-1" in err, err


@pytest.mark.parametrize(
    ("overrides", "args", "message"),
    [
        ({"server": {"workers": 2}}, [], "need store.backend redis"),
        ({}, ["--workers", "2"], "need store.backend redis"),
        ({"server": {"worker_listen": "ports"}}, [], "set a number with worker_listen: ports"),
    ],
)
def test_workers_refused_where_they_cannot_work(
    tmp_path: Path, overrides: dict[str, Any], args: list[str], message: str
) -> None:
    config = write_config(tmp_path, redis=False, overrides=overrides)
    done = subprocess.run(
        serve_command(config, "127.0.0.1:0", "off", *args),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=server_env(),
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_that_cannot_start_stops_the_rest(tmp_path: Path, redis_url: str) -> None:
    """Port taken by another program: restarting would fail the same way, so the whole exits."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    config = write_config(tmp_path, redis=True, overrides={"server": {"workers": 2}})
    try:
        done = subprocess.run(
            serve_command(config, f"127.0.0.1:{port}", "off"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=server_env(REDIS_URL=redis_url),
        )
    finally:
        blocker.close()
    assert done.returncode != 0
    assert "before it started" in done.stderr, done.stderr


def test_shedding_connections_under_load_fails_no_request(tmp_path: Path, redis_url: str) -> None:
    """reuse_port rebalancing GOAWAYs a busy worker's connection while Envoy keeps sending on it:
    the two-step GOAWAY must let every stream already on the wire run (a plain GOAWAY refused
    them, and Envoy answered those requests 500)."""
    stack, admin = make_stack(
        tmp_path,
        redis_url,
        prefix=f"wk{uuid.uuid4().hex[:8]}:",
        overrides={"server": {"workers": 2, "worker_listen": "reuse_port"}},
        workers=2,
    )
    stack.start()
    try:
        secret, _ = admin.key("e2e", "shed")
        ops = [w["ops_port"] for w in worker_status(stack)["workers"]]
        stop = threading.Event()
        statuses: list[int] = []

        def load() -> None:
            with httpx.Client(base_url=stack.base_url, headers={"authorization": f"Bearer {secret}"}) as c:
                while not stop.is_set():
                    r = c.post("/v1/chat/completions", json={"model": "gpt-5.5", "messages": HI})
                    statuses.append(r.status_code)

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        shed = 0
        try:
            # A worker sheds only while it holds two of Envoy's connections (the kernel's pick):
            # go on until a few sheds happened.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and shed < 4:
                for port in ops:
                    shed += bool(httpx.post(f"http://127.0.0.1:{port}/shed", timeout=5).json()["shed"])
                time.sleep(0.25)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        print(f"{len(statuses)} requests, {shed} connections shed")
        assert shed >= 2
        assert len(statuses) > 100
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    finally:
        stack.stop()
