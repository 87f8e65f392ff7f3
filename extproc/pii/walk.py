"""Where the text a model reads sits in each schema's bodies.

Only that text is scanned, never the raw JSON, so the body stays valid JSON and nothing else changes:
message content (strings and the text parts of content arrays), Anthropic's top-level `system`,
tool and function call arguments, tool results. Not model names, ids, roles, base64 images, or
Anthropic thinking blocks (signed by the provider: changing them would invalidate the signature).

A slot is (container, key, json_text): `container[key]` is a string; `json_text` when that string is
itself JSON source (OpenAI tool-call arguments), which matters when a value is put back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Slot = tuple[Any, Any, bool]


def _text_parts(content: Any, owner: Any, key: Any) -> Iterator[Slot]:
    """A content field: a string, or a list of parts of which the text ones are scanned."""
    if isinstance(content, str):
        yield owner, key, False
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                yield part, "text", False


def _strings(value: Any) -> Iterator[Slot]:
    """Every string inside a JSON value (an Anthropic tool_use `input` object)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, str):
                yield value, k, False
            else:
                yield from _strings(v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, str):
                yield value, i, False
            else:
                yield from _strings(v)


def _openai_message(msg: dict[str, Any], content_key: str = "content") -> Iterator[Slot]:
    yield from _text_parts(msg.get(content_key), msg, content_key)
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            yield fn, "arguments", True
    fn = msg.get("function_call")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        yield fn, "arguments", True


def _anthropic_blocks(content: Any, owner: Any, key: Any) -> Iterator[Slot]:
    if isinstance(content, str):
        yield owner, key, False
        return
    if not isinstance(content, list):
        return
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            yield block, "text", False
        elif kind == "tool_use":
            yield from _strings(block.get("input"))
        elif kind == "tool_result":
            yield from _anthropic_blocks(block.get("content"), block, "content")


def request_slots(schema: str, body: dict[str, Any]) -> list[Slot]:
    out: list[Slot] = []
    if schema == "openai":
        for msg in body.get("messages") or ():
            if isinstance(msg, dict):
                out.extend(_openai_message(msg))
        # Embeddings: `input` is a string or a list of strings (token arrays: see embedding_tokens).
        inp = body.get("input")
        if isinstance(inp, str):
            out.append((body, "input", False))
        elif isinstance(inp, list):
            out.extend((inp, i, False) for i, v in enumerate(inp) if isinstance(v, str))
    elif schema == "anthropic":
        out.extend(_anthropic_blocks(body.get("system"), body, "system"))
        for msg in body.get("messages") or ():
            if isinstance(msg, dict):
                out.extend(_anthropic_blocks(msg.get("content"), msg, "content"))
    return out


def embedding_tokens(body: dict[str, Any]) -> bool:
    """An embeddings request whose input is token ids: no text the scanner could read."""
    inp = body.get("input")
    return isinstance(inp, list) and any(not isinstance(v, str) for v in inp)


def response_slots(schema: str, body: Any) -> list[Slot]:
    """The model's text in a complete (non-streamed) response."""
    out: list[Slot] = []
    if not isinstance(body, dict):
        return out
    if schema == "openai":
        for choice in body.get("choices") or ():
            msg = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(msg, dict):
                out.extend(_openai_message(msg))
    elif schema == "anthropic":
        out.extend(_anthropic_blocks(body.get("content"), body, "content"))
    return out
