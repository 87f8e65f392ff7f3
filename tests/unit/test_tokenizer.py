"""The offline tokenizer: exact OpenAI counts from the shipped vocabularies, the Claude estimate, and
the request-body estimates for both schemas."""

from __future__ import annotations

import dataclasses
import math
import socket
import threading
import time
from typing import Any

import pytest
import tiktoken

from extproc.accounting import tokenizer as tk
from extproc.accounting.tokenizer import (
    ANTHROPIC_DOCUMENT_TOKENS,
    ANTHROPIC_IMAGE_TOKENS,
    ANTHROPIC_TOKENS_PER_MESSAGE,
    ANTHROPIC_TOOLS_PROMPT_AUTO,
    ANTHROPIC_TOOLS_PROMPT_FORCED,
    CL100K,
    O200K,
    OPENAI_ENUM_INIT,
    OPENAI_ENUM_ITEM,
    OPENAI_FUNC_END,
    OPENAI_IMAGE_TOKENS_HIGH,
    OPENAI_IMAGE_TOKENS_LOW,
    OPENAI_PROP_INIT,
    OPENAI_PROP_KEY,
    OPENAI_REPLY_PRIMING,
    OPENAI_TOKENS_PER_MESSAGE,
    OPENAI_TOKENS_PER_NAME,
    OPENAI_TOKENS_PER_TOOL_CALL,
    count_tokens,
    encoding_for_model,
    estimate_input_tokens,
    get_encoding,
    is_exact,
)

# ---- exact counts: tiktoken's own test vectors (tests/test_encoding.py in openai/tiktoken) -----

CL100K_VECTORS = [
    ("hello world", [15339, 1917]),
    ("rer", [38149]),
    ("'rer", [2351, 81]),
    ("today\n ", [31213, 198, 220]),
    ("today\n \n", [31213, 27907]),
    ("today\n  \n", [31213, 14211]),
    (" \x850", [220, 126, 227, 15]),
    ("👍", [9468, 239, 235]),
    ("\ud83d\udc4d", [9468, 239, 235]),  # a surrogate pair is the code point
]


@pytest.mark.parametrize(("text", "ids"), CL100K_VECTORS)
def test_cl100k_matches_tiktoken_vectors(text: str, ids: list[int]) -> None:
    assert get_encoding(CL100K).encode_ordinary(text) == ids
    assert count_tokens(text, "gpt-4") == len(ids)


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        # tiktoken 0.14 on the hash-verified o200k_base file (tiktoken's tests only check round-trips).
        ("hello world", [24912, 2375]),
        ("", []),
    ],
)
def test_o200k_known_ids(text: str, ids: list[int]) -> None:
    assert get_encoding(O200K).encode_ordinary(text) == ids
    assert count_tokens(text, "gpt-4o") == len(ids)


def test_lone_surrogate_is_replaced_not_raised() -> None:
    assert count_tokens("\ud83d", "gpt-4") == count_tokens("\ufffd", "gpt-4")


def test_special_token_text_counts_as_text() -> None:
    # API request content containing "<|endoftext|>" is plain text, not the special token.
    assert count_tokens("<|endoftext|>", "gpt-4o") > 1
    assert count_tokens("hello <|endoftext|>", "gpt-4") == 1 + count_tokens(" <|endoftext|>", "gpt-4")


def test_large_repetitive_input() -> None:
    assert count_tokens("x" * 200_000, "gpt-4o") > 0


