"""One cached answer, two wire forms: a streamed response folded into its JSON body, and a JSON body
replayed as the stream the API would have sent.

A response cache stores one normalized answer per prompt: the complete non-streamed JSON response in
the client's schema (OpenAI Chat Completions or Anthropic Messages). A miss may be streamed or not,
and so may the hit that reuses it, so the cache needs both directions:

- `accumulator(schema)` folds a live stream into the body the API would have returned with
  `stream: false` (the same merge the official SDKs do), and answers None unless the stream was
  complete and clean, so a cut, failed or unrepresentable stream is never stored;
- `render_stream(schema, body, include_usage=...)` turns a stored body back into the SSE bytes the
  API would stream, text cut into small pieces so clients still see a stream.

`accumulator(schema)` fed with `render_stream(schema, body)` gives `body` back. Rendering builds bytes
from precomputed templates around the JSON of each piece: a cache hit has about a millisecond.
Nothing here logs: the content is the user's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Final

import orjson

from ..sse import SSEEvent
from ..translate import openai_wire as ow

# Characters per streamed text piece (about five tokens): small enough that a client renders a
# stream, large enough that a long answer stays a few hundred events.
PIECE: Final = 20

SCHEMAS: Final = ("openai", "anthropic")

# Delta fields an OpenAI chat.completion.chunk may carry that the accumulator folds; any other one
# with a value (audio, the deprecated function_call) cannot be rebuilt, so such a stream is not cached.
_OPENAI_DELTA_KEYS: Final = frozenset({"role", "content", "refusal", "reasoning_content", "tool_calls", "annotations"})
# Anthropic block types whose `input` arrives as input_json_delta pieces.
_TOOL_BLOCKS: Final = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def _pieces(text: str, size: int = PIECE) -> list[str]:
    """`text` in slices of `size` code points (never splits a character); [] for ""."""
    return [text[i : i + size] for i in range(0, len(text), size)]


class StreamAccumulator(ABC):
    """Consumes the events of one streamed response in order; `result()` is the equivalent complete
    JSON response, or None when the stream was not complete and clean.

    Once the stream is known to be unusable (`failed`) further events are ignored, so the caller can
    stop feeding and drop what it holds."""

    __slots__ = ("_done", "_failed")

    schema: str = ""

    def __init__(self) -> None:
        self._done = False  # the stream's terminal event was seen
        self._failed = False

    @property
    def failed(self) -> bool:
        """True once no result can come out of this stream (error, n>1, garbage, events after the end)."""
        return self._failed

    @property
    def done(self) -> bool:
        """True once the stream's terminal event ([DONE] / message_stop) was seen."""
        return self._done

    @abstractmethod
    def on_event(self, event: SSEEvent) -> None: ...

    @abstractmethod
    def result(self) -> dict[str, Any] | None: ...

    def _load(self, event: SSEEvent) -> dict[str, Any] | None:
        """The event's JSON object; marks the stream failed (and returns None) when it is not one."""
        try:
            obj = orjson.loads(event.data or "")
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            self._failed = True
            return None
        return obj


# -- OpenAI Chat Completions ----------------------------------------------------------------------


class _ToolCall:
    __slots__ = ("args", "id", "name", "type")

    def __init__(self) -> None:
        self.id = ""
        self.type = ""
        self.name = ""
        self.args: list[str] = []


