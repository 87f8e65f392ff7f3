"""Virtual keys end to end: real Envoy, real server processes, real redis-server, both SDKs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import yaml

from extproc.auth.keys import mint
from extproc.devstack import Stack, free_port
from extproc.envoyconf import LocalPorts
from tests.e2e.conftest import (
    PROVIDER_KEYS,
    Admin,
    Mock,
    access_log,
    access_log_lines,
    anthropic_client,
    make_stack,
    openai_client,
)

pytestmark = pytest.mark.e2e
HI = [{"role": "user", "content": "hi"}]


def chat(client: openai.OpenAI, model: str = "gpt-5.5") -> str:
    r = client.chat.completions.create(model=model, messages=HI)  # type: ignore[arg-type]
    return r.choices[0].message.content or ""


def poll_until_refused(client: openai.OpenAI, limit: float) -> float:
    start = time.monotonic()
    while True:
        try:
            chat(client)
        except openai.AuthenticationError:
            return time.monotonic() - start
        assert time.monotonic() - start < limit, f"key still accepted after {limit}s"
        time.sleep(0.02)


def test_provider_key_injected_virtual_key_never_forwarded(stack: Stack, admin: Admin, mock: Mock, tag: str) -> None:
    secret, _ = admin.key("e2e", "inject")
    chat(openai_client(stack, secret, tag))
    anthropic_client(stack, secret, tag).messages.create(model="haiku", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    oai_req, ant_req = mock.requests(tag)
    assert oai_req["headers"]["authorization"] == f"Bearer {PROVIDER_KEYS['OPENAI_API_KEY']}"
    assert "x-api-key" not in oai_req["headers"]
    assert ant_req["headers"]["x-api-key"] == PROVIDER_KEYS["ANTHROPIC_API_KEY"]
    assert (
        ant_req["headers"]["anthropic-version"] == anthropic.Anthropic(api_key="x").default_headers["anthropic-version"]
    )
    assert "authorization" not in ant_req["headers"]
    for req in (oai_req, ant_req):
        assert secret not in json.dumps(req), "the virtual key must never reach a provider"
    # A client that sends no anthropic-version gets the configured one.
    httpx.post(
        f"{stack.base_url}/v1/messages",
        json={"model": "haiku", "max_tokens": 5, "messages": HI},
        headers={"x-api-key": secret, "x-mock-tag": tag + "-raw"},
    ).raise_for_status()
    assert mock.one(tag + "-raw")["headers"]["anthropic-version"] == "2023-06-01"
    # ...nor the logs: Envoy's access log names the key id and tenant only.
    mine = access_log(stack, oai_req["headers"]["x-request-id"])
    assert mine["tenant"] == "e2e" and mine["key_id"].startswith("key_")
    for name in ("envoy", "access", "server"):
        assert secret not in stack.log_path(name).read_text()


def test_wrong_missing_and_malformed_keys(stack: Stack, mock: Mock, tag: str) -> None:
    for key in ("sk-gw-" + "x" * 32, "sk-proj-real-looking-openai-key-000000000000", "sk-gw-short"):
        with pytest.raises(openai.AuthenticationError) as e1:
            chat(openai_client(stack, key, tag))
        assert e1.value.code == "invalid_api_key"
        assert key not in e1.value.message  # at most a short prefix is ever echoed
        with pytest.raises(anthropic.AuthenticationError) as e2:
            anthropic_client(stack, key, tag).messages.create(model="haiku", max_tokens=5, messages=HI)  # type: ignore[arg-type]
        assert e2.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    url = f"{stack.base_url}/v1/chat/completions"
    body = {"model": "gpt-5.5", "messages": HI}
    cases = [
        ({}, 401, "missing_api_key"),
        ({"authorization": "Basic Zm9vOmJhcg=="}, 401, "invalid_authorization_header"),
        ({"authorization": "Bearer sk-gw-" + "a" * 32, "x-api-key": "sk-gw-" + "b" * 32}, 400, "conflicting_api_keys"),
        ({"x-api-key": "sk-gw-" + "a" * 20_000}, 401, "invalid_api_key"),
    ]
    for headers, status, code in cases:
        r = httpx.post(url, json=body, headers={**headers, "x-mock-tag": tag})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    # Past Envoy's header size limit the request dies in Envoy (431 or a closed connection).
    try:
        huge = httpx.post(url, json=body, headers={"x-api-key": "k" * 100_000, "x-mock-tag": tag})
        assert huge.status_code == 431
    except (httpx.RemoteProtocolError, httpx.ReadError):
        pass  # closed or reset: either way the request never got past Envoy
    assert mock.requests(tag) == []


def test_revoked_and_expired_keys(stack: Stack, admin: Admin, mock: Mock, tag: str) -> None:
    secret, key = admin.key("e2e", "to-revoke")
    client = openai_client(stack, secret, tag)
    chat(client)
    assert admin.cli("keys", "revoke", key.id).returncode == 0
    assert poll_until_refused(client, 1.0) < 1.0
    with pytest.raises(openai.AuthenticationError) as err:
        chat(client)
    assert err.value.code == "revoked_api_key"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(stack, secret, tag).messages.create(model="haiku", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    old_secret, old = mint("e2e", "expired", ttl=60)
    admin.put(old.with_changes(created_at=old.created_at - 120, expires_at=time.time() - 1))
    with pytest.raises(openai.AuthenticationError) as err:
        chat(openai_client(stack, old_secret, tag))
    assert err.value.code == "expired_api_key"
    with pytest.raises(anthropic.AuthenticationError) as aerr:
        anthropic_client(stack, old_secret, tag).messages.create(model="haiku", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    assert aerr.value.body["error"]["code"] == "expired_api_key"  # type: ignore[index]
    assert len(mock.requests(tag)) == 1


def test_rotation_through_the_cli(stack: Stack, admin: Admin) -> None:
    secret, key = admin.key("e2e", "rotating")
    old_client = openai_client(stack, secret)
    chat(old_client)
    out = admin.cli("keys", "rotate", key.id, "--json")
    assert out.returncode == 0, out.stderr
    new_secret = json.loads(out.stdout)["secret"]
    assert new_secret != secret and new_secret.startswith("sk-gw-")
    assert poll_until_refused(old_client, 1.0) < 1.0
    assert chat(openai_client(stack, new_secret))


def test_key_limited_to_one_model(stack: Stack, admin: Admin, mock: Mock, tag: str) -> None:
    secret, _ = admin.key("e2e", "one-model", models=("gpt-5.5",))
    client = openai_client(stack, secret, tag)
    assert chat(client, "gpt-5.5")
    with pytest.raises(openai.PermissionDeniedError) as err:
        chat(client, "gpt-5.4-mini")
    assert err.value.code == "model_not_allowed"
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic_client(stack, secret, tag).messages.create(model="haiku", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    assert [m.id for m in client.models.list()] == ["gpt-5.5"]
    assert len(mock.requests(tag)) == 1


def test_tenant_defaults_are_inherited(stack: Stack, admin: Admin) -> None:
    assert admin.cli("tenants", "create", "claude-only", "--models", "claude-*", "haiku").returncode == 0
    out = admin.cli("keys", "create", "--tenant", "claude-only", "--name", "t", "--json")
    secret = json.loads(out.stdout)["secret"]
    anthropic_client(stack, secret).messages.create(model="haiku", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    with pytest.raises(openai.PermissionDeniedError):
        chat(openai_client(stack, secret))


def test_revocation_reaches_a_second_server_within_a_second(
    stack: Stack, admin: Admin, tmp_path: Path, redis_url: str
) -> None:
    """Two replicas (each Envoy + server process) sharing Redis; both have the key cached."""
    ports = LocalPorts(listener=free_port(), admin=free_port(), extproc=free_port(), mock=stack.ports.mock)
    replica, _ = make_stack(tmp_path, redis_url, prefix=admin.config.store.redis_prefix, ports=ports, with_mock=False)
    replica.start()
    try:
        secret, key = admin.key("e2e", "replicated")
        one, two = openai_client(stack, secret), openai_client(replica, secret)
        for _ in range(3):
            chat(one)
            chat(two)
        admin.run(lambda svc: svc.revoke_key(key.id))
        elapsed = poll_until_refused(two, 1.0)
        print(f"revocation seen by the second server after {elapsed * 1000:.0f} ms")
        assert elapsed < 1.0
        with pytest.raises(openai.AuthenticationError):
            chat(one)
    finally:
        replica.stop()


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Admin, str]]:
    """The zero-setup default: embedded store, plus one static key kept in gateway.yaml by hash."""
    stack, admin = make_stack(tmp_path_factory.mktemp("embedded"), None)
    generated = subprocess.run(
        [sys.executable, "-m", "extproc", "keys", "generate", "--json"], capture_output=True, text=True, check=True
    )
    static = json.loads(generated.stdout)
    data = yaml.safe_load(admin.config_path.read_text())
    data["auth"] = {"static_keys": [{"id": "ci", "name": "ci", "tenant": "platform", "sha256": static["sha256"]}]}
    admin.config_path.write_text(yaml.safe_dump(data))
    assert static["secret"] not in admin.config_path.read_text()
    assert admin.cli("tenants", "create", "team").returncode == 0
    stack.start()
    yield stack, admin, static["secret"]
    stack.stop()


def test_static_key_from_gateway_yaml(embedded_stack: tuple[Stack, Admin, str]) -> None:
    stack, admin, secret = embedded_stack
    assert chat(openai_client(stack, secret))  # tenant "platform" allows gpt-* and claude-*
    anthropic_client(stack, secret).messages.create(model="claude-haiku-5-5", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    with pytest.raises(anthropic.PermissionDeniedError):  # "haiku" is an alias outside the tenant's globs
        anthropic_client(stack, secret).messages.create(model="haiku", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    refused = admin.cli("keys", "revoke", "ci")
    assert refused.returncode == 1 and "defined in gateway.yaml" in refused.stderr
    assert "ci" in admin.cli("keys", "list", "--tenant", "platform").stdout


def test_cli_changes_reach_the_running_server_on_the_embedded_store(embedded_stack: tuple[Stack, Admin, str]) -> None:
    stack, admin, _ = embedded_stack
    out = admin.cli("keys", "create", "--tenant", "team", "--name", "cli", "--json")
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    client = openai_client(stack, created["secret"])
    deadline = time.monotonic() + 1.0
    while True:  # the server picks the new key up from the file
        try:
            chat(client)
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "new key not usable within a second"
            time.sleep(0.02)
    listed = admin.cli("keys", "list", "--tenant", "team")
    assert created["id"] in listed.stdout and created["secret"] not in listed.stdout
    assert admin.cli("keys", "revoke", created["id"]).returncode == 0
    assert poll_until_refused(client, 1.0) < 1.0


def _stack_with(tmp: Path, redis_url: str, failure_mode: str) -> tuple[Stack, str]:
    stack, admin = make_stack(tmp, redis_url)
    data = yaml.safe_load(admin.config_path.read_text())
    data["auth"] = {"failure_mode": failure_mode}
    admin.config_path.write_text(yaml.safe_dump(data))
    secret, _ = Admin(admin.config_path, redis_url).key("e2e", "k")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    stack.env["REDIS_URL"] = dead  # the server will never reach Redis
    return stack.start(), secret


def test_redis_down_fails_closed(tmp_path: Path, redis_url: str) -> None:
    stack, secret = _stack_with(tmp_path, redis_url, "closed")
    try:
        mock = Mock(stack.mock_url)
        with pytest.raises(openai.APIStatusError) as err:
            chat(openai_client(stack, secret, "down"))
        assert err.value.status_code == 503 and err.value.code == "auth_unavailable"
        assert err.value.response.headers["retry-after"] == "1"
        assert mock.requests("down") == []
    finally:
        stack.stop()


def test_redis_down_fail_open_when_configured(tmp_path: Path, redis_url: str) -> None:
    stack, secret = _stack_with(tmp_path, redis_url, "open")
    try:
        assert chat(openai_client(stack, secret))
        # Credentials still get swapped, and malformed keys are still refused.
        with pytest.raises(openai.AuthenticationError):
            chat(openai_client(stack, "not-a-key"))
        assert access_log_lines(stack, lambda line: line["auth"] == "bypassed" and line["status"] == 200)
    finally:
        stack.stop()
