"""An Anthropic Messages client served by an OpenAI Chat Completions model.

Apps written against the Anthropic SDK (`/v1/messages`) can be routed to a model only an
OpenAI-schema provider serves. The request is rewritten into a Chat Completions body, and the
JSON response, the SSE stream and error bodies back into Anthropic's shapes, so the Anthropic SDK
(including `client.messages.stream(...)`'s accumulator) sees an ordinary Messages exchange.

Mapping notes:
- `system` becomes the first message (`role: system`); text blocks are joined with a blank line.
- A user turn's `tool_result` blocks become `role: tool` messages placed before the rest of that
  turn, since OpenAI wants tool messages right after the assistant message that called them.
- `thinking.budget_tokens` becomes `reasoning_effort` (< 4096 low, < 16384 medium, else high);
  `thinking: {type: adaptive}` leaves the provider's default effort.
- Streams always ask for OpenAI's usage chunk: Anthropic streams always report usage.
- OpenAI usage counts cached tokens inside `prompt_tokens`; Anthropic's `input_tokens` excludes
  them, so `input_tokens = prompt_tokens - cached_tokens` and the rest are cache reads.
- A `finish_reason: stop` with tool calls in the answer is reported as `tool_use` (some
  OpenAI-compatible servers say `stop` there; Anthropic clients loop on `tool_use`).
- `reasoning_content` (sent by some OpenAI-compatible servers) becomes a thinking block with an
  empty signature; tool call arguments that are not a JSON object are kept as
  `{"_raw_arguments": "<the text>"}` instead of being lost.

Dropped, as safe (no OpenAI field, and dropping does not change what the model is asked):
- `cache_control` anywhere: OpenAI caches prompt prefixes automatically.
- `tool_result.is_error`: the result text itself still reaches the model.
- `thinking` / `redacted_thinking` blocks in assistant turns: OpenAI cannot take reasoning back.
- Which stop sequence matched: OpenAI does not say, so `stop_sequence` is always null and a stop
  sequence ends the turn as `end_turn`.

Refused with a 400 naming the field (`unsupported`): `top_k`; more than 4 `stop_sequences`;
server tools (`tools[i].type` other than `custom`); content blocks other than text, image,
tool_result (user) and text, tool_use, thinking (assistant), e.g. `document`, `search_result`;
images inside tool results; image sources other than base64 and url; thinking types other than
enabled, disabled and adaptive; any other top-level key (`service_tier`, `container`,
`mcp_servers`, `context_management`, `output_config`, ...).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..sse import SSEEvent
from . import anthropic_wire
from .base import Exchange, StreamTranslator, Translator, invalid, unsupported

_REFUSED_WHY = "is not supported when an Anthropic request is served by an OpenAI model"
# Top-level keys handled by request(); any other is refused.
_KNOWN_KEYS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "system",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "tools",
        "tool_choice",
        "metadata",
        "thinking",
    }
)
_MAX_STOP = 4
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


# -- request ------------------------------------------------------------------------------------


def _join_text(blocks: list[Any], where: str) -> str:
    """A system prompt or tool result given as a list of text blocks."""
    parts: list[str] = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise invalid(f"{where}[{j}]", "expected a content block object")
        kind = block.get("type")
        if kind == "image":
            raise unsupported(f"{where}[{j}].type", f"an image inside a tool result {_REFUSED_WHY}")
        if kind != "text":
            raise unsupported(f"{where}[{j}].type", f"{_quote(kind)} {_REFUSED_WHY}")
        text = block.get("text")
        if not isinstance(text, str):
            raise invalid(f"{where}[{j}].text", "expected a string")
        parts.append(text)
    return "\n\n".join(parts)


def _quote(value: Any) -> str:
    return repr(value[:64]) if isinstance(value, str) else "this block type"


def _system(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        for j, block in enumerate(system):
            if isinstance(block, dict) and block.get("type") != "text":
                raise invalid(f"system[{j}].type", "system blocks must be text")
        return _join_text(system, "system")
    raise invalid("system", "expected a string or a list of text blocks")


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise invalid(f"{where}.source", "expected an object")
    kind = source.get("type")
    url: Any
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise invalid(f"{where}.source", "base64 images need media_type and data strings")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        url = source.get("url")
        if not isinstance(url, str):
            raise invalid(f"{where}.source.url", "expected a string")
    else:
        raise unsupported(f"{where}.source.type", f"image source {_quote(kind)} {_REFUSED_WHY}")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_message(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise invalid(f"{where}.tool_use_id", "expected a string")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = _join_text(content, f"{where}.content")
    else:
        raise invalid(f"{where}.content", "expected a string or a list of content blocks")
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _user(content: Any, where: str, out: list[dict[str, Any]]) -> None:
    if isinstance(content, str):
        out.append({"role": "user", "content": content})
        return
    if not isinstance(content, list):
        raise invalid(f"{where}.content", "expected a string or a list of content blocks")
    parts: list[dict[str, Any]] = []
    tool_results = False
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(block, dict):
            raise invalid(at, "expected a content block object")
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise invalid(f"{at}.text", "expected a string")
            parts.append({"type": "text", "text": text})
        elif kind == "image":
            parts.append(_image(block, at))
        elif kind == "tool_result":
            out.append(_tool_message(block, at))
            tool_results = True
        else:
            raise unsupported(f"{at}.type", f"{_quote(kind)} {_REFUSED_WHY}")
    if parts or not tool_results:
        out.append({"role": "user", "content": parts})


def _assistant(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise invalid(f"{where}.content", "expected a string or a list of content blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(block, dict):
            raise invalid(at, "expected a content block object")
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise invalid(f"{at}.text", "expected a string")
            texts.append(text)
        elif kind == "tool_use":
            call_id, name, args = block.get("id"), block.get("name"), block.get("input")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise invalid(at, "tool_use needs id and name strings")
            if not isinstance(args, dict):
                raise invalid(f"{at}.input", "expected an object")
            fn = {"name": name, "arguments": orjson.dumps(args).decode()}
            calls.append({"id": call_id, "type": "function", "function": fn})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise unsupported(f"{at}.type", f"{_quote(kind)} {_REFUSED_WHY}")
    msg: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) if texts or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _messages(messages: Any, system: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise invalid("messages", "expected a list of messages")
    out: list[dict[str, Any]] = []
    if system is not None:
        out.append({"role": "system", "content": _system(system)})
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise invalid(where, "expected a message object")
        role = msg.get("role")
        if role == "user":
            _user(msg.get("content"), where, out)
        elif role == "assistant":
            out.append(_assistant(msg.get("content"), where))
        else:
            raise invalid(f"{where}.role", "expected 'user' or 'assistant'")
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid("tools", "expected a list of tools")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid(where, "expected a tool object")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise unsupported(f"{where}.type", f"server tool {_quote(kind)} {_REFUSED_WHY}")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str):
            raise invalid(f"{where}.name", "expected a string")
        if not isinstance(schema, dict):
            raise invalid(f"{where}.input_schema", "expected an object")
        fn: dict[str, Any] = {"name": name}
        description = tool.get("description")
        if description is not None:
            fn["description"] = description
        fn["parameters"] = schema
        if tool.get("strict") is not None:
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, out: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        raise invalid("tool_choice", "expected an object")
    kind = choice.get("type")
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise invalid("tool_choice.name", "expected a string")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif kind in _TOOL_CHOICES:
        out["tool_choice"] = _TOOL_CHOICES[kind]
    else:
        raise invalid("tool_choice.type", "expected 'auto', 'any', 'tool' or 'none'")
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False


def _reasoning_effort(thinking: Any) -> str | None:
    if not isinstance(thinking, dict):
        raise invalid("thinking", "expected an object")
    kind = thinking.get("type")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise invalid("thinking.budget_tokens", "expected an integer")
        return "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    if kind in ("disabled", "adaptive"):
        return None
    raise unsupported("thinking.type", f"{_quote(kind)} {_REFUSED_WHY}")


def _stop(stops: Any) -> list[str]:
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop_sequences", "expected a list of strings")
    if len(stops) > _MAX_STOP:
        raise unsupported("stop_sequences", f"more than {_MAX_STOP} stop sequences {_REFUSED_WHY}")
    return stops


# -- response -----------------------------------------------------------------------------------


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _usage(u: Any) -> dict[str, Any]:
    """OpenAI counts cached tokens inside prompt_tokens; Anthropic's input_tokens excludes them."""
    if not isinstance(u, dict):
        return anthropic_wire.usage(0, 0)
    details = u.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    prompt = _int(u.get("prompt_tokens"))
    return anthropic_wire.usage(max(prompt - cached, 0), _int(u.get("completion_tokens")), cache_read=cached)