class OpenAIAccumulator(StreamAccumulator):
    """`chat.completion.chunk`s -> one `chat.completion`. Strings concatenate and tool calls merge by
    index, as the OpenAI SDK's ChatCompletionStreamState does; the last non-null usage wins."""

    __slots__ = (
        "_annotations",
        "_content",
        "_finish",
        "_head",
        "_logprobs",
        "_reasoning",
        "_refusal",
        "_role",
        "_tools",
        "_usage",
    )

    schema = "openai"

    def __init__(self) -> None:
        super().__init__()
        self._head: dict[str, Any] | None = None  # id, created, model, service_tier, system_fingerprint
        self._role = "assistant"
        self._content: list[str] = []
        self._refusal: list[str] | None = None
        self._reasoning: list[str] | None = None
        self._annotations: list[Any] = []
        self._tools: dict[int, _ToolCall] = {}
        self._logprobs: dict[str, list[Any]] | None = None
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    def on_event(self, event: SSEEvent) -> None:
        if self._failed or event.data is None:
            return
        if self._done or event.event == "error":
            self._failed = True  # anything after [DONE], or an error, makes the stream unusable
            return
        if event.data == "[DONE]":
            self._done = True
            return
        obj = self._load(event)
        if obj is None:
            return
        if obj.get("error") is not None:
            self._failed = True
            return
        if obj.get("object", "chat.completion.chunk") != "chat.completion.chunk":
            return  # not a chunk (Azure's content-filter annotations): the SDK skips these too
        choices = obj.get("choices")
        if not isinstance(choices, list):
            self._failed = True
            return
        if self._head is None:
            self._head = {"id": obj.get("id"), "created": obj.get("created"), "model": obj.get("model")}
        for key in ("service_tier", "system_fingerprint"):
            if obj.get(key) is not None:
                self._head[key] = obj[key]
        if obj.get("usage") is not None:
            self._usage = obj["usage"]
        for choice in choices:
            if not isinstance(choice, dict) or type(choice.get("index")) is not int or choice["index"] != 0:
                self._failed = True  # n > 1: one cached answer holds one choice
                return
            self._choice(choice)
            if self._failed:
                return

    def _choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key, value in delta.items():
                if value is None:
                    continue
                if key not in _OPENAI_DELTA_KEYS:
                    self._failed = True
                    return
                if key == "tool_calls":
                    if not isinstance(value, list) or not all(self._tool_delta(d) for d in value):
                        self._failed = True
                        return
                elif key == "annotations":
                    if not isinstance(value, list):
                        self._failed = True
                        return
                    self._annotations += value
                elif not isinstance(value, str):
                    self._failed = True
                    return
                elif key == "content":
                    self._content.append(value)
                elif key == "refusal":
                    if self._refusal is None:
                        self._refusal = []
                    self._refusal.append(value)
                elif key == "reasoning_content":
                    if self._reasoning is None:
                        self._reasoning = []
                    self._reasoning.append(value)
                else:
                    self._role = value
        elif delta is not None:
            self._failed = True
            return
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            if self._logprobs is None:
                self._logprobs = {"content": [], "refusal": []}
            for key in ("content", "refusal"):
                if isinstance(logprobs.get(key), list):
                    self._logprobs[key] += logprobs[key]
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]

    def _tool_delta(self, d: Any) -> bool:
        if not isinstance(d, dict) or type(d.get("index")) is not int or d["index"] < 0:
            return False
        call = self._tools.get(d["index"])
        if call is None:
            call = self._tools[d["index"]] = _ToolCall()
        if isinstance(d.get("id"), str):
            call.id += d["id"]
        if isinstance(d.get("type"), str):
            call.type = d["type"]
        fn = d.get("function")
        if fn is not None:
            if not isinstance(fn, dict):
                return False
            if isinstance(fn.get("name"), str):
                call.name += fn["name"]
            if isinstance(fn.get("arguments"), str):
                call.args.append(fn["arguments"])
        return True

    def result(self) -> dict[str, Any] | None:
        head = self._head
        if not self._done or self._failed or head is None or self._finish is None:
            return None
        calls: list[dict[str, Any]] = []
        for i in range(len(self._tools)):
            call = self._tools.get(i)
            if call is None or not call.id or not call.name or call.type not in ("", "function"):
                return None  # a gap in the indices, a call without id/name, or a non-function tool
            arguments = "".join(call.args)
            try:
                orjson.loads(arguments)
            except orjson.JSONDecodeError:
                return None
            calls.append({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}})
        text = "".join(self._content)
        refusal = None if self._refusal is None else "".join(self._refusal)
        message: dict[str, Any] = {
            "role": self._role,
            "content": text if text or not (calls or refusal is not None) else None,
            "refusal": refusal,
            "annotations": self._annotations,
        }
        if calls:
            message["tool_calls"] = calls
        if self._reasoning is not None:
            message["reasoning_content"] = "".join(self._reasoning)
        body = ow.completion(head["id"], head["created"], head["model"], message, self._finish, self._usage)
        if self._logprobs is not None:
            body["choices"][0]["logprobs"] = {k: v or None for k, v in self._logprobs.items()}
        body["service_tier"] = head.get("service_tier")
        body["system_fingerprint"] = head.get("system_fingerprint")
        return body


