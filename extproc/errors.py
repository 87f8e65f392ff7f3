"""The one error builder: every error the gateway itself answers goes through GatewayError.

The body is rendered in the calling client's schema (OpenAI or Anthropic) by the provider adapter,
so the official SDKs raise their usual typed exceptions (NotFoundError, BadRequestError, ...).
Messages are written for the API caller and never include secrets or prompt text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class ErrorKind(Enum):
    # value: (HTTP status, OpenAI error type, Anthropic error type)
    INVALID_REQUEST = (400, "invalid_request_error", "invalid_request_error")
    UNAUTHENTICATED = (401, "invalid_request_error", "authentication_error")
    FORBIDDEN = (403, "permission_error", "permission_error")
    NOT_FOUND = (404, "invalid_request_error", "not_found_error")
    METHOD_NOT_ALLOWED = (405, "invalid_request_error", "invalid_request_error")
    TOO_LARGE = (413, "invalid_request_error", "request_too_large")
    UNSUPPORTED_MEDIA = (415, "invalid_request_error", "invalid_request_error")
    RATE_LIMITED = (429, "rate_limit_error", "rate_limit_error")
    # A spend or token budget is used up (OpenAI's own type for this; Anthropic has none of its own).
    QUOTA_EXCEEDED = (429, "insufficient_quota", "rate_limit_error")
    HEADERS_TOO_LARGE = (431, "invalid_request_error", "invalid_request_error")
    INTERNAL = (500, "server_error", "api_error")
    UNAVAILABLE = (503, "server_error", "api_error")
    # The gateway itself is at capacity (streams or body memory): retry later, not a provider error.
    OVERLOADED = (503, "server_error", "overloaded_error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def openai_type(self) -> str:
        return self.value[1]

    @property
    def anthropic_type(self) -> str:
        return self.value[2]


@dataclass
class GatewayError(Exception):
    kind: ErrorKind
    message: str
    # Stable machine-readable code, e.g. "model_not_found"; present in both schemas' bodies.
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return self.kind.status


QUOTE_LIMIT = 64


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """A client-supplied value as error messages may show it: a short, printable prefix in quotes.
    Every echo of client input goes through here, so a 1 MB model name or a control character
    never reaches a response body, a header or a log line whole."""
    shown = value[:limit]
    text = repr(shown)  # escapes control characters and quotes
    return text[:-1] + "…" + text[-1] if len(value) > limit else text


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(
        ErrorKind.METHOD_NOT_ALLOWED, f"Method {quote(method)} not allowed on {quote(path)}.", "method_not_allowed"
    )


def overloaded(what: str) -> GatewayError:
    """503 gateway_overloaded with retry-after: the gateway sheds load instead of growing without bound."""
    return GatewayError(
        ErrorKind.OVERLOADED,
        f"The gateway is at capacity ({what}); retry shortly.",
        "gateway_overloaded",
        headers={"retry-after": "1"},
    )
