from __future__ import annotations

import pytest

from extproc.config import parse_config
from extproc.routing import Route, Router

ROUTER = Router(
    parse_config(
        {
            "providers": {
                "openai": {"schema": "openai"},
                "anthropic": {"schema": "anthropic"},
                "ft": {"schema": "openai"},
            },
            "models": [
                {"name": "gpt-5.5", "provider": "openai"},
                {"name": "fast", "provider": "openai", "upstream": "gpt-5.4-mini", "aliases": ["quick"]},
                {"name": "claude", "provider": "anthropic", "upstream": "claude-sonnet-5-5"},
                {"name": "openai/*", "provider": "openai"},
                {"name": "openai/ft/*", "provider": "ft"},
            ],
        }
    )
)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-5.5", Route("gpt-5.5", "openai", "openai", "gpt-5.5")),
        ("fast", Route("fast", "openai", "openai", "gpt-5.4-mini")),
        ("quick", Route("quick", "openai", "openai", "gpt-5.4-mini")),
        ("claude", Route("claude", "anthropic", "anthropic", "claude-sonnet-5-5")),
        ("openai/gpt-5", Route("openai/gpt-5", "openai", "openai", "gpt-5")),
        ("openai/ft/my-model", Route("openai/ft/my-model", "ft", "openai", "my-model")),
        ("openai/", None),
        ("GPT-4o", None),
        ("unknown", None),
        ("", None),
    ],
)
def test_resolve(model: str, expected: Route | None) -> None:
    assert ROUTER.resolve(model) == expected


def test_rewrite_flag_and_listing() -> None:
    assert ROUTER.resolve("fast").rewrites_model  # type: ignore[union-attr]
    assert not ROUTER.resolve("gpt-5.5").rewrites_model  # type: ignore[union-attr]
    assert [r.public_model for r in ROUTER.listed] == ["gpt-5.5", "fast", "quick", "claude"]
