"""Provider adapters, one per wire schema."""

from __future__ import annotations

from .anthropic import AnthropicAdapter
from .base import Endpoint, ProviderAdapter, StreamReader, Usage
from .openai import OpenAIAdapter

ADAPTERS: dict[str, ProviderAdapter] = {"openai": OpenAIAdapter(), "anthropic": AnthropicAdapter()}

# Request path -> (adapter of the client's schema, endpoint). Built once; the hot path does one lookup.
ENDPOINTS: dict[str, tuple[ProviderAdapter, Endpoint]] = {
    path: (adapter, ep) for adapter in ADAPTERS.values() for path, ep in adapter.endpoints.items()
}


def client_adapter(headers: dict[str, str]) -> ProviderAdapter:
    """The schema to answer in when the path does not say (unknown endpoints): the Anthropic SDK
    always sends anthropic-version."""
    return ADAPTERS["anthropic"] if "anthropic-version" in headers else ADAPTERS["openai"]


__all__ = ["ADAPTERS", "ENDPOINTS", "Endpoint", "ProviderAdapter", "StreamReader", "Usage", "client_adapter"]
