"""An app on the OpenAI Chat Completions API calling a model served through Anthropic Messages.

Request: system and developer messages become `system` (only at the start of the conversation:
one in the middle would change meaning if moved); tool results become `tool_result` blocks of a
user turn (consecutive ones in one turn, the way Anthropic expects parallel results); images
become image blocks (data URLs as base64, others as URLs); `max_completion_tokens` / `max_tokens`
becomes `max_tokens`, with the configured default when the client gives none (Anthropic requires
it). `reasoning_effort` becomes extended thinking with a budget below max_tokens.

Dropped as safe (README, "Schema translation"): `store`, `metadata`, `service_tier`, `seed`
(best-effort determinism only), `stream_options` other than include_usage, image `detail`,
message `name`, tool `strict`, `n: 1`, `logprobs: false`, zero penalties, `response_format: text`.
Refused with 400 naming the field: `n` > 1, logprobs, logit_bias, non-zero penalties, audio,
modalities other than text, prediction, web search, JSON mode / JSON schema response formats,
temperature above 1 (Anthropic's range is 0-1), the deprecated functions API, and unknown fields.

Response: text blocks join into `content`, thinking into `reasoning_content` (the field
OpenAI-compatible servers use), tool_use blocks into `tool_calls`; usage counts every input token
in `prompt_tokens` with cache reads as `cached_tokens` (OpenAI's meaning).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ..sse import SSEEvent
from . import openai_wire as ow
from .base import Exchange, StreamTranslator, Translator, exchange_of, invalid, unsupported

# Anthropic stop_reason -> OpenAI finish_reason.
FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}

# reasoning_effort -> thinking budget (tokens); Anthropic's minimum budget is 1024.
THINKING_BUDGET = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}
MIN_THINKING_BUDGET = 1024

# Fields that carry nothing when they hold their default: dropped then, refused otherwise.
_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "functions": (None, []),
    "function_call": (None,),
}
_DROPPED = frozenset({"store", "metadata", "service_tier", "seed", "stream_options", "prompt_cache_key"})
_HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "safety_identifier",
        "reasoning_effort",
        "response_format",
        "modalities",
    }
)
_WHY = "is not supported when an OpenAI request is served by an Anthropic model"


def _text_of(content: Any, where: str) -> str:
    """A system/developer/tool message's content as one string (string or text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(f"{where}[{i}]", "only text parts are supported here")
            out.append(part["text"])
        return "\n\n".join(out)
    raise invalid(where, "expected a string or an array of content parts")


def _image(part: dict[str, Any], where: str) -> dict[str, Any]:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.image_url.url", "expected a URL")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        media_type = head[5:].removesuffix(";base64")
        if not sep or not head.endswith(";base64") or not media_type:
            raise unsupported(f"{where}.image_url.url", "data URLs must be base64 (data:<type>;base64,...)")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _user_blocks(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(where, "expected a string or an array of content parts")
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part, at))
        elif kind is None:
            raise invalid(at, "expected a content part object with a type")
        else:
            raise unsupported(f"{at}.type", f"content parts of type {kind!r} {_WHY}")
    return blocks


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
        raise invalid(where, "expected {id, type: function, function: {name, arguments}}")
    args = fn.get("arguments") or "{}"
    try:
        parsed = orjson.loads(args) if isinstance(args, str) else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise invalid(f"{where}.function.arguments", "expected a JSON object in a string")
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": parsed}