@pytest.mark.parametrize("name", [O200K, CL100K])
def test_vocabulary_matches_installed_tiktoken(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """pat_str, special tokens and the pinned SHA-256 are those of tiktoken's own constructors."""
    from tiktoken_ext import openai_public  # type: ignore[import-untyped]

    seen: dict[str, Any] = {}

    def fake_load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        seen["url"], seen["hash"] = url, expected_hash
        return tk.read_ranks(name)

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    theirs = getattr(openai_public, name)()
    ours = tk._VOCABULARIES[name]
    assert theirs["pat_str"] == ours.pat_str
    assert theirs["special_tokens"] == dict(ours.special_tokens)
    assert seen["hash"] == ours.sha256
    assert seen["url"].endswith(f"/{name}.tiktoken")
    # And the encoder tiktoken would build from them gives the same ids.
    reference = tiktoken.Encoding(**theirs)
    sample = "Hello, wörld! 日本語 👍🏽  code(): return x**2\n\n\tok"
    assert reference.encode_ordinary(sample) == get_encoding(name).encode_ordinary(sample)


# ---- offline, once, thread-safe ---------------------------------------------------------------


def test_loads_with_network_disabled(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    def no_network(*args: object, **kwargs: object) -> Any:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: nothing cached to fall back on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tk, "_loaded", {})  # force a fresh load under these conditions
    assert count_tokens("hello world", "gpt-4o") == 2
    assert count_tokens("hello world", "gpt-3.5-turbo") == 2
    assert count_tokens("hello world", "claude-sonnet-4-5") == 4
    assert list(tmp_path.iterdir()) == []


def test_loaded_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "_loaded", {})
    calls: list[str] = []
    real_load = tk._load

    def counting_load(name: str) -> tiktoken.Encoding:
        calls.append(name)
        time.sleep(0.05)  # widen the race window
        return real_load(name)

    monkeypatch.setattr(tk, "_load", counting_load)
    results: list[tiktoken.Encoding] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(get_encoding(CL100K))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [CL100K]
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_corrupt_vocabulary_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "_loaded", {})
    bad = dataclasses.replace(tk._VOCABULARIES[CL100K], sha256="0" * 64)
    monkeypatch.setitem(tk._VOCABULARIES, CL100K, bad)
    with pytest.raises(tk.TokenizerDataError, match="SHA-256"):
        get_encoding(CL100K)


def test_unknown_encoding() -> None:
    with pytest.raises(KeyError, match="p50k_base"):
        get_encoding("p50k_base")


def test_counting_is_fast() -> None:
    text = ("The quick brown fox jumps over the lazy dog. " * 10_000).rstrip()  # 10 tokens a sentence
    get_encoding(O200K)
    start = time.perf_counter()
    n = count_tokens(text, "gpt-4o")
    elapsed = time.perf_counter() - start
    assert n == 100_000
    assert elapsed < 2.0  # ~0.04 s measured; generous for a loaded CI machine


# ---- model -> encoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding", "exact"),
    [
        ("gpt-4o", O200K, True),
        ("gpt-4o-mini-2024-07-18", O200K, True),
        ("chatgpt-4o-latest", O200K, True),
        ("gpt-4.1", O200K, True),
        ("gpt-4.1-nano", O200K, True),
        ("gpt-4.5-preview", O200K, True),
        ("gpt-5", O200K, True),
        ("gpt-5.4-mini", O200K, True),
        ("gpt-5.5", O200K, True),
        ("gpt-oss-120b", O200K, True),
        ("o1", O200K, True),
        ("o1-pro", O200K, True),
        ("o3", O200K, True),
        ("o3-mini-2025-01-31", O200K, True),
        ("o4-mini", O200K, True),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc", O200K, True),
        ("GPT-4o", O200K, True),
        ("gpt-4", CL100K, True),
        ("gpt-4-turbo", CL100K, True),
        ("gpt-4-0613", CL100K, True),
        ("gpt-3.5-turbo", CL100K, True),
        ("gpt-35-turbo", CL100K, True),
        ("text-embedding-3-small", CL100K, True),
        ("gpt-40", O200K, False),  # not gpt-4 + boundary
        ("o10-model", O200K, False),
        ("llama-3-70b", O200K, False),
        ("", O200K, False),
        ("claude-sonnet-4-5", O200K, False),
        ("claude-haiku-5-5", O200K, False),
        ("anthropic.claude-3-haiku-20240307-v1:0", O200K, False),
    ],
)
def test_model_encoding(model: str, encoding: str, exact: bool) -> None:
    assert encoding_for_model(model) == encoding
    assert is_exact(model) is exact


# ---- the Claude estimate ----------------------------------------------------------------------


