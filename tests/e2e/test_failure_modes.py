"""What clients see when the ext_proc server is not there, and the dev command as a newcomer runs it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from extproc.devstack import Stack, free_port
from tests.e2e.conftest import PROVIDER_KEYS, ROOT, Mock, make_stack, openai_client, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def serverless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    s, admin = make_stack(tmp_path_factory.mktemp("serverless"), None)
    secret, _ = admin.key()
    s.start()
    s.stop_server()
    yield s, secret
    s.stop()


def test_server_down_fails_closed_with_clear_json(serverless: tuple[Stack, str]) -> None:
    stack, key = serverless
    mock = Mock(stack.mock_url)
    client = openai_client(stack, key, "fc")
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="gpt-5.5", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503
    assert err.value.body == {
        "message": "The gateway's policy service is unavailable; the request was not sent to any provider. "
        "Retry shortly.",
        "type": "gateway_error",
        "code": "gateway_unavailable",
    }
    # Forged routing headers do not sneak a request past a missing server either.
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "gpt-5.5", "messages": []},
        headers={"x-gateway-provider": "openai", "x-mock-tag": "fc", "authorization": f"Bearer {key}"},
    )
    assert r.status_code == 503
    assert mock.requests("fc") == []


def test_server_restart_recovers(tmp_path: Path) -> None:
    s, admin = make_stack(tmp_path, None)
    secret, _ = admin.key()
    s.start()
    try:
        url = f"{s.base_url}/v1/chat/completions"
        body = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]}
        auth = {"authorization": f"Bearer {secret}"}
        assert httpx.post(url, json=body, headers=auth).status_code == 200
        s.stop_server()
        assert httpx.post(url, json=body, headers=auth).status_code == 503
        s.start_server()
        deadline = time.monotonic() + 15
        while httpx.post(url, json=body, headers=auth).status_code != 200:
            assert time.monotonic() < deadline, "Envoy did not reconnect to the restarted server"
            time.sleep(0.2)
    finally:
        s.stop()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_dev_command_serves_a_first_curl(tmp_path: Path, stop_signal: signal.Signals) -> None:
    """What a newcomer does: `extproc dev`, then paste the printed key into a curl.

    Stopping it, by Ctrl-C or by a SIGTERM sent to dev alone (`kill`, a supervisor), stops its
    Envoy, server and mock too: nothing is left in its process group.
    """
    config = write_config(tmp_path, redis=False)
    ports = {n: free_port() for n in ("port", "admin-port", "extproc-port", "mock-port")}
    args = [sys.executable, "-m", "extproc", "dev", "--config", str(config), *[f"--{k}={v}" for k, v in ports.items()]]
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_KEYS}
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Anthropic SDK:" in line or not line:
                break
        out = "".join(lines)
        assert f"gateway ready on http://127.0.0.1:{ports['port']}" in out, out
        assert "providers on the mock: anthropic, openai" in out
        key = re.search(r"export GATEWAY_KEY=(sk-gw-\S+)", out)
        assert key, out
        url = f"http://127.0.0.1:{ports['port']}/v1/chat/completions"
        body = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hello"}]}
        r = httpx.post(url, json=body, headers={"authorization": f"Bearer {key.group(1)}"})
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
        # The mock only accepts the made-up provider key the dev stack gave the server.
        assert httpx.post(url, json=body).status_code == 401
    finally:
        proc.send_signal(stop_signal)
        try:
            proc.wait(20)
            time.sleep(0.2)  # an orphan would still be running; a stopped child is already reaped
            left_behind = True
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                left_behind = False
        finally:
            # Never leave its Envoy, server and mock running (they hold ports later tests use).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0
    assert not left_behind, "dev exited and left processes of its stack running"