def _assistant_blocks(msg: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            text = part.get("text") if kind == "text" else part.get("refusal") if kind == "refusal" else None
            if not isinstance(text, str):
                raise unsupported(f"{where}.content[{i}]", "assistant content parts must be text or refusal")
            if text:
                blocks.append({"type": "text", "text": text})
    elif content is not None:
        raise invalid(f"{where}.content", "expected a string, an array of content parts or null")
    calls = msg.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise invalid(f"{where}.tool_calls", "expected an array")
        blocks += [_tool_use(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
    return blocks


def _messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, Anthropic messages). Consecutive turns of one role merge into one turn."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "expected a non-empty array")
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    started = False

    def add(role: str, blocks: str | list[dict[str, Any]]) -> None:
        if isinstance(blocks, str):
            blocks = [{"type": "text", "text": blocks}]
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": list(blocks)})

    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise invalid(where, "expected a message object")
        role = msg.get("role")
        if role in ("system", "developer"):
            if started:
                raise unsupported(
                    f"{where}.role", f"{role} messages after the conversation started cannot be sent to Anthropic"
                )
            system.append({"type": "text", "text": _text_of(msg.get("content"), f"{where}.content")})
            continue
        started = True
        if role == "user":
            content = _user_blocks(msg.get("content"), f"{where}.content")
            # A plain string turn stays a string when it is alone (what the API would be sent natively).
            if isinstance(content, str) and not (out and out[-1]["role"] == "user"):
                out.append({"role": "user", "content": content})
            else:
                if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], str):
                    out[-1]["content"] = [{"type": "text", "text": out[-1]["content"]}]
                add("user", content)
        elif role == "assistant":
            blocks = _assistant_blocks(msg, where)
            if not blocks:
                raise invalid(f"{where}.content", "an assistant message needs content or tool_calls")
            add("assistant", blocks)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str):
                raise invalid(f"{where}.tool_call_id", "expected a string")
            result = {
                "type": "tool_result",
                "tool_use_id": call_id,
                "content": _text_of(msg.get("content"), f"{where}.content"),
            }
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], str):
                out[-1]["content"] = [{"type": "text", "text": out[-1]["content"]}]
            add("user", [result])
        elif role == "function":
            raise unsupported(f"{where}.role", f"the deprecated function role {_WHY}; use tools")
        else:
            raise invalid(f"{where}.role", "expected system, developer, user, assistant or tool")
    if not out:
        raise invalid("messages", "needs at least one user or assistant message")
    return system, out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid("tools", "expected an array")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise unsupported(f"tools[{i}].type", "only function tools can be sent to Anthropic")
        if not isinstance(fn.get("name"), str):
            raise invalid(f"tools[{i}].function.name", "expected a string")
        params = fn.get("parameters")
        entry: dict[str, Any] = {
            "name": fn["name"],
            "input_schema": params if isinstance(params, dict) else {"type": "object", "properties": {}},
        }
        if isinstance(fn.get("description"), str):
            entry["description"] = fn["description"]
        out.append(entry)
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return {"type": "tool", "name": fn["name"]}
    raise invalid("tool_choice", "expected auto, none, required or {type: function, function: {name}}")


def _stop(stop: Any) -> list[str]:
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise invalid("stop", "expected a string or an array of strings")


def _count(v: Any) -> int:
    return v if type(v) is int and v >= 0 else 0


def _usage(u: Any) -> dict[str, Any] | None:
    """Anthropic counts (input excludes cache reads and writes) -> OpenAI's (prompt_tokens is all
    input, cached_tokens the reads). Cache writes have no OpenAI field; kept as an extra."""
    if not isinstance(u, dict):
        return None
    read = _count(u.get("cache_read_input_tokens"))
    created = _count(u.get("cache_creation_input_tokens"))
    prompt = _count(u.get("input_tokens")) + read + created
    return ow.usage(prompt, _count(u.get("output_tokens")), cached=read, cache_creation=created)


class OpenAIToAnthropic(Translator):
    client = "openai"
    provider = "anthropic"
    paths = {"/v1/chat/completions": "/v1/messages"}

    def __init__(self, default_max_tokens: int = 4096) -> None:
        self.default_max_tokens = default_max_tokens

    # -- request ----------------------------------------------------------------------------------

    def request(self, body: dict[str, Any]) -> tuple[dict[str, Any], Exchange]:
        for key, value in body.items():
            if key in _HANDLED or key in _DROPPED:
                continue
            allowed = _DEFAULTS.get(key)
            if allowed is None:
                raise unsupported(key, _WHY)
            if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
                raise unsupported(key, f"{_WHY} (only its default value can be)")
        stream = body.get("stream") is True
        ex = exchange_of(body)
        system, messages = _messages(body.get("messages"))
        out: dict[str, Any] = {"model": body["model"]}
        if system:
            out["system"] = system
        out["messages"] = messages
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        elif type(max_tokens) is not int or max_tokens < 1:
            raise invalid("max_completion_tokens", "expected a positive integer")
        out["max_tokens"] = max_tokens
        temperature = body.get("temperature")
        if temperature is not None:
            if not isinstance(temperature, int | float) or isinstance(temperature, bool) or temperature < 0:
                raise invalid("temperature", "expected a number")
            if temperature > 1:
                raise unsupported("temperature", "Anthropic models take a temperature between 0 and 1")
            out["temperature"] = temperature
        if body.get("top_p") is not None:
            out["top_p"] = body["top_p"]
        if body.get("stop") is not None:
            out["stop_sequences"] = _stop(body["stop"])
        if stream:
            out["stream"] = True
        tools = body.get("tools")
        if tools:
            out["tools"] = _tools(tools)
        choice = body.get("tool_choice")
        if choice is not None:
            out["tool_choice"] = _tool_choice(choice)
        if body.get("parallel_tool_calls") is False and tools:
            out["tool_choice"] = {**out.get("tool_choice", {"type": "auto"}), "disable_parallel_tool_use": True}
        user = body.get("safety_identifier") or body.get("user")
        if isinstance(user, str) and user:
            out["metadata"] = {"user_id": user}
        effort = body.get("reasoning_effort")
        if effort is not None:
            budget = THINKING_BUDGET.get(effort) if isinstance(effort, str) else None
            if budget is None:
                raise invalid("reasoning_effort", "expected minimal, low, medium or high")
            budget = min(budget, max_tokens - 1)
            if budget < MIN_THINKING_BUDGET:
                raise unsupported(
                    "reasoning_effort", f"Anthropic thinking needs max_completion_tokens above {MIN_THINKING_BUDGET}"
                )
            out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise unsupported("response_format", f"JSON mode and JSON schema output {_WHY}")
        modalities = body.get("modalities")
        if modalities is not None and modalities != ["text"]:
            raise unsupported("modalities", f"output other than text {_WHY}")
        return out, ex

    # -- response ---------------------------------------------------------------------------------

    def response(self, body: dict[str, Any], ex: Exchange) -> dict[str, Any]:
        text: list[str] = []
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in body.get("content") or ():
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                thinking.append(block["thinking"])
            elif kind == "tool_use":
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {"name": block.get("name"), "arguments": orjson.dumps(block.get("input")).decode()},
                    }
                )
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(text) if text or not calls else None,
            "refusal": None,
            "annotations": [],
        }
        if calls:
            message["tool_calls"] = calls
        if thinking:
            message["reasoning_content"] = "".join(thinking)
        reason = body.get("stop_reason")
        return ow.completion(
            str(body.get("id") or ""),
            int(time.time()),
            str(body.get("model") or ex.client_model),
            message,
            FINISH.get(reason, "stop") if isinstance(reason, str) else None,
            _usage(body.get("usage")),
        )

    def error(self, status: int, body: Any) -> dict[str, Any]:
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        etype = err.get("type") if isinstance(err, dict) else None
        return ow.error_body(
            status,
            message if isinstance(message, str) else f"upstream error (HTTP {status})",
            etype if isinstance(etype, str) else None,
        )

    def stream(self, ex: Exchange) -> StreamTranslator:
        return _Stream(ex)


