"""The translator interface: one class per (client schema, provider schema) pair.

A translator owns everything that differs between the two wire formats for one exchange: the
request body and path, the JSON response, the SSE events, usage and errors. It is pure mapping
logic over parsed JSON (wire shapes live in `openai_wire` / `anthropic_wire`); the translation
stage decides when to call it. Same-schema pairs have no translator: the stage passes them through
untouched (byte-identical).

Fields that do not map are refused with a 400 naming the field (`unsupported`), or dropped where
the README's "Schema translation" table says dropping is safe; never silently changed in meaning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..errors import ErrorKind, GatewayError
from ..sse import SSEEvent


@dataclass(slots=True)
class Exchange:
    """What the response side needs to know of the client's request."""

    # The model name the client sent (the response reports the provider's own model string).
    client_model: str = ""
    stream: bool = False
    # An OpenAI client asked for the usage chunk (stream_options.include_usage).
    include_usage: bool = False


def exchange_of(body: dict[str, Any]) -> Exchange:
    """The facts of a client request (either schema: both name `model` and `stream`)."""
    stream = body.get("stream") is True
    opts = body.get("stream_options")
    return Exchange(
        client_model=str(body.get("model")),
        stream=stream,
        include_usage=stream and isinstance(opts, dict) and opts.get("include_usage") is True,
    )


def unsupported(param: str, why: str) -> GatewayError:
    """A request field the target schema cannot express: 400 naming it."""
    return GatewayError(ErrorKind.INVALID_REQUEST, f"{param}: {why}", "unsupported_parameter", param)


def invalid(param: str, why: str) -> GatewayError:
    """A request field of the wrong shape (the provider would refuse it too, but in its own words)."""
    return GatewayError(ErrorKind.INVALID_REQUEST, f"Invalid '{param}': {why}", "invalid_request", param)


class StreamTranslator(ABC):
    """Translates one streamed response, event by event, as it arrives. It may hold state (the
    open content block, the finish reason until usage arrives) but never whole streams."""

    @abstractmethod
    def on_event(self, event: SSEEvent) -> list[SSEEvent]:
        """The client-schema events for one provider event (often one, sometimes none or several)."""

    def close(self) -> list[SSEEvent]:
        """The provider's stream ended (end of body). A stream that broke before its end marker is
        not completed here: the client must see it broken, never a made-up clean end."""
        return []


class Translator(ABC):
    client: str
    provider: str
    # The provider's path for the client's endpoint.
    paths: dict[str, str]

    @abstractmethod
    def request(self, body: dict[str, Any]) -> tuple[dict[str, Any], Exchange]:
        """The provider-schema request for a client-schema one (the model already routed). Raises
        GatewayError (400) for what cannot be translated."""

    @abstractmethod
    def response(self, body: dict[str, Any], ex: Exchange) -> dict[str, Any]:
        """A successful (2xx) JSON response in the client's schema."""

    @abstractmethod
    def error(self, status: int, body: Any) -> dict[str, Any]:
        """A provider error body (any JSON, or None when it was not JSON) in the client's schema,
        so the client's SDK raises its usual exception for `status`."""

    @abstractmethod
    def stream(self, ex: Exchange) -> StreamTranslator: ...
