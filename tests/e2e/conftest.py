"""End-to-end fixtures: the real Envoy binary, the real server (via the CLI), the mock provider and
a real redis-server, on free loopback ports, started exactly as `extproc dev` starts them.

The mock provider only accepts the *provider* keys below, so any request that reaches it with a
virtual key (or none) fails loudly: credential swapping is checked on every e2e request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.accounting.record import UsageRecord
from extproc.auth import key_service
from extproc.auth.keys import VirtualKey
from extproc.auth.service import KeyService
from extproc.config import GatewayConfig, load_config
from extproc.devstack import Stack, free_port
from extproc.envoyconf import LocalPorts
from extproc.ledger import open_ledger
from extproc.pipeline import Stage
from extproc.providers import ADAPTERS
from extproc.server import build_runtime, create_server

ROOT = Path(__file__).resolve().parents[2]
PROVIDER_KEYS = {"OPENAI_API_KEY": "sk-provider-openai-e2e-0000", "ANTHROPIC_API_KEY": "sk-ant-provider-e2e-0000"}
MOCK_ENV = {
    "MOCK_OPENAI_KEY": PROVIDER_KEYS["OPENAI_API_KEY"],
    "MOCK_ANTHROPIC_KEY": PROVIDER_KEYS["ANTHROPIC_API_KEY"],
}
T = TypeVar("T")


def free_ports() -> LocalPorts:
    return LocalPorts(
        listener=free_port(), admin=free_port(), extproc=free_port(), mock=free_port(), metrics=free_port()
    )


def write_config(
    workdir: Path, redis: bool, prefix: str | None = None, overrides: dict[str, Any] | None = None
) -> Path:
    """The shipped gateway.yaml with the store pointed at this test's Redis prefix or a tmp file, and
    `overrides` (top-level sections, merged one level deep) on top."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    # The mock provider is steered by x-mock-* headers: let them through the per-provider allow-list.
    for provider in data["providers"].values():
        provider["forward_headers"] = [*ADAPTERS[provider["schema"]].forward_headers, "x-mock-*"]
    # The gateway, not the client, picks the OpenAI organization.
    data["providers"]["openai"]["organization"] = "org-gateway"
    if redis:
        data["store"] = {"backend": "redis", "redis_prefix": prefix or f"e2e{uuid.uuid4().hex[:8]}:"}
    else:
        data["store"] = {"backend": "embedded", "path": str(workdir / "state.db")}
    for section, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Admin:
    """Key management on a stack's store, through the same KeyService the CLI uses."""

    def __init__(self, config_path: Path, redis_url: str | None) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.redis_url = redis_url

    def run(self, op: Callable[[KeyService], Awaitable[T]]) -> T:
        env = {self.config.store.redis_url_env: self.redis_url} if self.redis_url else {}

        async def go() -> T:
            async with key_service(self.config, env) as svc:
                return await op(svc)

        return asyncio.run(go())

    def key(
        self, tenant: str = "e2e", name: str = "k", models: tuple[str, ...] | None = None
    ) -> tuple[str, VirtualKey]:
        async def op(svc: KeyService) -> tuple[str, VirtualKey]:
            await svc.ensure_tenant(tenant)
            return await svc.create_key(tenant, name, models)

        return self.run(op)

    def put(self, key: VirtualKey) -> None:
        self.run(lambda svc: svc.store.put_key(key))

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **({"REDIS_URL": self.redis_url} if self.redis_url else {}), **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "extproc", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )


