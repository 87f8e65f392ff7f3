"""PII redaction end to end: real Envoy, the real server, the mock provider (which records what it
received and, with x-mock-echo, answers with the text it was sent, streamed in 3-character pieces),
driven by the official SDKs and their stream helpers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from extproc.devstack import Stack
from tests.e2e.conftest import Admin, Mock, anthropic_client, make_stack, openai_client

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EMAIL, PHONE, CARD = "maria.gonzalez@northwind-traders.com", "+44 20 7946 0958", "4539 5787 6362 1486"
KEY = "sk-proj-" + "Zq7vK2mP9xR4tL8nW3bY6cH1jF5dS0gAeT4uN"
ECHO = {"x-mock-echo": "1"}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "send", "parameters": {"type": "object", "properties": {}}}}
]
ANTHROPIC_TOOLS: list[Any] = [{"name": "send", "input_schema": {"type": "object", "properties": {}}}]


@dataclass
class Env:
    stack: Stack
    admin: Admin
    mock: Mock
    keys: dict[str, str]

    def oai(self, tenant: str, tag: str) -> openai.OpenAI:
        return openai_client(self.stack, self.keys[tenant], tag)

    def claude(self, tenant: str, tag: str) -> anthropic.Anthropic:
        return anthropic_client(self.stack, self.keys[tenant], tag)

    def received(self, tag: str) -> str:
        """Everything the provider received for a tag (bodies and headers), as text."""
        return json.dumps(self.mock.requests(tag))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Env]:
    overrides = {
        "pii": {"action": "restore", "entities": {"CREDIT_CARD": "block", "SECRET": "mask"}},
        "tenants": {
            "pii-restore": {},
            "pii-mask": {"pii": {"action": "mask", "responses": "mask"}},
            "pii-respmask": {"pii": {"action": "allow", "responses": "mask"}},
            "pii-hash": {"pii": {"action": "hash"}},
            "pii-fail": {
                "pii": {
                    "custom": [{"name": "BOOM", "pattern": r"BOOM-\d+", "validator": "tests.e2e.pii_helpers:explode"}],
                    "on_error": "block",
                }
            },
        },
    }
    extra = {"PII_HASH_KEY": "test-hash-secret-0123456789", "PYTHONPATH": str(ROOT)}
    stack, admin = make_stack(tmp_path_factory.mktemp("pii"), redis_url, overrides=overrides, extra_env=extra)
    stack.start()
    keys = {t: admin.key(t, "k")[0] for t in ("pii-restore", "pii-mask", "pii-respmask", "pii-hash", "pii-fail")}
    yield Env(stack, admin, Mock(stack.mock_url), keys)
    stack.stop()


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex


PROMPT = f"Please email {EMAIL} and call {PHONE} about [EMAIL_1] (my own text)."


def test_restore_openai_json(env: Env, tag: str) -> None:
    out = env.oai("pii-restore", tag).chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": PROMPT}], extra_headers=ECHO
    )
    assert out.choices[0].message.content == PROMPT
    sent = env.received(tag)
    assert EMAIL not in sent and PHONE not in sent
    assert "[EMAIL_2]" in sent and "[PHONE_1]" in sent  # the client's own "[EMAIL_1]" was not taken


def test_restore_openai_stream_helper(env: Env, tag: str) -> None:
    client = env.oai("pii-restore", tag)
    with client.chat.completions.stream(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": PROMPT}], extra_headers=ECHO
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(deltas) == PROMPT
    assert final.choices[0].message.content == PROMPT
    assert EMAIL not in env.received(tag)


@pytest.mark.parametrize("stream", [False, True])
def test_restore_openai_tool_call_arguments(env: Env, tag: str, stream: bool) -> None:
    client = env.oai("pii-restore", tag)
    headers = {**ECHO, "x-mock-content": "tool"}
    kwargs: dict[str, Any] = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        with client.chat.completions.stream(**kwargs, tools=TOOLS, extra_headers=headers) as s:
            final = s.get_final_completion()
    else:
        final = client.chat.completions.create(**kwargs, tools=TOOLS, extra_headers=headers)
    calls = final.choices[0].message.tool_calls
    assert calls is not None
    assert json.loads(calls[0].function.arguments) == {"echo": PROMPT}
    assert EMAIL not in env.received(tag)


def test_restore_anthropic_json_and_stream_helper(env: Env, tag: str) -> None:
    client = env.claude("pii-restore", tag)
    msgs: list[Any] = [{"role": "user", "content": PROMPT}]
    out = client.messages.create(model="sonnet", max_tokens=400, messages=msgs, extra_headers=ECHO)
    assert out.content[0].type == "text" and out.content[0].text == PROMPT
    with client.messages.stream(model="sonnet", max_tokens=400, messages=msgs, extra_headers=ECHO) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == PROMPT and final.content[0].type == "text" and final.content[0].text == PROMPT
    headers = {**ECHO, "x-mock-content": "tool"}
    with client.messages.stream(
        model="sonnet", max_tokens=400, messages=msgs, tools=ANTHROPIC_TOOLS, extra_headers=headers
    ) as s:
        tool_final = s.get_final_message()
    tool_use = next(b for b in tool_final.content if b.type == "tool_use")
    assert tool_use.input == {"echo": PROMPT}
    sent = env.received(tag)
    assert EMAIL not in sent and PHONE not in sent


@pytest.mark.parametrize("stream", [False, True])
def test_restore_across_translation(env: Env, tag: str, stream: bool) -> None:
    """OpenAI SDK on a Claude model and Anthropic SDK on an OpenAI model: the provider sees only
    placeholders (redaction reads the client's schema, before translation) and the client reads
    the values back (restore runs on the translated answer), in text and in tool arguments."""
    msgs: list[Any] = [{"role": "user", "content": PROMPT}]
    headers = {**ECHO, "x-mock-content": "text,tool"}
    oai = env.oai("pii-restore", tag)
    kwargs: dict[str, Any] = {"model": "sonnet", "messages": msgs, "tools": TOOLS, "extra_headers": headers}
    if stream:
        with oai.chat.completions.stream(**kwargs) as s:
            final = s.get_final_completion()
    else:
        final = oai.chat.completions.create(**kwargs)
    message = final.choices[0].message
    assert message.content == PROMPT
    assert message.tool_calls is not None
    assert json.loads(message.tool_calls[0].function.arguments) == {"echo": PROMPT}
    claude = env.claude("pii-restore", tag)
    akw: dict[str, Any] = {
        "model": "gpt-5.4-mini",
        "max_tokens": 400,
        "messages": msgs,
        "tools": ANTHROPIC_TOOLS,
        "extra_headers": headers,
    }
    if stream:
        with claude.messages.stream(**akw) as a:
            out = a.get_final_message()
    else:
        out = claude.messages.create(**akw)
    assert [b.type for b in out.content] == ["text", "tool_use"]
    assert out.content[0].text == PROMPT  # type: ignore[union-attr]
    assert out.content[1].input == {"echo": PROMPT}  # type: ignore[union-attr]
    sent = env.received(tag)
    assert len(env.mock.requests(tag)) == 2
    assert EMAIL not in sent and PHONE not in sent and "[EMAIL_2]" in sent


def test_block_refuses_and_forwards_nothing(env: Env, tag: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        env.oai("pii-restore", tag).chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": f"charge {CARD} please"}]
        )
    assert info.value.code == "pii_blocked"
    assert "CREDIT_CARD" in info.value.message and CARD not in info.value.message
    assert env.mock.requests(tag) == []


def test_secrets_are_masked_even_in_restore_mode(env: Env, tag: str) -> None:
    out = env.oai("pii-restore", tag).chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": f"my key is {KEY}"}], extra_headers=ECHO
    )
    assert out.choices[0].message.content == "my key is [SECRET]"  # masked values cannot come back
    assert KEY not in env.received(tag)


def test_mask_tenant(env: Env, tag: str) -> None:
    out = env.oai("pii-mask", tag).chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": PROMPT}], extra_headers=ECHO
    )
    assert out.choices[0].message.content == "Please email [EMAIL] and call [PHONE] about [EMAIL_1] (my own text)."
    assert EMAIL not in env.received(tag)


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 11, 64])
def test_entities_the_model_writes_are_masked_in_streams_split_anywhere(env: Env, tag: str, split: int) -> None:
    """The provider sees the values (this tenant allows them in requests) and echoes them; the client
    gets them masked, however the provider's bytes are split."""
    url = f"{env.stack.base_url}/v1/chat/completions"
    headers = {
        **ECHO,
        "x-mock-split": str(split),
        "authorization": f"Bearer {env.keys['pii-respmask']}",
        "x-mock-tag": tag,
    }
    body = {"model": "gpt-5.4-mini", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    text = ""
    with httpx.Client(timeout=30) as c, c.stream("POST", url, json=body, headers=headers) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])  # every event is valid JSON
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
    assert text == "Please email [EMAIL] and call [PHONE] about [EMAIL_1] (my own text)."
    assert EMAIL in env.received(tag)  # allowed upstream for this tenant


