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

__all__ = ["ADAPTERS", "ENDPOINTS", "Endpoint", "ProviderAdapter", "StreamReader", "Usage"]