@contextlib.contextmanager
def server_in_thread(admin: Admin, stack: Stack, extra_stages: tuple[Stage, ...]) -> Iterator[None]:
    """The real server (build_runtime + create_server) with extra stages, on the stack's ext_proc
    port in a thread of this process, so a test can see inside a stage or hold one; the stack is
    made with with_server=False."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, asyncio.Event] = {}
    saved = {k: os.environ.get(k) for k in PROVIDER_KEYS}
    os.environ.update(PROVIDER_KEYS)

    async def main() -> None:
        runtime = await build_runtime(admin.config, extra_stages)
        server, _ = create_server(admin.config, runtime.pipeline, f"127.0.0.1:{stack.ports.extproc}")
        await server.start()
        holder["stop"] = asyncio.Event()
        started.set()
        await holder["stop"].wait()
        await server.stop(0)
        await runtime.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        yield
    finally:
        if "stop" in holder:
            loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not thread.is_alive()


def make_stack(
    workdir: Path,
    redis_url: str | None,
    prefix: str | None = None,
    overrides: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[Stack, Admin]:
    config = write_config(workdir, redis=redis_url is not None, prefix=prefix, overrides=overrides)
    env = {**PROVIDER_KEYS, **({"REDIS_URL": redis_url} if redis_url else {}), **kw.pop("extra_env", {})}
    stack = Stack(
        gateway_config=config,
        envoy_config=kw.pop("envoy_config", ROOT / "envoy" / "envoy.yaml"),
        workdir=workdir,
        ports=kw.pop("ports", None) or free_ports(),
        env=env,
        mock_env=kw.pop("mock_env", MOCK_ENV),
        **kw,
    )
    return stack, Admin(config, redis_url)


@pytest.fixture(scope="session")
def stack_and_admin(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[Stack, Admin]]:
    stack, admin = make_stack(tmp_path_factory.mktemp("stack"), redis_url)
    stack.start()
    yield stack, admin
    stack.stop()


@pytest.fixture(scope="session")
def stack(stack_and_admin: tuple[Stack, Admin]) -> Stack:
    return stack_and_admin[0]


@pytest.fixture(scope="session")
def admin(stack_and_admin: tuple[Stack, Admin]) -> Admin:
    return stack_and_admin[1]


@pytest.fixture(scope="session")
def api_key(admin: Admin) -> str:
    return admin.key("e2e", "session")[0]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(stack: Stack, families: set[str] | None = None) -> Samples:
    """Every sample of the server's /metrics by (name, labels); adds the names of the families
    (also those without samples yet, e.g. no refusal so far) to `families`."""
    assert stack.ports.metrics is not None, "the stack serves no metrics port"
    return scrape_port(stack.ports.metrics, families)


def scrape_port(port: int, families: set[str] | None = None) -> Samples:
    """`scrape` of any ops port on 127.0.0.1 (a server's, a ledger consumer's)."""
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        if families is not None:
            families.add(family.name)
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def grown(
    stack: Stack, before: Samples, want: dict[tuple[str, frozenset[tuple[str, str]]], float], wait: float = 5
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """How much each wanted (name, labels) grew since `before`, polling the scrape until every one
    reached its wanted growth or `wait` passed (a request's metrics are recorded in its finish,
    which may run just after the client has the answer)."""
    deadline = time.monotonic() + wait
    while True:
        now = scrape(stack)
        got = {k: total(now, k[0], **dict(k[1])) - total(before, k[0], **dict(k[1])) for k in want}
        if all(got[k] >= v for k, v in want.items()) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def series(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def health_check_successes(stack: Stack, at_least: int, timeout: float = 10) -> int:
    """Envoy's count of passed active health checks of the extproc cluster, once it reaches
    `at_least` or `timeout` seconds have passed."""

    def count() -> int:
        text = httpx.get(
            f"http://127.0.0.1:{stack.ports.admin}/stats",
            params={"filter": r"^cluster\.extproc\.health_check\.success$"},
        ).text
        return int(text.split(":")[1]) if ":" in text else 0

    deadline = time.monotonic() + timeout
    while (n := count()) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return n


def extproc_status(base: str) -> subprocess.CompletedProcess[str]:
    """`extproc status --url base`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "extproc", "status", "--url", base],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def access_log_lines(
    stack: Stack, match: Callable[[dict[str, Any]], bool], wait: float = 5.0, attempts: bool = False
) -> list[dict[str, Any]]:
    """Envoy's JSON access log lines that satisfy `match`, waiting for Envoy to flush them: the
    request lines, or with `attempts` the router's per-attempt lines (`kind: attempt`)."""
    deadline = time.monotonic() + wait
    while True:
        lines = [json.loads(x) for x in stack.log_path("access").read_text().splitlines()]
        found = [line for line in lines if (line.get("kind") == "attempt") == attempts and match(line)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def access_log(stack: Stack, request_id: str) -> dict[str, Any]:
    """The request's access log line (not the per-attempt lines, which have `kind: attempt`)."""
    found = access_log_lines(stack, lambda line: line["request_id"] == request_id)
    assert found, f"no access log line for {request_id}"
    return found[0]


def ledger_records(config: GatewayConfig, env: dict[str, str] | None = None) -> list[UsageRecord]:
    """Every usage record in the ledger `config` names (newest first)."""

    async def go() -> list[UsageRecord]:
        ledger = open_ledger(config, env or {})
        try:
            return await ledger.list(None, None, None, None, 10_000)
        finally:
            await ledger.close()

    return asyncio.run(go())


def usage_record(config: GatewayConfig, request_id: str, wait: float = 15.0) -> UsageRecord:
    """The one record of `request_id`, waiting for it to reach the ledger (consumer, spool)."""
    deadline = time.monotonic() + wait
    while True:
        found = [r for r in ledger_records(config) if r.request_id == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"expected one record for {request_id}, got {len(found)}"
            return found[0]
        time.sleep(0.2)


class Mock:
    """Reads what the mock provider received, by tag."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def requests(self, tag: str) -> list[dict[str, Any]]:
        r = self.http.get("/_mock/requests", params={"tag": tag})
        r.raise_for_status()
        return list(r.json())

    def one(self, tag: str) -> dict[str, Any]:
        reqs = self.requests(tag)
        assert len(reqs) == 1, f"expected exactly one upstream request, got {len(reqs)}"
        return reqs[0]


@pytest.fixture(scope="session")
def mock(stack: Stack) -> Mock:
    return Mock(stack.mock_url)


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex


def openai_client(stack: Stack, key: str, tag: str = "-") -> openai.OpenAI:
    # max_retries=0: each test sees exactly what one request did.
    return openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, default_headers={"x-mock-tag": tag}
    )


def anthropic_client(stack: Stack, key: str, tag: str = "-") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=0, default_headers={"x-mock-tag": tag})


@pytest.fixture
def oai(stack: Stack, api_key: str, tag: str) -> openai.OpenAI:
    return openai_client(stack, api_key, tag)


@pytest.fixture
def claude(stack: Stack, api_key: str, tag: str) -> anthropic.Anthropic:
    return anthropic_client(stack, api_key, tag)


@pytest.fixture
def raw(stack: Stack, api_key: str, tag: str) -> Iterator[httpx.Client]:
    headers = {"x-mock-tag": tag, "authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=stack.base_url, timeout=30, headers=headers) as c:
        yield c
