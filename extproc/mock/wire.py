"""Response bodies and SSE streams shaped as the real OpenAI Chat Completions and Anthropic Messages
APIs send them, with deterministic token counts.

Kept apart from the HTTP server so tests can compare shapes without a socket. Nothing here imports
the gateway (`extproc.sse`, `extproc.providers`, ...): the mock is the reference the gateway's
parsers and accounting are checked against, and a helper shared with the code under test would
let one bug hide itself on both sides. So the SSE encoder below is the mock's own.

Shapes follow what the providers' documentation and recorded live responses show:
- OpenAI streams carry `"usage": null` on every chunk when `stream_options.include_usage` is set
  and one extra chunk with `"choices": []` and the usage before `data: [DONE]`; no `usage` key
  at all otherwise. Every chunk carries an `obfuscation` pad unless the request set
  `stream_options.include_obfuscation: false`.
- Anthropic streams: `message_start` (usage with the input and cache counts and a small initial
  output count), the first `content_block_start`, `ping`, the blocks, `message_delta` whose
  `usage.output_tokens` is the cumulative final total (today's API also repeats the input and
  cache counts there), `message_stop`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson

# -- SSE encoding -------------------------------------------------------------------------------


def sse_event(data: str | bytes, event: str | None = None, *, crlf: bool = False) -> bytes:
    """One complete event block: optional `event:` line, one `data:` line per line of `data`, a
    blank line. `crlf` frames every line with CRLF instead of LF (both are valid SSE), so tests can
    check that the gateway's parser does not assume LF."""
    eol = "\r\n" if crlf else "\n"
    text = data.decode() if isinstance(data, bytes) else data
    lines = [f"event: {event}"] if event else []
    lines += [f"data: {line}" for line in text.split("\n")]
    return (eol.join(lines) + eol + eol).encode()


@dataclass(frozen=True, slots=True)
class WireEvent:
    """One SSE event as bytes, plus the usage the provider has reported once it is out (None when
    this event reports none), so the server can log exactly what reached the wire even when the
    stream is cut before its end."""

    raw: bytes
    reported_usage: dict[str, Any] | None = None


# -- errors -------------------------------------------------------------------------------------

# (status -> (type, code, message)) for OpenAI; the shapes real api.openai.com returns.
OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again in 1s."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}

# (status -> (type, message)), the types Anthropic documents per HTTP status.
ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}


def openai_error_object(status: int, message: str | None = None, param: str | None = None) -> dict[str, Any]:
    etype, code, default = OPENAI_ERRORS.get(status, ("server_error", None, "Error."))
    return {"message": message or default, "type": etype, "param": param, "code": code}