# -- Anthropic Messages ---------------------------------------------------------------------------


class AnthropicAccumulator(StreamAccumulator):
    """message_start … message_stop -> one `message`, merged as the Anthropic SDK's accumulate_event
    does: blocks from content_block_start, deltas appended, tool input parsed from its JSON pieces,
    message_delta's non-null usage counts overwriting message_start's."""

    __slots__ = ("_blocks", "_json", "_message", "_open")

    schema = "anthropic"

    def __init__(self) -> None:
        super().__init__()
        self._message: dict[str, Any] | None = None
        self._blocks: list[dict[str, Any]] = []
        self._json: dict[int, list[str]] = {}  # block index -> input_json_delta pieces
        self._open: set[int] = set()  # blocks started and not yet stopped

    def on_event(self, event: SSEEvent) -> None:
        if self._failed or event.data is None:
            return
        obj = self._load(event)
        if obj is None:
            return
        kind = obj.get("type") or event.event
        if kind == "ping":
            return
        if self._done or kind == "error" or event.event == "error":
            self._failed = True
            return
        message = self._message
        if kind == "message_start":
            msg = obj.get("message")
            if message is not None or not isinstance(msg, dict) or not isinstance(msg.get("usage"), dict):
                self._failed = True
                return
            self._message = {**msg, "usage": dict(msg["usage"])}
            self._blocks = [dict(b) for b in msg.get("content") or () if isinstance(b, dict)]
            return
        if message is None:
            self._failed = True  # the SDK refuses events before message_start too
            return
        if kind == "content_block_delta":
            self._delta(obj)
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if obj.get("index") != len(self._blocks) or not isinstance(block, dict):
                self._failed = True
                return
            self._open.add(len(self._blocks))
            self._blocks.append(dict(block))
        elif kind == "content_block_stop":
            self._stop(obj.get("index"))
        elif kind == "message_delta":
            delta = obj.get("delta")
            usage = obj.get("usage")
            if not isinstance(delta, dict):
                self._failed = True
                return
            for key, value in delta.items():
                if key in ("stop_reason", "stop_sequence") or value is not None:
                    message[key] = value
            if isinstance(usage, dict):
                message["usage"].update({k: v for k, v in usage.items() if v is not None})
        elif kind == "message_stop":
            self._done = True
        else:
            self._failed = True  # an event type this cache cannot replay

    def _delta(self, obj: dict[str, Any]) -> None:
        index = obj.get("index")
        delta = obj.get("delta")
        if type(index) is not int or index not in self._open or not isinstance(delta, dict):
            self._failed = True
            return
        block = self._blocks[index]
        dtype = delta.get("type")
        btype = block.get("type")
        if dtype == "text_delta" and btype == "text" and isinstance(delta.get("text"), str):
            block["text"] = (block.get("text") or "") + delta["text"]
        elif dtype == "thinking_delta" and btype == "thinking" and isinstance(delta.get("thinking"), str):
            block["thinking"] = (block.get("thinking") or "") + delta["thinking"]
        elif dtype == "signature_delta" and btype == "thinking" and isinstance(delta.get("signature"), str):
            block["signature"] = delta["signature"]
        elif dtype == "input_json_delta" and btype in _TOOL_BLOCKS and isinstance(delta.get("partial_json"), str):
            self._json.setdefault(index, []).append(delta["partial_json"])
        elif dtype == "citations_delta" and btype == "text" and isinstance(delta.get("citation"), dict):
            block["citations"] = [*(block.get("citations") or ()), delta["citation"]]
        else:
            self._failed = True

    def _stop(self, index: Any) -> None:
        if type(index) is not int or index not in self._open:
            self._failed = True
            return
        self._open.discard(index)
        pieces = self._json.pop(index, None)
        text = "".join(pieces) if pieces else ""
        if text:
            try:
                self._blocks[index]["input"] = orjson.loads(text)
            except orjson.JSONDecodeError:
                self._failed = True  # tool input cut short (max_tokens) or malformed

    def result(self) -> dict[str, Any] | None:
        message = self._message
        if not self._done or self._failed or message is None or self._open or message.get("stop_reason") is None:
            return None
        return {**message, "content": self._blocks}