def _claude_base(text: str) -> int:
    return max(len(get_encoding(O200K).encode_ordinary(text)), math.ceil(len(text) / 3.5))


@pytest.mark.parametrize(
    ("model", "new_tokenizer"),
    [
        ("claude-3-haiku-20240307", False),
        ("claude-3-5-haiku-latest", False),
        ("claude-3-7-sonnet-20250219", False),
        ("claude-sonnet-4-20250514", False),
        ("claude-opus-4-1@20250805", False),
        ("claude-sonnet-4-5-20250929", False),
        ("claude-haiku-4-5", False),
        ("claude-opus-4-6", False),
        ("claude-opus-4-7", True),
        ("claude-opus-4-8", True),
        ("claude-opus-5", True),
        ("claude-sonnet-5", True),
        ("claude-sonnet-5-5", True),
        ("claude-haiku-5-5", True),
        ("claude-fable-5-1", True),
        ("claude-next", True),  # unreadable: the larger estimate
    ],
)
@pytest.mark.parametrize(
    "text", ["hello world", "The quick brown fox jumps over the lazy dog.", "日本語のテキストを数えます。" * 20]
)
def test_claude_estimate(model: str, new_tokenizer: bool, text: str) -> None:
    base = _claude_base(text)
    expected = math.ceil(base * 13 / 10) if new_tokenizer else base
    assert count_tokens(text, model) == expected


def test_claude_estimate_known_values() -> None:
    # "hello world": 11 chars -> ceil(11 / 3.5) = 4 > 2 o200k tokens; x1.3 -> 6 on the new tokenizer.
    assert count_tokens("hello world", "claude-sonnet-4-5") == 4
    assert count_tokens("hello world", "claude-sonnet-5-5") == 6
    # CJK: the o200k count wins over the characters rule.
    cjk = "日本語" * 100
    assert count_tokens(cjk, "claude-haiku-4-5") == len(get_encoding(O200K).encode_ordinary(cjk))
    assert count_tokens("", "claude-opus-4-8") == 0


# ---- OpenAI Chat Completions estimates ----------------------------------------------------------


def c(text: str, model: str = "gpt-4o") -> int:
    return count_tokens(text, model)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {
                    "type": "string",
                    "description": "The unit of temperature to return",
                    "enum": ["celsius", "fahrenheit"],
                },
            },
            "required": ["location"],
        },
    },
}


def weather_tool_tokens(func_init: int, model: str = "gpt-4o") -> int:
    return (
        func_init
        + c("get_current_weather:Get the current weather in a given location", model)
        + OPENAI_PROP_INIT
        + OPENAI_PROP_KEY
        + c("location:string:The city and state, e.g. San Francisco, CA", model)
        + OPENAI_PROP_KEY
        + OPENAI_ENUM_INIT
        + OPENAI_ENUM_ITEM
        + c("celsius", model)
        + OPENAI_ENUM_ITEM
        + c("fahrenheit", model)
        + c("unit:string:The unit of temperature to return", model)
        + OPENAI_FUNC_END
    )


BIG_IMAGE = "data:image/png;base64," + "A" * 500_000
FRAME = OPENAI_TOKENS_PER_MESSAGE


