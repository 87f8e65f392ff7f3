"""End-to-end fixtures: the real Envoy binary, the real server (via the CLI) and the mock provider,
on free loopback ports, started exactly as `extproc dev` starts them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from extproc.devstack import Stack, free_port
from extproc.envoyconf import LocalPorts

ROOT = Path(__file__).resolve().parents[2]


def free_ports() -> LocalPorts:
    return LocalPorts(listener=free_port(), admin=free_port(), extproc=free_port(), mock=free_port())


def start_stack(tmp: Path, **kw: Any) -> Stack:
    return Stack(
        gateway_config=ROOT / "gateway.yaml",
        envoy_config=ROOT / "envoy" / "envoy.yaml",
        workdir=tmp,
        ports=free_ports(),
        **kw,
    ).start()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.stop()


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


@pytest.fixture
def oai(stack: Stack, tag: str) -> openai.OpenAI:
    # max_retries=0: each test sees exactly what one request did.
    return openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key="sk-test", max_retries=0, default_headers={"x-mock-tag": tag}
    )


@pytest.fixture
def claude(stack: Stack, tag: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=stack.base_url, api_key="sk-ant-test", max_retries=0, default_headers={"x-mock-tag": tag}
    )


@pytest.fixture
def raw(stack: Stack, tag: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, timeout=30, headers={"x-mock-tag": tag}) as c:
        yield c
