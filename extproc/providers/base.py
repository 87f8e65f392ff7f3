"""The interface every provider schema implements.

One adapter per wire schema (not per vendor): an OpenAI-compatible self-hosted server uses the
`openai` adapter. The processor and stages talk only to this interface, so a new schema is one new
module, and translation between schemas (a later issue) becomes one translator per pair.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..errors import ErrorKind, GatewayError
from ..routing import Route
from ..sse import SSEEvent


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


class StreamReader(ABC):
    """Consumes one response's SSE events in order; knows where this schema puts usage and errors."""

    usage: Usage | None = None
    # Set when the provider reported an error inside the stream (e.g. Anthropic `event: error`).
    error: dict[str, Any] | None = None
    done: bool = False

    @abstractmethod
    def on_event(self, event: SSEEvent) -> None: ...


class ProviderAdapter(ABC):
    schema: str
    endpoints: dict[str, Endpoint]

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