def test_hash_tenant(env: Env, tag: str) -> None:
    env.oai("pii-hash", tag).chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": f"{EMAIL} and {EMAIL}"}]
    )
    sent = env.mock.one(tag)
    content = json.loads(sent["body"])["messages"][0]["content"]
    first, second = content.split(" and ")
    assert first == second and first.startswith("[EMAIL_") and len(first) == len("[EMAIL_12345678]")


def test_a_failing_detector_refuses_the_request(env: Env, tag: str) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        env.oai("pii-fail", tag).chat.completions.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": f"ticket BOOM-123 from {EMAIL}"}]
        )
    assert info.value.status_code == 503
    assert info.value.code == "pii_redaction_failed"
    assert env.mock.requests(tag) == []


def test_counts_reach_the_usage_record_and_values_no_log(env: Env, tag: str) -> None:
    raw = env.oai("pii-restore", tag).chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": f"{EMAIL}, {PHONE}, {EMAIL}"}]
    )
    rid = raw.headers["x-gateway-request-id"]
    deadline = time.monotonic() + 15
    while True:  # the ledger consumer moves records from Redis within a moment
        listed = env.admin.cli("usage", "list", "--json", "--limit", "500")
        assert listed.returncode == 0, listed.stderr
        records = {r["request_id"]: r for r in json.loads(listed.stdout)}
        if rid in records or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert records[rid]["pii"] == {"EMAIL": 2, "PHONE": 1}
    for name in ("server", "access", "envoy"):
        text = env.stack.log_path(name).read_text()
        for value in (EMAIL, PHONE, CARD, KEY):
            assert value not in text, f"{value!r} in the {name} log"


def test_embeddings_input_is_redacted_and_token_ids_refused(env: Env, tag: str) -> None:
    client = env.oai("pii-mask", tag)
    out = client.embeddings.create(model="text-embedding-3-small", input=[PROMPT, "plain words"])
    assert len(out.data) == 2 and len(out.data[0].embedding) > 0
    sent = env.received(tag)
    assert EMAIL not in sent and PHONE not in sent and "plain words" in sent
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="text-embedding-3-small", input=[[101, 2023, 102]])
    assert info.value.code == "pii_unscannable"
    assert len(env.mock.requests(tag)) == 1
