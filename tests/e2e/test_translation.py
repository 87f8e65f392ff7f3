"""Any SDK to any model, end to end through real Envoy: the OpenAI SDK calling Claude models and
the Anthropic SDK calling OpenAI models, JSON and streams (with the SDKs' stream helpers), tools,
images and errors; the mock provider checks each request is in its own schema."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from extproc.devstack import Stack
from tests.e2e.conftest import Mock

pytestmark = pytest.mark.e2e

MSGS: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "say something nice"},
]
A_MSGS: list[MessageParam] = [{"role": "user", "content": "say something nice"}]
OAI_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
A_TOOL: anthropic.types.ToolParam = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def sent(mock: Mock, tag: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    """What the provider received: path, JSON body, headers."""
    seen = mock.one(tag)
    return seen["path"], orjson.loads(seen["body"]), seen["headers"]


# -- OpenAI SDK -> Claude ---------------------------------------------------------------------------


def test_openai_sdk_calls_claude(oai: openai.OpenAI, mock: Mock, tag: str) -> None:
    r = oai.chat.completions.create(
        model="sonnet",
        messages=MSGS,
        max_tokens=50,
        temperature=0.3,
        stop=["END"],
        extra_headers={"x-mock-output-tokens": "5", "x-mock-cache-read-tokens": "2"},
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == "The quick brown fox jumps"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens == 2
    path, body, headers = sent(mock, tag)
    assert path == "/v1/messages"
    assert body["model"] == "claude-sonnet-5-5"
    assert body["system"] == [{"type": "text", "text": "Be brief."}]
    assert body["messages"] == [{"role": "user", "content": "say something nice"}]
    assert (body["max_tokens"], body["temperature"], body["stop_sequences"]) == (50, 0.3, ["END"])
    assert headers["anthropic-version"] and headers["x-api-key"]
    assert "authorization" not in headers


def test_openai_sdk_gets_the_default_max_tokens(oai: openai.OpenAI, mock: Mock, tag: str) -> None:
    oai.chat.completions.create(model="haiku", messages=MSGS)
    assert sent(mock, tag)[1]["max_tokens"] == 4096


def test_openai_stream_helper_on_claude(oai: openai.OpenAI) -> None:
    with oai.chat.completions.stream(
        model="sonnet",
        messages=MSGS,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-output-tokens": "6"},
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "content.delta")
        final = stream.get_final_completion()
    assert text == "The quick brown fox jumps over"
    assert final.choices[0].message.content == text
    assert final.usage is not None and final.usage.completion_tokens == 6


def test_openai_stream_without_usage_gets_no_usage_chunk(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="sonnet", messages=MSGS, stream=True, extra_headers={"x-mock-output-tokens": "3", "x-mock-split": "7"}
        )
    )
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The quick brown"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_tools_on_claude(oai: openai.OpenAI, mock: Mock, tag: str) -> None:
    r = oai.chat.completions.create(
        model="sonnet",
        messages=MSGS,
        tools=[OAI_TOOL],
        tool_choice="required",
        extra_headers={"x-mock-content": "tool,tool"},
    )
    calls = [c for c in r.choices[0].message.tool_calls or () if c.type == "function"]
    assert len(calls) == 2
    assert all(c.function.name == "get_weather" for c in calls)
    assert all(isinstance(orjson.loads(c.function.arguments), dict) for c in calls)
    assert r.choices[0].finish_reason == "tool_calls"
    body = sent(mock, tag)[1]
    assert body["tools"][0]["name"] == "get_weather" and body["tool_choice"] == {"type": "any"}
    # The tool results go back to Claude as tool_result blocks of one user turn.
    follow_up: list[Any] = [
        *MSGS,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [c.model_dump(include={"id", "type", "function"}) for c in calls],
        },
        *({"role": "tool", "tool_call_id": c.id, "content": "18C"} for c in calls),
    ]
    tag2 = tag + "-2"
    oai.chat.completions.create(
        model="sonnet", messages=follow_up, tools=[OAI_TOOL], extra_headers={"x-mock-tag": tag2}
    )
    last = sent(mock, tag2)[1]["messages"][-1]
    assert last["role"] == "user"
    assert [b["tool_use_id"] for b in last["content"]] == [c.id for c in calls]


def test_openai_streamed_tool_calls_on_claude(oai: openai.OpenAI) -> None:
    with oai.chat.completions.stream(
        model="sonnet",
        messages=MSGS,
        tools=[OAI_TOOL],
        extra_headers={"x-mock-content": "thinking,text,tool", "x-mock-split": "5"},
    ) as stream:
        final = stream.get_final_completion()
    msg = final.choices[0].message
    assert msg.content
    assert msg.tool_calls is not None and len(msg.tool_calls) == 1
    assert isinstance(orjson.loads(msg.tool_calls[0].function.arguments), dict)
    assert final.choices[0].finish_reason == "tool_calls"


def test_openai_images_reach_claude_as_image_blocks(oai: openai.OpenAI, mock: Mock, tag: str) -> None:
    oai.chat.completions.create(
        model="sonnet",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            }
        ],
    )
    content = sent(mock, tag)[1]["messages"][0]["content"]
    assert content[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    assert content[2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (400, openai.BadRequestError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (529, openai.InternalServerError),
    ],
)
def test_claude_errors_raise_the_openai_sdks_exceptions(
    oai: openai.OpenAI, status: int, exc: type[openai.APIStatusError]
) -> None:
    hdrs = {"x-mock-status": str(status), "x-mock-retry-after": "7"}
    with pytest.raises(exc) as info:
        oai.chat.completions.create(model="sonnet", messages=MSGS, extra_headers=hdrs)
    err = info.value
    assert err.status_code == status
    assert isinstance(err.body, dict) and err.body["type"] and err.body["message"]
    assert err.response.headers["content-type"] == "application/json"
    if status == 429:
        assert err.response.headers["retry-after"] == "7"


def test_gateway_refusals_name_the_untranslatable_field(oai: openai.OpenAI, mock: Mock, tag: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="sonnet", messages=MSGS, n=2)
    assert info.value.code == "unsupported_parameter" and info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="sonnet", messages=MSGS, response_format={"type": "json_object"})
    assert info.value.param == "response_format"
    assert mock.requests(tag) == []


def test_bad_virtual_key_is_an_openai_authentication_error(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-gw-" + "x" * 32, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="sonnet", messages=MSGS)


def test_bad_virtual_key_on_gpt_is_an_anthropic_authentication_error(stack: Stack) -> None:
    client = anthropic.Anthropic(base_url=stack.base_url, api_key="sk-gw-" + "x" * 32, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        client.messages.create(model="gpt-5.5", max_tokens=10, messages=A_MSGS)
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "authentication_error"


def test_mid_stream_error_from_claude_raises_in_the_openai_sdk(oai: openai.OpenAI) -> None:
    hdrs = {"x-mock-stream-error": "overloaded_error", "x-mock-stream-error-after": "3", "x-mock-output-tokens": "9"}
    stream = oai.chat.completions.create(model="sonnet", messages=MSGS, stream=True, extra_headers=hdrs)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


# -- Anthropic SDK -> OpenAI models -----------------------------------------------------------------


def test_anthropic_sdk_calls_gpt(claude: anthropic.Anthropic, mock: Mock, tag: str) -> None:
    r = claude.messages.create(
        model="gpt-5.5",
        system="Be brief.",
        max_tokens=40,
        messages=A_MSGS,
        extra_headers={"x-mock-output-tokens": "3", "x-mock-cached-tokens": "1"},
    )
    assert r.type == "message" and r.role == "assistant"
    assert r.content[0].type == "text" and r.content[0].text == "The quick brown"
    assert r.stop_reason == "end_turn"
    assert r.usage.output_tokens == 3 and r.usage.cache_read_input_tokens == 1
    path, body, headers = sent(mock, tag)
    assert path == "/v1/chat/completions"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "say something nice"},
    ]
    assert body["max_completion_tokens"] == 40
    assert headers["authorization"].startswith("Bearer ")
    assert "x-api-key" not in headers and "anthropic-version" not in headers


def test_anthropic_stream_helper_on_gpt(claude: anthropic.Anthropic, mock: Mock, tag: str) -> None:
    with claude.messages.stream(
        model="fast", max_tokens=100, messages=A_MSGS, extra_headers={"x-mock-output-tokens": "6", "x-mock-split": "3"}
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "The quick brown fox jumps over"
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.usage.output_tokens == 6 and final.usage.input_tokens > 0
    assert final.stop_reason == "end_turn"
    body = sent(mock, tag)[1]
    assert body["model"] == "gpt-5.4-mini" and body["stream_options"] == {"include_usage": True}


def test_anthropic_tools_on_gpt(claude: anthropic.Anthropic, mock: Mock, tag: str) -> None:
    r = claude.messages.create(
        model="gpt-5.5",
        max_tokens=100,
        messages=A_MSGS,
        tools=[A_TOOL],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        extra_headers={"x-mock-content": "text,tool"},
    )
    assert r.stop_reason == "tool_use"
    uses = [b for b in r.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and isinstance(uses[0].input, dict)
    body = sent(mock, tag)[1]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    # The result goes back as a tool message right after the assistant's tool call.
    tag2 = tag + "-2"
    claude.messages.create(
        model="gpt-5.5",
        max_tokens=100,
        tools=[A_TOOL],
        messages=[
            *A_MSGS,
            {"role": "assistant", "content": [u.model_dump() for u in uses]},  # type: ignore[list-item,misc]
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18C"}]},
        ],
        extra_headers={"x-mock-tag": tag2},
    )
    msgs = sent(mock, tag2)[1]["messages"]
    assert msgs[-2]["tool_calls"][0]["id"] == uses[0].id
    assert msgs[-1] == {"role": "tool", "tool_call_id": uses[0].id, "content": "18C"}


def test_anthropic_streamed_tool_calls_on_gpt(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="gpt-5.5",
        max_tokens=100,
        messages=A_MSGS,
        tools=[A_TOOL],
        extra_headers={"x-mock-content": "text,tool,tool", "x-mock-split": "4"},
    ) as s:
        final = s.get_final_message()
    kinds = [b.type for b in final.content]
    assert kinds == ["text", "tool_use", "tool_use"]
    assert all(isinstance(b.input, dict) and b.input for b in final.content if b.type == "tool_use")
    assert final.stop_reason == "tool_use"


def test_anthropic_images_reach_gpt_as_image_urls(claude: anthropic.Anthropic, mock: Mock, tag: str) -> None:
    claude.messages.create(
        model="gpt-5.5",
        max_tokens=10,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
                    {"type": "text", "text": "What are these?"},
                ],
            }
        ],
    )
    content = sent(mock, tag)[1]["messages"][0]["content"]
    assert content[0] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    assert content[1] == {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(
    ("status", "exc", "etype"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (503, anthropic.InternalServerError, "overloaded_error"),
    ],
)
def test_gpt_errors_raise_the_anthropic_sdks_exceptions(
    claude: anthropic.Anthropic, status: int, exc: type[anthropic.APIStatusError], etype: str
) -> None:
    hdrs = {"x-mock-status": str(status), "x-mock-retry-after": "7"}
    with pytest.raises(exc) as info:
        claude.messages.create(model="gpt-5.5", max_tokens=10, messages=A_MSGS, extra_headers=hdrs)
    err = info.value
    assert err.status_code == status
    assert isinstance(err.body, dict) and err.body["type"] == "error" and err.body["error"]["type"] == etype
    if status == 429:
        assert err.response.headers["retry-after"] == "7"


def test_anthropic_refusals_name_the_field(claude: anthropic.Anthropic, mock: Mock, tag: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model="gpt-5.5", max_tokens=10, messages=A_MSGS, extra_body={"top_k": 5})
    assert isinstance(info.value.body, dict)
    assert "top_k" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.count_tokens(model="gpt-5.5", messages=A_MSGS)
    assert mock.requests(tag) == []


def test_mid_stream_error_from_gpt_raises_in_the_anthropic_sdk(claude: anthropic.Anthropic) -> None:
    hdrs = {"x-mock-stream-error": "server_error", "x-mock-stream-error-after": "3", "x-mock-output-tokens": "9"}
    with (
        pytest.raises(anthropic.APIStatusError),
        claude.messages.stream(model="gpt-5.5", max_tokens=50, messages=A_MSGS, extra_headers=hdrs) as s,
    ):
        s.get_final_message()


# -- both -------------------------------------------------------------------------------------------


def test_models_list_every_model_on_both_endpoints(stack: Stack, api_key: str) -> None:
    oai_ids = {
        m["id"]
        for m in httpx.get(f"{stack.base_url}/v1/models", headers={"authorization": f"Bearer {api_key}"}).json()["data"]
    }
    a_ids = {
        m["id"]
        for m in httpx.get(
            f"{stack.base_url}/v1/models", headers={"x-api-key": api_key, "anthropic-version": "2023-06-01"}
        ).json()["data"]
    }
    assert {"gpt-5.5", "sonnet", "claude-haiku-5-5", "fast"} <= oai_ids
    assert oai_ids == a_ids
