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
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


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
    """Consumes one response's SSE events in order; knows where this schema puts usage and errors."""

    usage: Usage | None = None
    # Set when the provider reported an error inside the stream (e.g. Anthropic `event: error`).
    error: dict[str, Any] | None = None
    done: bool = False

    @abstractmethod
    def on_event(self, event: SSEEvent) -> None: ...


# Client headers every provider may see by default (each schema adds its own). Everything else the
# client sent is removed before the request leaves; gateway.yaml `providers.<name>.forward_headers`
# replaces the list.
COMMON_FORWARD_HEADERS = ("accept", "content-type", "user-agent", "x-stainless-*")


class ProviderAdapter(ABC):
    schema: str
    endpoints: dict[str, Endpoint]
    forward_headers: tuple[str, ...] = COMMON_FORWARD_HEADERS

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
    def usage_from_json(self, body: dict[str, Any]) -> Usage | None: ...

    @abstractmethod
    def stream_reader(self) -> StreamReader: ...

    @abstractmethod
    def models_body(self, routes: tuple[Route, ...]) -> bytes: ...

    @abstractmethod
    def model_body(self, route: Route) -> bytes: ...