class _Stream(StreamTranslator):
    """Anthropic's message_start … message_stop as OpenAI chunks. Usage is known at message_delta
    (Anthropic reports the final output count there) and goes out as the usage-only chunk before
    [DONE] when the client asked for it."""

    __slots__ = ("created", "ex", "failed", "id", "input", "model", "tools", "usage")

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.id = ""
        self.model = ex.client_model
        self.created = int(time.time())
        # Anthropic block index -> OpenAI tool call index, for tool_use blocks.
        self.tools: dict[int, int] = {}
        # Anthropic's raw counters so far (message_start, then message_delta's).
        self.usage: dict[str, Any] = {}
        self.failed = False

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None) -> SSEEvent:
        usage = _usage(self.usage) if delta is None else None
        return ow.chunk_event(
            self.id, self.created, self.model, delta, finish, with_usage=self.ex.include_usage, usage_obj=usage
        )

    def on_event(self, event: SSEEvent) -> list[SSEEvent]:
        if self.failed or event.data is None:
            return []
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(obj, dict):
            return []
        kind = obj.get("type") or event.event
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if not isinstance(delta, dict):
                return []
            dtype = delta.get("type")
            if dtype == "text_delta" and isinstance(delta.get("text"), str):
                return [self._chunk({"content": delta["text"]})]
            if dtype == "input_json_delta" and isinstance(delta.get("partial_json"), str):
                call = self.tools.get(obj.get("index"))  # type: ignore[arg-type]
                if call is None or not delta["partial_json"]:
                    return []
                return [
                    self._chunk({"tool_calls": [{"index": call, "function": {"arguments": delta["partial_json"]}}]})
                ]
            if dtype == "thinking_delta" and isinstance(delta.get("thinking"), str):
                return [self._chunk({"reasoning_content": delta["thinking"]})]
            return []
        if kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, dict) and block.get("type") == "tool_use":
                call = self.tools[obj.get("index")] = len(self.tools)  # type: ignore[index]
                head = {
                    "index": call,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return [self._chunk({"tool_calls": [head]})]
            if isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                self.id = str(msg.get("id") or "")
                if isinstance(msg.get("model"), str):
                    self.model = msg["model"]
                if isinstance(msg.get("usage"), dict):
                    self.usage.update(msg["usage"])
            return [self._chunk({"role": "assistant", "content": "", "refusal": None})]
        if kind == "message_delta":
            if isinstance(obj.get("usage"), dict):
                self.usage.update({k: v for k, v in obj["usage"].items() if v is not None})
            delta = obj.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            if isinstance(reason, str):
                return [self._chunk({}, FINISH.get(reason, "stop"))]
            return []
        if kind == "message_stop":
            out = [self._chunk(None)] if self.ex.include_usage else []
            out.append(ow.done())
            return out
        if kind == "error":
            self.failed = True
            err = obj.get("error")
            message = err.get("message") if isinstance(err, dict) else None
            etype = err.get("type") if isinstance(err, dict) else None
            return [
                ow.error_event(
                    message if isinstance(message, str) else "upstream stream error",
                    "server_error",
                    etype if isinstance(etype, str) else None,
                )
            ]
        return []  # ping, content_block_stop, signature deltas: nothing for an OpenAI client