def openai_error(status: int, message: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": openai_error_object(status, message, param)})


def anthropic_error(status: int, request_id: str | None, message: str | None = None) -> bytes:
    etype, default = ANTHROPIC_ERRORS.get(status, ("api_error", "Internal server error"))
    body: dict[str, Any] = {"type": "error", "error": {"type": etype, "message": message or default}}
    if request_id is not None:
        body["request_id"] = request_id
    return orjson.dumps(body)


def openai_stream_error(etype: str, *, crlf: bool = False) -> WireEvent:
    """What OpenAI sends when a stream fails after it started: a bare `data:` event holding the usual
    error object (no `[DONE]` follows)."""
    status = next((s for s, (t, _, _) in OPENAI_ERRORS.items() if t == etype), 500)
    err = {**openai_error_object(status), "type": etype}
    return WireEvent(sse_event(orjson.dumps({"error": err}), crlf=crlf))


def anthropic_stream_error(etype: str, *, crlf: bool = False) -> WireEvent:
    """Anthropic's mid-stream `event: error` (e.g. `overloaded_error`, which would be an HTTP 529
    outside a stream); no `message_stop` follows."""
    message = next((m for t, m in ANTHROPIC_ERRORS.values() if t == etype), "Internal server error")
    body = {"type": "error", "error": {"type": etype, "message": message}}
    return WireEvent(sse_event(orjson.dumps(body), "error", crlf=crlf))


# -- the answer: content blocks and their token counts -------------------------------------------

WORDS = (
    "The",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "the",
    "gateway",
    "counts",
    "every",
    "token",
)
THOUGHTS = ("Let", "me", "think", "this", "through", "step", "by", "step", "before", "answering.")
# A tool call's arguments, streamed in these pieces (the way the real APIs split JSON); one token each.
TOOL_ARGUMENT_PIECES = ('{"', "location", '":"', "Paris", ",", " France", '","', "unit", '":"', "celsius", '"}')
DEFAULT_TOOL = "get_weather"
DEFAULT_REASONING_TOKENS = 6
BLOCK_KINDS = ("text", "thinking", "tool")

BlockKind = Literal["text", "thinking", "tool"]
Stop = Literal["end", "length", "tool"]
OPENAI_FINISH: dict[Stop, str] = {"end": "stop", "length": "length", "tool": "tool_calls"}
ANTHROPIC_STOP: dict[Stop, str] = {"end": "end_turn", "length": "max_tokens", "tool": "tool_use"}


def _stop(table: dict[Stop, str], reason: str) -> Stop:
    return next((stop for stop, r in table.items() if r == reason), "end")


@dataclass(frozen=True, slots=True)
class Block:
    """One content block; every piece is one token (the mock's tokenizer) and one stream delta."""

    kind: BlockKind
    pieces: tuple[str, ...]
    name: str = ""  # tool name
    id: str = ""  # tool call id

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def signature(self) -> str:
        """A thinking block's signature: opaque like the real one, but a function of the text."""
        return base64.b64encode(b"mock-sig:" + hashlib.sha256(self.text.encode()).digest()).decode()

    def tool_input(self) -> dict[str, Any]:
        """The parsed arguments; `{}` when they were cut short (max tokens) and do not parse."""
        try:
            value = orjson.loads(self.text)
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class Answer:
    blocks: tuple[Block, ...]
    stop: Stop
    # OpenAI reasoning tokens: billed as completion tokens, never shown in Chat Completions.
    hidden_reasoning: int = 0

    @property
    def output_tokens(self) -> int:
        return self.hidden_reasoning + sum(len(b.pieces) for b in self.blocks)

    @property
    def reasoning_tokens(self) -> int:
        return self.hidden_reasoning + sum(len(b.pieces) for b in self.blocks if b.kind == "thinking")

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.blocks if b.kind == "text")

    @property
    def tools(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.kind == "tool")


def _words(vocabulary: Sequence[str], n: int, offset: int = 0) -> tuple[str, ...]:
    return tuple(("" if offset + i == 0 else " ") + vocabulary[(offset + i) % len(vocabulary)] for i in range(n))


def build_answer(
    schema: Literal["openai", "anthropic"],
    content: Sequence[str] = ("text",),
    text_tokens: int = 8,
    reasoning_tokens: int | None = None,
    cap: object = None,
    tool_names: Sequence[str] = (),
    id_prefix: str = "call_mock",
) -> Answer:
    """The blocks of one answer, in order, cut at `cap` (the request's max tokens) the way a real
    model stops: everything generated counts, reasoning first.

    `content` lists block kinds. A `text` block has `text_tokens` tokens; a `thinking` block has
    `reasoning_tokens` (default DEFAULT_REASONING_TOKENS) and is hidden reasoning for OpenAI; a
    `tool` block calls the request's tools in turn (DEFAULT_TOOL when it declares none). Reasoning
    tokens asked for without a thinking block add one first: models reason before they answer.
    """
    kinds = [k for k in content if k in BLOCK_KINDS] or ["text"]
    reasoning = reasoning_tokens if reasoning_tokens is not None else 0
    if reasoning_tokens is None and "thinking" in kinds:
        reasoning = DEFAULT_REASONING_TOKENS
    if reasoning and "thinking" not in kinds:
        kinds.insert(0, "thinking")
    blocks: list[Block] = []
    hidden = 0
    text_offset = 0
    for kind in kinds:
        if kind == "thinking":
            if schema == "openai":
                hidden += reasoning
            else:
                blocks.append(Block("thinking", _words(THOUGHTS, reasoning)))
        elif kind == "text":
            blocks.append(Block("text", _words(WORDS, text_tokens, text_offset)))
            text_offset += text_tokens
        else:
            n = sum(1 for b in blocks if b.kind == "tool")
            name = tool_names[n % len(tool_names)] if tool_names else DEFAULT_TOOL
            blocks.append(Block("tool", TOOL_ARGUMENT_PIECES, name=name, id=f"{id_prefix}_{n}"))
    natural: Stop = "tool" if any(b.kind == "tool" for b in blocks) else "end"
    answer = Answer(tuple(blocks), natural, hidden)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0 or answer.output_tokens <= cap:
        return answer
    left = cap - min(hidden, cap)
    kept: list[Block] = []
    for block in blocks:
        if left <= 0:
            break
        kept.append(replace(block, pieces=block.pieces[:left]))
        left -= len(kept[-1].pieces)
    return Answer(tuple(kept), "length", min(hidden, cap))