def accumulator(schema: str) -> StreamAccumulator:
    """A fresh accumulator for one streamed response in `schema` ("openai" or "anthropic")."""
    if schema == "openai":
        return OpenAIAccumulator()
    if schema == "anthropic":
        return AnthropicAccumulator()
    raise ValueError(f"unknown schema {schema!r}; expected one of {SCHEMAS}")


# -- rendering ------------------------------------------------------------------------------------


def render_stream(schema: str, body: dict[str, Any], *, include_usage: bool) -> bytes:
    """The SSE bytes the API would stream for the complete response `body` (a `chat.completion` or
    a `message`). `include_usage` is OpenAI's stream_options.include_usage; Anthropic streams always
    report usage. Raises ValueError when `body` is not a single-choice response of that schema."""
    if schema == "openai":
        return _render_openai(body, include_usage)
    if schema == "anthropic":
        return _render_anthropic(body)
    raise ValueError(f"unknown schema {schema!r}; expected one of {SCHEMAS}")


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _render_openai(body: dict[str, Any], include_usage: bool) -> bytes:
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise ValueError("an OpenAI body to stream needs exactly one choice")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise ValueError("an OpenAI body to stream needs choices[0].message")
    # Every chunk is `head + delta + mid + tail`: only the delta's JSON is encoded per piece.
    top = {
        "id": body.get("id"),
        "object": "chat.completion.chunk",
        "created": body.get("created"),
        "model": body.get("model"),
        "service_tier": body.get("service_tier"),
        "system_fingerprint": body.get("system_fingerprint"),
    }
    top_json = _dumps(top)[:-1]
    head = b"data: " + top_json + b',"choices":[{"index":0,"delta":'
    mid = b',"logprobs":null,"finish_reason":null}]'
    tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
    out: list[bytes] = []
    add = out.append

    content = message.get("content")
    first = {"role": message.get("role") or "assistant", "content": "" if isinstance(content, str) else None}
    first["refusal"] = None
    add(head + _dumps(first) + mid + tail)
    for key in ("reasoning_content", "content", "refusal"):
        value = message.get(key)
        if isinstance(value, str):
            prefix = b'{"' + key.encode() + b'":'
            for piece in _pieces(value):
                add(head + prefix + _dumps(piece) + b"}" + mid + tail)
    annotations = message.get("annotations")
    if annotations:
        add(head + b'{"annotations":' + _dumps(annotations) + b"}" + mid + tail)
    for i, call in enumerate(message.get("tool_calls") or ()):
        fn = call.get("function") or {}
        start = {
            "index": i,
            "id": call.get("id"),
            "type": call.get("type") or "function",
            "function": {"name": fn.get("name"), "arguments": ""},
        }
        add(head + b'{"tool_calls":[' + _dumps(start) + b"]}" + mid + tail)
        prefix = b'{"tool_calls":[{"index":' + str(i).encode() + b',"function":{"arguments":'
        for piece in _pieces(fn.get("arguments") or ""):
            add(head + prefix + _dumps(piece) + b"}}]}" + mid + tail)
    # The last choice chunk: empty delta, the finish reason, and all logprobs at once (clients
    # append logprobs lists, so one chunk holding them all rebuilds the same list).
    last = b',"logprobs":' + _dumps(choice.get("logprobs")) + b',"finish_reason":' + _dumps(choice.get("finish_reason"))
    add(head + b"{}" + last + b"}]" + tail)
    if include_usage:
        add(b"data: " + top_json + b',"choices":[],"usage":' + _dumps(body.get("usage")) + b"}\n\n")
    add(b"data: [DONE]\n\n")
    return b"".join(out)