def _stop_reason(finish: Any, tool_calls: bool) -> str:
    reason = _STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    return "tool_use" if tool_calls and reason == "end_turn" else reason


def _tool_input(arguments: Any) -> dict[str, Any]:
    if not isinstance(arguments, str) or not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"_raw_arguments": arguments}


def _content(msg: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    reasoning = msg.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    for name in ("content", "refusal"):
        text = msg.get(name)
        if isinstance(text, str) and text:
            blocks.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        fn_name = fn.get("name")
        blocks.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or ""),
                "name": fn_name if isinstance(fn_name, str) else "",
                "input": _tool_input(fn.get("arguments")),
            }
        )
    return blocks


# -- stream -------------------------------------------------------------------------------------

_TEXT, _THINKING, _TOOL = "text", "thinking", "tool_use"
_OPEN_TEXT = {"type": "text", "text": ""}
_OPEN_THINKING = {"type": "thinking", "thinking": "", "signature": ""}


class _Stream(StreamTranslator):
    """OpenAI chunks -> Anthropic events. One Anthropic block is open at a time; block indices
    count up in the order blocks are opened (the SDK appends blocks and addresses them by index)."""

    __slots__ = ("_done", "_finish", "_id", "_model", "_next", "_open", "_open_kind", "_started", "_tools", "_usage")

    def __init__(self, ex: Exchange) -> None:
        self._id = ""
        self._model = ex.client_model
        self._started = False
        self._done = False
        self._next = 0  # the next Anthropic block index
        self._open: int | None = None  # the open block's index
        self._open_kind = ""
        # OpenAI tool call index -> (Anthropic block index, tool call id).
        self._tools: dict[int, tuple[int, str]] = {}
        self._finish: Any = None
        self._usage: Any = None

    def on_event(self, event: SSEEvent) -> list[SSEEvent]:
        data = event.data
        if self._done or data is None:
            return []
        if data == "[DONE]":
            self._done = True
            return self._end()
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(obj, dict):
            return []
        error = obj.get("error")
        if error is not None:
            self._done = True
            message = error.get("message") if isinstance(error, dict) else error
            return [anthropic_wire.error_event(500, message if isinstance(message, str) else "upstream stream error")]
        if not self._id and isinstance(obj.get("id"), str):
            self._id = obj["id"]
            if isinstance(obj.get("model"), str):
                self._model = obj["model"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            return []
        out: list[SSEEvent] = []
        if not self._started:
            out.append(self._start())
        choice = choices[0]
        if not isinstance(choice, dict):
            return out
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._delta(delta, out)
        finish = choice.get("finish_reason")
        if finish is not None:
            self._finish = finish
        return out

    def _start(self) -> SSEEvent:
        self._started = True
        message = anthropic_wire.message(self._id, self._model, [], None, anthropic_wire.usage(0, 0))
        return anthropic_wire.event("message_start", message=message)

    def _delta(self, delta: dict[str, Any], out: list[SSEEvent]) -> None:
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            index = self._block(_THINKING, _OPEN_THINKING, out)
            piece = {"type": "thinking_delta", "thinking": reasoning}
            out.append(anthropic_wire.event("content_block_delta", index=index, delta=piece))
        for name in ("content", "refusal"):
            text = delta.get(name)
            if isinstance(text, str) and text:
                index = self._block(_TEXT, _OPEN_TEXT, out)
                piece = {"type": "text_delta", "text": text}
                out.append(anthropic_wire.event("content_block_delta", index=index, delta=piece))
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                if isinstance(call, dict):
                    self._tool_call(call, position, out)

    def _block(self, kind: str, opening: dict[str, Any], out: list[SSEEvent]) -> int:
        """The open block's index, first opening a `kind` block if another kind is open."""
        if self._open is not None and self._open_kind == kind:
            return self._open
        self._close(out)
        index = self._open = self._next
        self._next += 1
        self._open_kind = kind
        out.append(anthropic_wire.event("content_block_start", index=index, content_block=opening))
        return index

    def _close(self, out: list[SSEEvent]) -> None:
        if self._open is not None:
            out.append(anthropic_wire.event("content_block_stop", index=self._open))
            self._open = None

    def _tool_call(self, call: dict[str, Any], position: int, out: list[SSEEvent]) -> None:
        tool_index = call.get("index")
        if not isinstance(tool_index, int):
            tool_index = position
        call_id = call.get("id")
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        known = self._tools.get(tool_index)
        # A new call: an index not seen yet, or a new id on it (some servers repeat the id on
        # every chunk of one call, so the same id continues the call).
        if known is None or (isinstance(call_id, str) and call_id and call_id != known[1]):
            self._close(out)
            cid = call_id if isinstance(call_id, str) and call_id else f"call_{tool_index}"
            name = fn.get("name")
            block = {"type": "tool_use", "id": cid, "name": name if isinstance(name, str) else "", "input": {}}
            index = self._open = self._next
            self._next += 1
            self._open_kind = _TOOL
            self._tools[tool_index] = (index, cid)
            out.append(anthropic_wire.event("content_block_start", index=index, content_block=block))
        else:
            index = known[0]
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            piece = {"type": "input_json_delta", "partial_json": arguments}
            out.append(anthropic_wire.event("content_block_delta", index=index, delta=piece))

    def _end(self) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        if not self._started:
            out.append(self._start())
        self._close(out)
        stop = {"stop_reason": _stop_reason(self._finish, bool(self._tools)), "stop_sequence": None}
        out.append(anthropic_wire.event("message_delta", delta=stop, usage=_usage(self._usage)))
        out.append(anthropic_wire.event("message_stop"))
        return out


# -- the translator -----------------------------------------------------------------------------


class AnthropicToOpenAI(Translator):
    client = "anthropic"
    provider = "openai"
    paths = {"/v1/messages": "/v1/chat/completions"}

    def __init__(self) -> None:
        pass

    def request(self, body: dict[str, Any]) -> tuple[dict[str, Any], Exchange]:
        for key, value in body.items():
            if key not in _KNOWN_KEYS and value is not None:
                raise unsupported(key, _REFUSED_WHY)
        model = body.get("model")
        if not isinstance(model, str):
            raise invalid("model", "expected a string")
        if body.get("top_k") is not None:
            raise unsupported("top_k", _REFUSED_WHY)
        out: dict[str, Any] = {"model": model, "messages": _messages(body.get("messages"), body.get("system"))}
        if body.get("max_tokens") is not None:
            out["max_completion_tokens"] = body["max_tokens"]
        for key in ("temperature", "top_p"):
            if body.get(key) is not None:
                out[key] = body[key]
        if body.get("stop_sequences") is not None:
            stops = _stop(body["stop_sequences"])
            if stops:
                out["stop"] = stops
        stream = body.get("stream") is True
        if stream:
            out["stream"] = True
            out["stream_options"] = {"include_usage": True}
        tools = _tools(body["tools"]) if body.get("tools") is not None else []
        if tools:
            out["tools"] = tools
        choice = body.get("tool_choice")
        if choice is not None and tools:
            _tool_choice(choice, out)
        elif isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
            raise invalid("tool_choice", "requires tools")
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
            out["user"] = metadata["user_id"]
        if body.get("thinking") is not None:
            effort = _reasoning_effort(body["thinking"])
            if effort is not None:
                out["reasoning_effort"] = effort
        return out, Exchange(client_model=model, stream=stream)

    def response(self, body: dict[str, Any], ex: Exchange) -> dict[str, Any]:
        choices = body.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        msg = choice.get("message")
        content = _content(msg) if isinstance(msg, dict) else []
        stop = _stop_reason(choice.get("finish_reason"), any(b["type"] == "tool_use" for b in content))
        model = body.get("model")
        return anthropic_wire.message(
            str(body.get("id") or ""),
            model if isinstance(model, str) else ex.client_model,
            content,
            stop,
            _usage(body.get("usage")),
        )

    def error(self, status: int, body: Any) -> dict[str, Any]:
        message: Any = None
        code: Any = None
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict):
                message, code = err.get("message"), err.get("code")
            elif isinstance(err, str):
                message = err
            else:
                message = body.get("message")
        if not isinstance(message, str) or not message:
            message = f"upstream error (HTTP {status})"
        return anthropic_wire.error_body(status, message, code if isinstance(code, str) else None)

    def stream(self, ex: Exchange) -> StreamTranslator:
        return _Stream(ex)