# -- usage --------------------------------------------------------------------------------------


def openai_usage(prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """Chat Completions usage: `cached_tokens` is part of `prompt_tokens` and `reasoning_tokens` part
    of `completion_tokens`, as the real API counts them."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def anthropic_usage(
    input_tokens: int,
    output_tokens: int,
    *,
    cache_creation: int = 0,
    cache_read: int = 0,
    cache_ttl: Literal["5m", "1h"] = "5m",
) -> dict[str, Any]:
    """Messages usage: `input_tokens` excludes the cache counts (the total input is the sum of the
    three), and `cache_creation` splits the written tokens by cache TTL."""
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": cache_creation if cache_ttl == "5m" else 0,
            "ephemeral_1h_input_tokens": cache_creation if cache_ttl == "1h" else 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


# -- OpenAI -------------------------------------------------------------------------------------

_OBFUSCATION = "Zq3xV8kPm2Tn7wLc"


def _obfuscation(choices: list[dict[str, Any]]) -> str:
    """A pad like the real one (which normalizes chunk sizes), but deterministic."""
    n = 16 - len(orjson.dumps(choices)) % 16
    return _OBFUSCATION[:n]


def _openai_tool_call(block: Block) -> dict[str, Any]:
    return {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.text}}


def openai_completion_body(cid: str, created: int, model: str, answer: Answer, usage: dict[str, Any]) -> bytes:
    tools = answer.tools
    message: dict[str, Any] = {
        "role": "assistant",
        "content": answer.text if answer.text or not tools else None,
    }
    if tools:
        message["tool_calls"] = [_openai_tool_call(b) for b in tools]
    message |= {"refusal": None, "annotations": []}
    finish = OPENAI_FINISH[answer.stop]
    return orjson.dumps(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
        }
    )


def openai_stream_events(
    cid: str,
    created: int,
    model: str,
    answer: Answer,
    usage: dict[str, Any] | None,
    *,
    obfuscation: bool = True,
    crlf: bool = False,
) -> list[WireEvent]:
    """One streamed completion. `usage` None means the request did not ask for it (no
    `stream_options.include_usage`): then no chunk has a `usage` key."""
    base: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, final_usage: Any = None) -> WireEvent:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        obj: dict[str, Any] = {**base, "choices": choices}
        if usage is not None:
            obj["usage"] = final_usage
        if obfuscation:
            obj["obfuscation"] = _obfuscation(choices)
        return WireEvent(sse_event(orjson.dumps(obj), crlf=crlf), final_usage)

    def tool_head(index: int, block: Block) -> dict[str, Any]:
        fn = {"name": block.name, "arguments": ""}
        return {"index": index, "id": block.id, "type": "function", "function": fn}

    events: list[WireEvent] = []
    first = answer.blocks[0] if answer.blocks else None
    if first is not None and first.kind == "tool":
        # A call that opens the answer rides on the role chunk, as the real API sends it.
        role = {"role": "assistant", "content": None, "tool_calls": [tool_head(0, first)], "refusal": None}
        events.append(chunk(role))
    else:
        events.append(chunk({"role": "assistant", "content": "", "refusal": None}))
    tool_index = 0
    for block in answer.blocks:
        if block.kind == "text":
            events += [chunk({"content": p}) for p in block.pieces]
        elif block.kind == "tool":
            if block is not first:
                events.append(chunk({"tool_calls": [tool_head(tool_index, block)]}))
            events += [
                chunk({"tool_calls": [{"index": tool_index, "function": {"arguments": p}}]}) for p in block.pieces
            ]
            tool_index += 1
    events.append(chunk({}, OPENAI_FINISH[answer.stop]))
    if usage is not None:
        events.append(chunk(None, final_usage=usage))
    events.append(WireEvent(sse_event("[DONE]", crlf=crlf)))
    return events


def openai_completion(
    cid: str, created: int, model: str, text: str, finish: str, prompt: int, completion: int
) -> bytes:
    """A plain-text completion with the given counts (kept for tests that build bodies directly)."""
    stop = _stop(OPENAI_FINISH, finish)
    answer = Answer((Block("text", (text,)),), stop)
    return openai_completion_body(cid, created, model, answer, openai_usage(prompt, completion))


def openai_stream(
    cid: str, created: int, model: str, pieces: list[str], finish: str, prompt: int, include_usage: bool
) -> list[bytes]:
    """The events of one streamed plain-text completion, each a complete `data: ...\\n\\n` block."""
    stop = _stop(OPENAI_FINISH, finish)
    answer = Answer((Block("text", tuple(pieces)),), stop)
    usage = openai_usage(prompt, len(pieces)) if include_usage else None
    return [e.raw for e in openai_stream_events(cid, created, model, answer, usage)]


# -- Anthropic ----------------------------------------------------------------------------------


def _anthropic_block(block: Block) -> dict[str, Any]:
    if block.kind == "thinking":
        return {"type": "thinking", "thinking": block.text, "signature": block.signature}
    if block.kind == "tool":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.tool_input()}
    return {"type": "text", "text": block.text}


def anthropic_message_body(mid: str, model: str, answer: Answer, usage: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [_anthropic_block(b) for b in answer.blocks],
            "stop_reason": ANTHROPIC_STOP[answer.stop],
            "stop_sequence": None,
            "usage": usage,
        }
    )


DeltaUsage = Literal["full", "output"]


def anthropic_stream_events(
    mid: str,
    model: str,
    answer: Answer,
    usage: dict[str, Any],
    *,
    delta_usage: DeltaUsage = "full",
    crlf: bool = False,
) -> list[WireEvent]:
    """One streamed message. `usage` is the final usage (as the JSON body would carry it);
    message_start reports it with an initial output count of 1, message_delta the cumulative
    output total, with the input and cache counts repeated (`delta_usage="full"`, today's API) or
    not (`"output"`, the older form)."""

    def ev(name: str, obj: dict[str, Any], reported: dict[str, Any] | None = None) -> WireEvent:
        return WireEvent(sse_event(orjson.dumps(obj), name, crlf=crlf), reported)

    start_usage = {**usage, "output_tokens": min(1, usage["output_tokens"])}
    start = {
        "type": "message_start",
        "message": {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        },
    }
    events = [ev("message_start", start, start_usage)]
    ping = ev("ping", {"type": "ping"})
    for index, block in enumerate(answer.blocks):
        opening: dict[str, Any]
        if block.kind == "thinking":
            opening = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": p} for p in block.pieces]
            deltas.append({"type": "signature_delta", "signature": block.signature})
        elif block.kind == "tool":
            opening = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in ("", *block.pieces)]
        else:
            opening = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in block.pieces]
        begin = {"type": "content_block_start", "index": index, "content_block": opening}
        events.append(ev("content_block_start", begin))
        if index == 0:
            events.append(ping)
        events += [
            ev("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas
        ]
        events.append(ev("content_block_stop", {"type": "content_block_stop", "index": index}))
    if not answer.blocks:
        events.append(ping)
    if delta_usage == "full":
        keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
        final = {k: usage[k] for k in keys}
    else:
        final = {"output_tokens": usage["output_tokens"]}
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": ANTHROPIC_STOP[answer.stop], "stop_sequence": None},
        "usage": final,
    }
    events.append(ev("message_delta", delta, {**start_usage, **final}))
    events.append(ev("message_stop", {"type": "message_stop"}))
    return events


def anthropic_message(mid: str, model: str, text: str, stop: str, prompt: int, output: int) -> bytes:
    """A plain-text message with the given counts (kept for tests that build bodies directly)."""
    answer = Answer((Block("text", (text,)),), _stop(ANTHROPIC_STOP, stop))
    return anthropic_message_body(mid, model, answer, anthropic_usage(prompt, output))


def anthropic_stream(mid: str, model: str, pieces: list[str], stop: str, prompt: int) -> list[bytes]:
    """The events of one streamed plain-text message."""
    answer = Answer((Block("text", tuple(pieces)),), _stop(ANTHROPIC_STOP, stop))
    return [e.raw for e in anthropic_stream_events(mid, model, answer, anthropic_usage(prompt, len(pieces)))]
