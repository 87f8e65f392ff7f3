"""Provider adapters: error bodies, model names and model lists in each schema (usage extraction
is in test_usage_extraction.py)."""

from __future__ import annotations

import orjson
import pytest

from extproc.errors import ErrorKind, GatewayError
from extproc.providers import ADAPTERS
from extproc.routing import Route


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (
            "openai",
            {
                "error": {
                    "message": "no such model",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            },
        ),
        (
            "anthropic",
            {
                "type": "error",
                "error": {"type": "not_found_error", "message": "no such model", "code": "model_not_found"},
            },
        ),
    ],
)
def test_error_bodies(schema: str, expected: object) -> None:
    err = GatewayError(ErrorKind.NOT_FOUND, "no such model", "model_not_found", "model")
    assert orjson.loads(ADAPTERS[schema].error_body(err)) == expected


def test_model_of_rejects_missing_and_non_strings() -> None:
    adapter = ADAPTERS["openai"]
    assert adapter.model_of({"model": "x"}) == "x"
    for body in ({}, {"model": None}, {"model": 3}, {"model": ""}, {"model": ["x"]}):
        with pytest.raises(GatewayError) as err:
            adapter.model_of(body)
        assert err.value.status == 400


def test_models_bodies() -> None:
    routes = (Route("a", "openai", "openai", "a"), Route("b", "anthropic", "anthropic", "b2"))
    assert [m["id"] for m in orjson.loads(ADAPTERS["openai"].models_body(routes))["data"]] == ["a", "b"]
    anth = orjson.loads(ADAPTERS["anthropic"].models_body(routes))
    assert (anth["first_id"], anth["last_id"], anth["has_more"]) == ("a", "b", False)
