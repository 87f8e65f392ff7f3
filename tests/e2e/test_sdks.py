"""Both official SDKs through Envoy + ext_proc to the mock provider, JSON and SSE."""

from __future__ import annotations

import time

import anthropic
import openai
import orjson
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.conftest import Mock

pytestmark = pytest.mark.e2e
MSGS: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say something nice"}]
A_MSGS: list[MessageParam] = [{"role": "user", "content": "say something nice"}]


def test_openai_chat(oai: openai.OpenAI, mock: Mock, tag: str) -> None:
    r = oai.chat.completions.create(model="gpt-5.4-mini", messages=MSGS, extra_headers={"x-mock-output-tokens": "5"})
    assert r.choices[0].message.content == "The quick brown fox jumps"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 5)
    seen = mock.one(tag)
    assert seen["path"] == "/v1/chat/completions"
    assert orjson.loads(seen["body"])["model"] == "gpt-5.4-mini"


def test_openai_stream_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-5.5",
        messages=MSGS,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-output-tokens": "4"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The quick brown fox"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_anthropic_messages(claude: anthropic.Anthropic, mock: Mock, tag: str) -> None:
    r = claude.messages.create(
        model="claude-haiku-5-5", max_tokens=100, messages=A_MSGS, extra_headers={"x-mock-output-tokens": "3"}
    )
    assert r.content[0].type == "text" and r.content[0].text == "The quick brown"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (3, 3)
    assert r.stop_reason == "end_turn"
    assert mock.one(tag)["path"] == "/v1/messages"


def test_anthropic_stream(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="claude-sonnet-5-5", max_tokens=100, messages=A_MSGS, extra_headers={"x-mock-output-tokens": "6"}
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "The quick brown fox jumps over"
    assert final.usage.output_tokens == 6 and final.usage.input_tokens == 3


def test_anthropic_count_tokens(claude: anthropic.Anthropic) -> None:
    r = claude.messages.count_tokens(model="sonnet", messages=A_MSGS)
    assert r.input_tokens == 3


@pytest.mark.parametrize("split", ["1", "3", "17"])
def test_sse_split_at_awkward_offsets(oai: openai.OpenAI, claude: anthropic.Anthropic, split: str) -> None:
    hdrs = {"x-mock-split": split, "x-mock-output-tokens": "7"}
    chunks = list(oai.chat.completions.create(model="gpt-5.5", messages=MSGS, stream=True, extra_headers=hdrs))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The quick brown fox jumps over the"
    )
    with claude.messages.stream(model="sonnet", max_tokens=50, messages=A_MSGS, extra_headers=hdrs) as s:
        assert "".join(s.text_stream) == "The quick brown fox jumps over the"


def test_openai_events_arrive_incrementally(oai: openai.OpenAI, mock: Mock, tag: str) -> None:
    hdrs = {"x-mock-chunk-delay-ms": "150", "x-mock-output-tokens": "5"}
    stream = oai.chat.completions.create(model="gpt-5.5", messages=MSGS, stream=True, extra_headers=hdrs)
    first_at = None
    seen = 0
    for _ in stream:
        seen += 1
        if first_at is None:
            first_at = time.time()
    sent = mock.one(tag)["events_sent_at"]
    # The gateway asked for usage (include_usage) and kept the usage chunk from the client.
    assert first_at is not None and len(sent) == 9 and seen == 7
    assert first_at < sent[-1] - 0.3, "the first event must reach the client long before the mock sends the last"


def test_anthropic_events_arrive_incrementally(claude: anthropic.Anthropic, mock: Mock, tag: str) -> None:
    hdrs = {"x-mock-chunk-delay-ms": "150", "x-mock-output-tokens": "3"}
    first_at = None
    with claude.messages.stream(model="sonnet", max_tokens=50, messages=A_MSGS, extra_headers=hdrs) as s:
        for _ in s:
            if first_at is None:
                first_at = time.time()
    sent = mock.one(tag)["events_sent_at"]
    assert first_at is not None and first_at < sent[-1] - 0.3


def test_models_list_from_config(oai: openai.OpenAI, claude: anthropic.Anthropic, mock: Mock, tag: str) -> None:
    ids = [m.id for m in oai.models.list()]
    assert ids[:3] == ["gpt-5.4-mini", "gpt-5.5", "fast"] and "sonnet" in ids
    assert oai.models.retrieve("fast").owned_by == "openai"
    assert "claude-haiku-5-5" in [m.id for m in claude.models.list()]
    assert mock.requests(tag) == []