_USAGE_COUNTS: Final = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")


def _event(kind: bytes, obj: dict[str, Any]) -> bytes:
    return b"event: " + kind + b"\ndata: " + _dumps(obj) + b"\n\n"


def _render_anthropic(body: dict[str, Any]) -> bytes:
    content = body.get("content")
    usage = body.get("usage")
    if not isinstance(content, list) or not isinstance(usage, dict):
        raise ValueError("an Anthropic body to stream needs content and usage")
    start_usage = {**usage, "output_tokens": min(1, usage.get("output_tokens") or 0)}
    start_message = {**body, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    out = [_event(b"message_start", {"type": "message_start", "message": start_message})]
    add = out.append
    ping = _event(b"ping", {"type": "ping"})
    for index, block in enumerate(content):
        if not isinstance(block, dict):
            raise ValueError(f"content[{index}] is not a content block")
        btype = block.get("type")
        # Each delta is `head + delta JSON + b"}\n\n"`.
        head = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":' + str(index).encode()
        deltas: list[bytes] = []
        if btype == "text":
            opening = {**block, "text": ""}
            citations = block.get("citations")
            if citations:
                opening["citations"] = []
            prefix = head + b',"delta":{"type":"text_delta","text":'
            deltas = [prefix + _dumps(p) + b"}}\n\n" for p in _pieces(block.get("text") or "")]
            prefix = head + b',"delta":{"type":"citations_delta","citation":'
            deltas += [prefix + _dumps(c) + b"}}\n\n" for c in citations or ()]
        elif btype == "thinking":
            opening = {**block, "thinking": "", "signature": ""}
            prefix = head + b',"delta":{"type":"thinking_delta","thinking":'
            deltas = [prefix + _dumps(p) + b"}}\n\n" for p in _pieces(block.get("thinking") or "")]
            sig = {"type": "signature_delta", "signature": block.get("signature") or ""}
            deltas.append(head + b',"delta":' + _dumps(sig) + b"}\n\n")
        elif btype in _TOOL_BLOCKS:
            opening = {**block, "input": {}}
            prefix = head + b',"delta":{"type":"input_json_delta","partial_json":'
            text = _dumps(block.get("input", {})).decode()
            deltas = [prefix + _dumps(p) + b"}}\n\n" for p in _pieces(text)]
        else:
            opening = block  # redacted_thinking, tool results: sent whole at content_block_start
        add(_event(b"content_block_start", {"type": "content_block_start", "index": index, "content_block": opening}))
        if index == 0:
            add(ping)  # the real API pings once, after the first block opens
        out += deltas
        add(_event(b"content_block_stop", {"type": "content_block_stop", "index": index}))
    if not content:
        add(ping)
    final_usage = {k: usage[k] for k in _USAGE_COUNTS if k in usage}
    delta = {"stop_reason": body.get("stop_reason"), "stop_sequence": body.get("stop_sequence")}
    add(_event(b"message_delta", {"type": "message_delta", "delta": delta, "usage": final_usage}))
    add(_event(b"message_stop", {"type": "message_stop"}))
    return b"".join(out)


__all__ = [
    "PIECE",
    "SCHEMAS",
    "AnthropicAccumulator",
    "OpenAIAccumulator",
    "StreamAccumulator",
    "accumulator",
    "render_stream",
]
