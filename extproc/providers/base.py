"""The interface every provider schema implements.

One adapter per wire schema (not per vendor): an OpenAI-compatible self-hosted server uses the
`openai` adapter. The processor and stages talk only to this interface, so a new schema is one new
module, and translation between schemas (a later issue) becomes one translator per pair.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..errors import ErrorKind, GatewayError, quote
from ..routing import Route
from ..sse import SSEEvent

MAX_MODEL_CHARS = 256
_MODEL_CHARS = re.compile(r"^[\x21-\x7e]+$")


@dataclass(slots=True)
class Usage:
    """Token counts normalized across schemas (the usage record's meaning, see accounting)."""

    # ALL prompt tokens, cache reads and writes included.
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    # All completion tokens, reasoning included.
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def count(v: Any) -> int:
    """A token count as the provider wrote it; anything else (null, negative, bool) is 0."""
    return v if type(v) is int and v >= 0 else 0


def requested_count(v: Any) -> int | None:
    """A count a client asked for (max_tokens, n): a positive int; bools and the rest are None."""
    return v if type(v) is int and v > 0 else None


# Output text kept per stream for an estimate if the stream breaks (characters; beyond this only
# the length is kept).
MAX_KEPT_TEXT = 1_000_000
# Pieces of output text kept one by one before they are joined into one string (StreamReader).
_JOIN_EVERY = 64


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    method: str
    # Whether the JSON body names a model the gateway must route on.
    routed: bool = True
    # Query parameters the provider reads on this endpoint; every other one is dropped before the
    # request leaves (and never logged).
    query: frozenset[str] = frozenset()


class StreamReader(ABC):
    """Consumes one response's SSE events in order; knows where this schema puts usage, content,
    errors and the end of the stream."""

    def __init__(self) -> None:
        # Set when the provider reported an error inside the stream (e.g. Anthropic `event: error`).
        self.error: dict[str, Any] | None = None
        # The provider's own end-of-stream marker was seen ([DONE], message_stop).
        self.done = False
        # Output text seen so far (content, tool arguments, thinking), for an estimate if no usage
        # comes: the pieces of the last events, and the earlier ones joined _JOIN_EVERY at a time.
        # One string per event cost ~50 bytes of object header beside a few characters of text: 2,000
        # open streams of 250 events held ~500,000 of them, ~30 MB, scattered through the
        # allocator's arenas, which outlived the streams (soak.py, streams phase).
        self._pieces: list[str] = []
        self._joined: list[str] = []
        self.text_chars = 0
        self.dropped_chars = 0
        self.response_model: str | None = None
        # Why the output ended, per choice (OpenAI finish_reason, Anthropic stop_reason).
        self.finish_reasons: list[str] = []

    @property
    @abstractmethod
    def usage(self) -> Usage | None:
        """What the provider reported so far; None until it reports any usage."""

    @property
    def usage_final(self) -> bool:
        """Whether `usage` holds the provider's final figures (not only the opening counts)."""
        return self.usage is not None

    @abstractmethod
    def on_event(self, event: SSEEvent) -> bool:
        """Read one event; True when it carried output (for time to first token)."""

    def keep_text(self, piece: str) -> None:
        if self.text_chars + len(piece) <= MAX_KEPT_TEXT:
            pieces = self._pieces
            pieces.append(piece)
            self.text_chars += len(piece)
            if len(pieces) >= _JOIN_EVERY:
                self._joined.append("".join(pieces))
                pieces.clear()
        else:
            self.dropped_chars += len(piece)

    @property
    def text(self) -> str:
        """The output text kept so far (at most MAX_KEPT_TEXT characters)."""
        return "".join(self._joined) + "".join(self._pieces)

    def without_gateway_usage(self, event: SSEEvent) -> SSEEvent | None:
        """The event as the client would see it had the gateway not asked for usage (None: drop
        it), called after on_event for the same event. Schemas that always report usage return the
        event itself."""
        return event


# Client headers every provider may see by default (each schema adds its own). Everything else the
# client sent is removed before the request leaves; gateway.yaml `providers.<name>.forward_headers`
# replaces the list.
COMMON_FORWARD_HEADERS = ("accept", "content-type", "user-agent", "x-stainless-*")


class ProviderAdapter(ABC):
    schema: str
    endpoints: dict[str, Endpoint]
    forward_headers: tuple[str, ...] = COMMON_FORWARD_HEADERS

    def finish_reasons_from_json(self, body: dict[str, Any]) -> list[str]:
        """Why the output ended, per choice, in a non-streamed response."""
        return []

    def model_of(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None:
            raise GatewayError(
                ErrorKind.INVALID_REQUEST, "Missing required parameter: 'model'.", "missing_model", "model"
            )
        if not isinstance(model, str) or not model:
            raise GatewayError(
                ErrorKind.INVALID_REQUEST, "Invalid 'model': expected a non-empty string.", "invalid_model", "model"
            )
        if len(model) > MAX_MODEL_CHARS or not _MODEL_CHARS.match(model):
            # The name becomes a routing header and an upstream body field: a bounded, printable
            # name is a client error here rather than a header-mutation failure (503) in Envoy.
            raise GatewayError(
                ErrorKind.INVALID_REQUEST,
                f"Invalid 'model' {quote(model)}: use at most {MAX_MODEL_CHARS} printable ASCII characters "
                "without spaces.",
                "invalid_model",
                "model",
            )
        return model

    def is_streaming(self, body: dict[str, Any]) -> bool:
        return body.get("stream") is True

    @abstractmethod
    def error_body(self, err: GatewayError) -> bytes: ...

    @abstractmethod
    def credential_headers(self, secret: str) -> tuple[tuple[str, str], ...]:
        """How this schema's API takes a provider key."""

    def account_headers(self, organization: str | None, project: str | None) -> tuple[tuple[str, str], ...]:
        """Headers naming the account the gateway bills to (OpenAI organization / project)."""
        return ()

    @abstractmethod
    def usage_from_json(self, body: dict[str, Any]) -> Usage | None: ...

    @abstractmethod
    def output_text_from_json(self, body: dict[str, Any]) -> str:
        """The completion's text in a JSON response (for an estimate when usage is missing)."""

    def error_code_from_json(self, body: Any) -> str | None:
        """The provider's error code or type in an error body, if it has one. Both schemas nest it
        under `error` (OpenAI `{"error": {"code", "type"}}`, Anthropic `{"type": "error", "error":
        {"type"}}`)."""
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            return None
        code = err.get("code") or err.get("type")
        return str(code)[:64] if code else None

    @abstractmethod
    def stream_reader(self, injected_usage: bool = False) -> StreamReader:
        """A reader for one streamed response; `injected_usage` when request_usage_in_stream changed
        the request."""

    @abstractmethod
    def max_output_tokens(self, body: dict[str, Any]) -> int | None:
        """The most output tokens the request allows (all choices together), if it says."""

    def request_usage_in_stream(self, body: dict[str, Any]) -> bool:
        """Make a streaming request ask for usage when the client did not; True when the body was
        changed (the reader then hides the extra usage event from the client)."""
        return False

    @abstractmethod
    def models_body(self, routes: tuple[Route, ...]) -> bytes: ...

    @abstractmethod
    def model_body(self, route: Route) -> bytes: ...