OPENAI_CASES: list[tuple[str, dict[str, Any], int]] = [
    ("empty body", {}, 0),
    ("no messages", {"model": "gpt-4o", "messages": []}, 0),
    (
        "one user message",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}]},
        FRAME + 1 + 2 + OPENAI_REPLY_PRIMING,  # "user" is 1 token, "hello world" 2: 9 in all
    ),
    (
        "system + user",
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "hello world"},
            ],
        },
        FRAME + c("system") + c("You are terse.") + FRAME + c("user") + 2 + OPENAI_REPLY_PRIMING,
    ),
    (
        "name adds its tokens + 1",
        {"model": "gpt-4o", "messages": [{"role": "user", "name": "example_user", "content": "hello world"}]},
        FRAME + 1 + 2 + c("example_user") + OPENAI_TOKENS_PER_NAME + OPENAI_REPLY_PRIMING,
    ),
    (
        "text parts",
        {
            "model": "gpt-4o",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hello world"}, {"type": "text", "text": "hello world"}],
                }
            ],
        },
        FRAME + 1 + 2 + 2 + OPENAI_REPLY_PRIMING,
    ),
    (
        "images: fixed per image, base64 never counted",
        {
            "model": "gpt-4o",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hello world"},
                        {"type": "image_url", "image_url": {"url": BIG_IMAGE, "detail": "low"}},
                        {"type": "image_url", "image_url": {"url": BIG_IMAGE}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}},
                    ],
                }
            ],
        },
        FRAME
        + 1
        + 2
        + OPENAI_IMAGE_TOKENS_LOW
        + OPENAI_IMAGE_TOKENS_HIGH
        + OPENAI_IMAGE_TOKENS_HIGH
        + OPENAI_REPLY_PRIMING,
    ),
    (
        "assistant tool call and tool result",
        {
            "model": "gpt-4o",
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_current_weather", "arguments": '{"location":"Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            ],
        },
        FRAME
        + c("assistant")
        + OPENAI_TOKENS_PER_TOOL_CALL
        + c("get_current_weather")
        + c('{"location":"Paris"}')
        + FRAME
        + c("tool")
        + c("18C")
        + c("call_1")
        + OPENAI_REPLY_PRIMING,
    ),
    (
        "tool definitions, o200k model (cookbook method)",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}], "tools": [WEATHER_TOOL]},
        9 + weather_tool_tokens(7),
    ),
    (
        "tool definitions, cl100k model",
        {"model": "gpt-4", "messages": [{"role": "user", "content": "hello world"}], "tools": [WEATHER_TOOL]},
        9 + weather_tool_tokens(10, "gpt-4"),
    ),
    (
        "legacy functions",
        {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "hello world"}],
            "functions": [WEATHER_TOOL["function"]],
        },
        9 + weather_tool_tokens(7),
    ),
    (
        "malformed parts are skipped",
        {
            "model": "gpt-4o",
            "messages": ["junk", {"role": "user", "content": [1, {"type": "text"}, {"no": "type"}]}, None],
            "tools": "nope",
        },
        FRAME + 1 + OPENAI_REPLY_PRIMING,
    ),
    ("messages not a list", {"model": "gpt-4o", "messages": {"role": "user"}}, 0),
]


@pytest.mark.parametrize(
    ("body", "expected"), [(b, e) for _, b, e in OPENAI_CASES], ids=[n for n, _, _ in OPENAI_CASES]
)
def test_openai_estimate(body: dict[str, Any], expected: int) -> None:
    assert estimate_input_tokens("openai", body) == expected


def test_openai_nested_schema_counts_its_json() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "description": "d",
            "parameters": {
                "type": "object",
                "properties": {"items": {"type": "array", "description": "x", "items": {"type": "string"}}},
            },
        },
    }
    body = {"model": "gpt-4o", "messages": [], "tools": [tool]}
    expected = 7 + c("f:d") + OPENAI_PROP_INIT + OPENAI_PROP_KEY + c("items:array:x") + c('{"items":{"type":"string"}}')
    assert estimate_input_tokens("openai", body) == expected + OPENAI_FUNC_END


# ---- Anthropic Messages estimates -----------------------------------------------------------------

SONNET = "claude-sonnet-4-5"


def a(text: str) -> int:
    return count_tokens(text, SONNET)


ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Get the weather",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
SCHEMA_JSON = '{"type":"object","properties":{"city":{"type":"string"}}}'

