"""Restoring placeholders and masking entities in a response, JSON or SSE, without breaking it.

Text is handled per channel: one choice's content, one tool call's arguments, one content block. A
channel releases text as soon as no placeholder or entity can straddle the release point and holds
back only the tail that still could: the start of a placeholder (`[EMAIL_` without its `]`), or,
when masking, the last word and the short digit groups before it (a phone or card number written
with spaces), or an unterminated PEM block. Held text goes out with the channel's next delta, and
when the channel ends (OpenAI: its finish_reason; Anthropic: content_block_stop; any stream: its
end) in an event of its own, so every event stays valid SSE with valid JSON, and nothing is lost.

Tool-call arguments (OpenAI `function.arguments`, Anthropic `input_json_delta.partial_json`) are JSON
source: a restored value is JSON-escaped there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from ..sse import SSEEvent
from .detect import PEM_BLOCK
from .redact import PLACEHOLDER, restore_text
from .walk import response_slots

# A placeholder still being written: "[", "[EMA", "[EMAIL_1".
_PARTIAL = re.compile(r"\[[A-Z][A-Z0-9_]*\d*$|\[$")
_MAX_PLACEHOLDER = 40
# Words before the last one that may belong to the same entity (digit groups of a phone or card).
_NUMERIC_WORD = re.compile(r"[+(]?[\d().\-]{1,8}")
# Text kept from what was released, so context words ("call", "SSN") still count at the start.
_CONTEXT = 64
# At most this much is held while masking (an unterminated key block is masked as a whole beyond).
_MAX_HELD = 16 * 1024


class Rewriter:
    """What happens to the model's text: placeholders put back, entities masked, or both."""

    def __init__(self, originals: dict[str, str], mask: Any | None = None) -> None:
        self.originals = originals
        # A Redaction-like object: `.mask_text(text, start_at) -> str` (see PiiStage), or None.
        self.mask = mask

    def whole(self, text: str, json_text: bool) -> str:
        if self.mask is not None:
            text = self.mask(text, 0)
        return restore_text(text, self.originals, json_text)


class Channel:
    __slots__ = ("context", "held", "json_text")

    def __init__(self, json_text: bool) -> None:
        self.held = ""
        self.json_text = json_text
        self.context = ""

    def feed(self, text: str, rw: Rewriter) -> str:
        s = self.held + text
        cut = self._cut(s, rw)
        self.held = s[cut:]
        return self._release(s[:cut], rw)

    def flush(self, rw: Rewriter) -> str:
        s, self.held = self.held, ""
        return self._release(s, rw)

    def _release(self, s: str, rw: Rewriter) -> str:
        if not s:
            return s
        if rw.mask is not None:
            masked = rw.mask(self.context + s, len(self.context))
            self.context = (self.context + s)[-_CONTEXT:]
            s = masked
        return restore_text(s, rw.originals, self.json_text)

    def _cut(self, s: str, rw: Rewriter) -> int:
        cut = len(s)
        if rw.originals:
            i = s.rfind("[", max(0, len(s) - _MAX_PLACEHOLDER))
            if i != -1 and _PARTIAL.match(s, i):
                cut = i
        if rw.mask is not None:
            cut = min(cut, _entity_tail(s))
        return cut


def _entity_tail(s: str) -> int:
    """Where the text that could still become (part of) an entity starts: the last word (empty when
    the text ends in a space), and before it any digit groups separated by single spaces (a phone
    or card number being written: "+1 415 " may go on with "555 0132")."""
    j = len(s)
    while j > 0 and not s[j - 1].isspace():
        j -= 1
    while j > 1 and s[j - 1] == " " and not s[j - 2].isspace():
        k = j - 1
        while k > 0 and not s[k - 1].isspace():
            k -= 1
        if not _NUMERIC_WORD.fullmatch(s, k, j - 1):
            break
        j = k
    begin = s.rfind("-----BEGIN")
    if begin != -1 and PEM_BLOCK.match(s, begin) is None:
        j = min(j, begin)  # a key block still being written: held until its END line is complete
    return max(j, len(s) - _MAX_HELD)


