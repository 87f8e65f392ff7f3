"""Schema translation: one translator per (client schema, provider schema) pair, named after the
pair. Same-schema pairs have none (pass-through)."""

from __future__ import annotations

from .anthropic_openai import AnthropicToOpenAI
from .base import Exchange, StreamTranslator, Translator, exchange_of
from .openai_anthropic import OpenAIToAnthropic


def translators(default_max_tokens: int = 4096) -> dict[tuple[str, str], Translator]:
    """Every translator, by (client schema, provider schema)."""
    pairs: list[Translator] = [OpenAIToAnthropic(default_max_tokens), AnthropicToOpenAI()]
    return {(t.client, t.provider): t for t in pairs}


__all__ = ["Exchange", "StreamTranslator", "Translator", "exchange_of", "translators"]