ANTHROPIC_CASES: list[tuple[str, dict[str, Any], int]] = [
    ("empty body", {}, 0),
    (
        "string system + user",
        {"model": SONNET, "system": "Be terse.", "messages": [{"role": "user", "content": "hello world"}]},
        a("Be terse.") + ANTHROPIC_TOKENS_PER_MESSAGE + a("hello world"),
    ),
    (
        "system as text blocks",
        {
            "model": SONNET,
            "system": [
                {"type": "text", "text": "Be terse."},
                {"type": "text", "text": "Be kind.", "cache_control": {}},
            ],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}],
        },
        a("Be terse.") + a("Be kind.") + ANTHROPIC_TOKENS_PER_MESSAGE + a("hello world"),
    ),
    (
        "image: fixed, base64 never counted",
        {
            "model": SONNET,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "A" * 500_000},
                        },
                        {"type": "text", "text": "hello world"},
                    ],
                }
            ],
        },
        ANTHROPIC_TOKENS_PER_MESSAGE + ANTHROPIC_IMAGE_TOKENS + a("hello world"),
    ),
    (
        "tool_use and tool_result",
        {
            "model": SONNET,
            "messages": [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "ok"}]},
                    ],
                },
            ],
        },
        ANTHROPIC_TOKENS_PER_MESSAGE
        + a("Checking.")
        + a("get_weather")
        + a('{"city":"Paris"}')
        + ANTHROPIC_TOKENS_PER_MESSAGE
        + a("18C")
        + a("ok"),
    ),
    (
        "documents: text counted, PDF fixed",
        {
            "model": SONNET,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hello"}},
                        {
                            "type": "document",
                            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
                        },
                    ],
                }
            ],
        },
        ANTHROPIC_TOKENS_PER_MESSAGE + a("hello") + ANTHROPIC_DOCUMENT_TOKENS,
    ),
    (
        "tools, tool_choice auto",
        {"model": SONNET, "messages": [], "tools": [ANTHROPIC_TOOL]},
        ANTHROPIC_TOOLS_PROMPT_AUTO + a("get_weather") + a("Get the weather") + a(SCHEMA_JSON),
    ),
    (
        "tools, tool_choice any",
        {"model": SONNET, "messages": [], "tools": [ANTHROPIC_TOOL], "tool_choice": {"type": "any"}},
        ANTHROPIC_TOOLS_PROMPT_FORCED + a("get_weather") + a("Get the weather") + a(SCHEMA_JSON),
    ),
    (
        "thinking blocks count, redacted ones do not",
        {
            "model": SONNET,
            "messages": [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Let me think.", "signature": "sig"},
                        {"type": "redacted_thinking", "data": "opaque" * 100},
                    ],
                }
            ],
        },
        ANTHROPIC_TOKENS_PER_MESSAGE + a("Let me think."),
    ),
    (
        "malformed parts are skipped",
        {"model": SONNET, "system": 5, "messages": [None, {"role": "user", "content": [3, {"type": "text"}]}]},
        ANTHROPIC_TOKENS_PER_MESSAGE,
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [(b, e) for _, b, e in ANTHROPIC_CASES], ids=[n for n, _, _ in ANTHROPIC_CASES]
)
def test_anthropic_estimate(body: dict[str, Any], expected: int) -> None:
    assert estimate_input_tokens("anthropic", body) == expected


def test_anthropic_estimate_uses_the_models_tokenizer_generation() -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]}
    old = estimate_input_tokens("anthropic", {**body, "model": "claude-haiku-4-5"})
    new = estimate_input_tokens("anthropic", {**body, "model": "claude-haiku-5-5"})
    assert new > old


def test_model_argument_overrides_the_body() -> None:
    """The body may name a public alias; the caller passes the upstream model."""
    body: dict[str, Any] = {"model": "fast", "messages": [{"role": "user", "content": "hello world"}]}
    assert estimate_input_tokens("openai", body, "gpt-4") == estimate_input_tokens("openai", {**body, "model": "gpt-4"})
    claude = {"model": "sonnet", "messages": [{"role": "user", "content": "hello world"}]}
    assert estimate_input_tokens("anthropic", claude, "claude-sonnet-4-5") == ANTHROPIC_TOKENS_PER_MESSAGE + 4
    assert estimate_input_tokens("anthropic", claude, "claude-sonnet-5-5") == ANTHROPIC_TOKENS_PER_MESSAGE + 6


def test_unknown_schema() -> None:
    with pytest.raises(ValueError, match="unknown schema"):
        estimate_input_tokens("gemini", {})