class StreamRewriter:
    """Rewrites one streamed response, event by event (SSE events of either schema)."""

    def __init__(self, schema: str, rw: Rewriter) -> None:
        self.schema = schema
        self.rw = rw
        self.channels: dict[Any, Channel] = {}
        # OpenAI: the last chunk's JSON, a template for inserted chunks.
        self._template: dict[str, Any] | None = None

    def _channel(self, key: Any, json_text: bool) -> Channel:
        ch = self.channels.get(key)
        if ch is None:
            ch = self.channels[key] = Channel(json_text)
        return ch

    @property
    def holding(self) -> bool:
        return any(ch.held for ch in self.channels.values())

    def events(self, events: list[SSEEvent], end_of_stream: bool) -> tuple[list[SSEEvent], bool]:
        """The events the client gets instead, and whether anything changed."""
        out: list[SSEEvent] = []
        changed = False
        for ev in events:
            if ev.data is None or (self.rw.mask is None and not self.holding and "[" not in ev.data):
                out.append(ev)  # nothing to restore in it: passes as it came (the fast path)
                continue
            new = self._openai(ev) if self.schema == "openai" else self._anthropic(ev)
            if new is None:
                out.append(ev)
            else:
                out.extend(new)
                changed = True
        if end_of_stream and self.holding:
            out.extend(self._flush_all(before=None))
            changed = True
        return out, changed

    # -- OpenAI ---------------------------------------------------------------------------------

    def _openai(self, ev: SSEEvent) -> list[SSEEvent] | None:
        if ev.data == "[DONE]":
            return [*self._flush_all(before=ev), ev] if self.holding else None
        try:
            chunk = orjson.loads(ev.data or "")
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return None
        self._template = chunk
        inserted: list[SSEEvent] = []
        changed = False
        for choice in chunk["choices"]:
            if not isinstance(choice, dict):
                continue
            idx = choice.get("index", 0)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str):
                    delta["content"] = self._channel((idx, "content"), False).feed(delta["content"], self.rw)
                    changed = True
                for call in delta.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        key = (idx, "tool", call.get("index", 0))
                        fn["arguments"] = self._channel(key, True).feed(fn["arguments"], self.rw)
                        changed = True
            if choice.get("finish_reason") is not None:
                # The choice ends here: what its channels hold goes out just before.
                held = self._openai_flush(idx, chunk)
                if held is not None:
                    inserted.append(held)
        if not changed and not inserted:
            return None
        return [*inserted, SSEEvent.make(orjson.dumps(chunk).decode(), ev.event)]

    def _openai_flush(self, idx: Any, template: dict[str, Any]) -> SSEEvent | None:
        delta: dict[str, Any] = {}
        for key, ch in self.channels.items():
            if key[0] != idx or not ch.held:
                continue
            text = ch.flush(self.rw)
            if key[1] == "content":
                delta["content"] = text
            else:
                delta.setdefault("tool_calls", []).append({"index": key[2], "function": {"arguments": text}})
        if not delta:
            return None
        chunk = {k: v for k, v in template.items() if k not in ("choices", "usage")}
        chunk["choices"] = [{"index": idx, "delta": delta, "finish_reason": None}]
        return SSEEvent.make(orjson.dumps(chunk).decode())

    # -- Anthropic ------------------------------------------------------------------------------

    def _anthropic(self, ev: SSEEvent) -> list[SSEEvent] | None:
        try:
            msg = orjson.loads(ev.data or "")
        except orjson.JSONDecodeError:
            return None
        if not isinstance(msg, dict):
            return None
        kind = msg.get("type")
        if kind == "content_block_delta":
            delta = msg.get("delta")
            idx = msg.get("index", 0)
            if isinstance(delta, dict):
                if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                    delta["text"] = self._channel(idx, False).feed(delta["text"], self.rw)
                    return [SSEEvent.make(orjson.dumps(msg).decode(), ev.event)]
                if delta.get("type") == "input_json_delta" and isinstance(delta.get("partial_json"), str):
                    delta["partial_json"] = self._channel(idx, True).feed(delta["partial_json"], self.rw)
                    return [SSEEvent.make(orjson.dumps(msg).decode(), ev.event)]
            return None
        if kind == "content_block_start":
            block = msg.get("content_block")
            if isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
                block["text"] = self._channel(msg.get("index", 0), False).feed(block["text"], self.rw)
                return [SSEEvent.make(orjson.dumps(msg).decode(), ev.event)]
            return None
        if kind == "content_block_stop":
            idx = msg.get("index", 0)
            ch = self.channels.get(idx)
            if ch is None or not ch.held:
                return None
            return [self._anthropic_delta(idx, ch), ev]
        if kind == "message_stop" and self.holding:
            return [*self._flush_all(before=ev), ev]
        return None

    def _anthropic_delta(self, idx: Any, ch: Channel) -> SSEEvent:
        text = ch.flush(self.rw)
        delta = (
            {"type": "input_json_delta", "partial_json": text} if ch.json_text else {"type": "text_delta", "text": text}
        )
        body = {"type": "content_block_delta", "index": idx, "delta": delta}
        return SSEEvent.make(orjson.dumps(body).decode(), "content_block_delta")

    # -- the end ----------------------------------------------------------------------------------

    def _flush_all(self, before: SSEEvent | None) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        if self.schema == "openai":
            template = self._template or {"object": "chat.completion.chunk"}
            for idx in sorted({k[0] for k, ch in self.channels.items() if ch.held}, key=str):
                ev = self._openai_flush(idx, template)
                if ev is not None:
                    out.append(ev)
        else:
            for idx, ch in list(self.channels.items()):
                if ch.held:
                    out.append(self._anthropic_delta(idx, ch))
        return out


def rewrite_json(schema: str, body: Any, rw: Rewriter) -> bool:
    """A complete response body rewritten in place; True when anything changed."""
    changed = False
    for owner, key, json_text in response_slots(schema, body):
        old = owner[key]
        new = rw.whole(old, json_text)
        if new != old:
            owner[key] = new
            changed = True
    return changed


def has_placeholder(texts: Iterable[str]) -> bool:
    return any(PLACEHOLDER.search(t) for t in texts)
