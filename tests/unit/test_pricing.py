"""Prices and costs: exact Decimal arithmetic, the shipped table, gateway.yaml overrides, lookup."""

from __future__ import annotations

import datetime
import decimal
import re
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.accounting.pricing import (
    Price,
    PriceTable,
    PriceTableError,
    cost_usd,
    format_usd,
    parse_shipped,
    shipped_prices,
)
from extproc.config import ConfigError, PriceConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def price(input: str, output: str = "0", cached: str | None = None, creation: str | None = None) -> Price:
    return Price.from_config(
        PriceConfig(input=input, output=output, cached_input=cached, cache_creation_input=creation)
    )


MINI = price("0.15", "0.60", cached="0.075")  # gpt-4o-mini's shape
SONNET = price("3", "15", cached="0.30", creation="3.75")  # Claude: reads 0.1x, 5-minute writes 1.25x

# (name, price, (input, cached, cache_creation, output), expected USD string)
COST_CASES: list[tuple[str, Price, tuple[int, int, int, int], str]] = [
    ("1M input at 0.15", MINI, (1_000_000, 0, 0, 0), "0.15"),
    ("one input token", MINI, (1, 0, 0, 0), "0.00000015"),
    ("1M output at 0.60", MINI, (0, 0, 0, 1_000_000), "0.6"),
    ("nothing", MINI, (0, 0, 0, 0), "0"),
    # 600k uncached x 0.15 + 400k cached x 0.075 = 0.09 + 0.03
    ("cached priced at the cached rate", MINI, (1_000_000, 400_000, 0, 0), "0.12"),
    ("all cached", MINI, (1_000_000, 1_000_000, 0, 0), "0.075"),
    # Anthropic cache creation at 1.25x input.
    ("cache creation at 1.25x", SONNET, (1_000_000, 0, 1_000_000, 0), "3.75"),
    ("cache read at 0.1x", SONNET, (1_000_000, 1_000_000, 0, 0), "0.3"),
    # 1000 uncached x 3 + 8000 read x 0.30 + 1000 written x 3.75 + 500 out x 15, all / 1M
    ("mixed Anthropic request", SONNET, (10_000, 8_000, 1_000, 500), "0.01665"),
    # 234 x 0.15 + 1000 x 0.075 + 567 x 0.60 = 35.1 + 75 + 340.2 = 450.3, / 1M
    ("mixed small", MINI, (1234, 1000, 0, 567), "0.0004503"),
    # cached + creation > input: the uncached part is clamped at 0, cache tokens billed as reported.
    ("clamped when cache exceeds input", SONNET, (100, 80, 50, 0), "0.0002115"),
    ("cache without input", SONNET, (0, 0, 1_000_000, 0), "3.75"),
    (
        "huge counts stay exact",
        price("999999.999999", "999999.999999"),
        (10**15, 0, 0, 10**15),
        "1999999999998000",  # 2 x 10^15 x 999999.999999 / 10^6
    ),
    ("sub-micro-dollar", price("0.000001"), (1, 0, 0, 0), "0.000000000001"),
]


@pytest.mark.parametrize(
    ("p", "tokens", "expected"), [(p, t, e) for _, p, t, e in COST_CASES], ids=[n for n, _, _, _ in COST_CASES]
)
def test_cost_usd(p: Price, tokens: tuple[int, int, int, int], expected: str) -> None:
    result = cost_usd(p, *tokens)
    assert isinstance(result, Decimal)
    assert format_usd(result) == expected
    assert result == Decimal(expected)


def test_cost_is_computed_exactly_without_touching_the_global_context() -> None:
    before = decimal.getcontext().copy()
    with decimal.localcontext() as ctx:
        ctx.prec = 3  # a caller's low precision must not round the cost
        assert cost_usd(MINI, 1234, 1000, 0, 567) == Decimal("0.0004503")
    after = decimal.getcontext()
    assert (after.prec, after.rounding, after.traps) == (before.prec, before.rounding, before.traps)


@pytest.mark.parametrize(
    "tokens",
    [(-1, 0, 0, 0), (0, -1, 0, 0), (0, 0, -1, 0), (0, 0, 0, -1), (True, 0, 0, 0), (1.0, 0, 0, 0), ("1", 0, 0, 0)],
)
def test_cost_refuses_bad_counts(tokens: tuple[Any, Any, Any, Any]) -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        cost_usd(MINI, *tokens)


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (Decimal("0.150000"), "0.15"),
        (Decimal("0"), "0"),
        (Decimal("0E-12"), "0"),
        (Decimal("-0"), "0"),
        (Decimal("12.000"), "12"),
        (Decimal("100"), "100"),
        (Decimal("1E+3"), "1000"),
        (Decimal("1.5E-7"), "0.00000015"),
        (Decimal("3.75"), "3.75"),
        (Decimal("1234567.8900"), "1234567.89"),
        (Decimal("-0.50"), "-0.5"),
    ],
)
def test_format_usd(amount: Decimal, text: str) -> None:
    assert format_usd(amount) == text
    assert "e" not in format_usd(amount).lower()


@pytest.mark.parametrize("amount", [Decimal("NaN"), Decimal("Infinity")])
def test_format_usd_refuses_non_finite(amount: Decimal) -> None:
    with pytest.raises(ValueError, match="finite"):
        format_usd(amount)


# ---- lookup ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "base"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-5.4-mini-2026-03-17", "gpt-5.4-mini"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-opus-4-1@20250805", "claude-opus-4-1"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-opus-4-0", "claude-opus-4"),  # alias
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),  # alias
    ],
)
def test_snapshot_and_alias_lookup(model: str, base: str) -> None:
    table = PriceTable.load()
    found = table.price(model)
    assert found is not None
    assert found == table.price(base)
    assert model in table


@pytest.mark.parametrize(
    "model",
    ["gpt-unknown", "gpt-unknown-2024-01-01", "mystery", "", "gpt-4o-mini-2024-07", "GPT-4O", "claude-sonnet-4-5-2025"],
)
def test_unknown_model_has_no_price(model: str) -> None:
    table = PriceTable.load()
    assert table.price(model) is None
    assert model not in table


def test_exact_snapshot_entry_wins_over_its_base() -> None:
    table = PriceTable({"gpt-4o": price("2.50"), "gpt-4o-2024-05-13": price("5.00")})
    assert table.price("gpt-4o-2024-05-13") == price("5.00")
    assert table.price("gpt-4o-2024-08-06") == price("2.50")


# ---- overrides from gateway.yaml -------------------------------------------------------------------


def config_with(pricing: dict[str, Any]) -> Any:
    return parse_config({"providers": {"openai": {"schema": "openai"}}, "pricing": pricing})


def test_overrides_from_config() -> None:
    cfg = config_with(
        {
            "gpt-4o": {"input": "1", "output": "2"},  # overrides a shipped entry
            "house-model": {"input": "0.5", "output": "1.5", "cached_input": "0.05", "cache_creation_input": "0.6"},
        }
    )
    table = PriceTable.from_config(cfg)
    # None means "same as input" for both cache prices.
    assert table.price("gpt-4o") == Price(
        input=Decimal(1), cached_input=Decimal(1), cache_creation_input=Decimal(1), output=Decimal(2)
    )
    assert table.price("gpt-4o-2024-08-06") == table.price("gpt-4o")  # the fallback finds the override
    assert table.price("house-model") == Price(
        input=Decimal("0.5"), cached_input=Decimal("0.05"), cache_creation_input=Decimal("0.6"), output=Decimal("1.5")
    )
    assert table.price("gpt-4o-mini") == shipped_prices()["gpt-4o-mini"]  # the rest is the shipped table
    assert format_usd(cost_usd(table.price("house-model") or MINI, 2_000_000, 1_000_000, 500_000, 1_000_000)) == "2.1"


def test_shipped_config_prices_load() -> None:
    table = PriceTable.from_config(load_config(ROOT / "gateway.yaml"))
    assert len(table) >= len(shipped_prices())


def test_override_with_a_bad_model_name() -> None:
    with pytest.raises(PriceTableError, match=re.escape("pricing.bad name: bad model name")):
        PriceTable.load({"bad name": PriceConfig(input="1", output="1")})


def test_config_refuses_float_prices() -> None:
    with pytest.raises(ConfigError, match="quoted decimal strings"):
        config_with({"gpt-4o": {"input": 0.15, "output": "1"}})


# ---- the shipped table ---------------------------------------------------------------------------------


def raw_shipped() -> dict[str, Any]:
    text = (resources.files("extproc.accounting") / "prices.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def test_shipped_yaml_parses_and_every_entry_is_sourced() -> None:
    models = raw_shipped()["models"]
    assert len(models) >= 30
    today = datetime.datetime.now(datetime.UTC).date()
    for name, entry in models.items():
        assert isinstance(entry["date"], datetime.date), name
        assert entry["date"] <= today, name
        assert entry["source"].startswith("https://"), name
        for field in ("input", "cached_input", "cache_creation_input", "output"):
            assert isinstance(entry[field], str), f"{name}.{field} must be a quoted decimal string"
            assert Decimal(entry[field]) >= 0
    assert set(shipped_prices()) >= set(models)


@pytest.mark.parametrize(
    "model", ["gpt-5.5", "gpt-5.4-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4o", "gpt-4o-mini", "o3", "o4-mini"]
)
def test_openai_models_are_priced(model: str) -> None:
    p = shipped_prices()[model]
    assert p.cache_creation_input == p.input  # OpenAI bills cache writes as plain input
    assert p.cached_input < p.input < p.output


@pytest.mark.parametrize(
    "model",
    [
        "claude-opus-4-8",
        "claude-opus-4-1",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
        "claude-3-5-haiku",
    ],
)
def test_anthropic_cache_multipliers(model: str) -> None:
    p = shipped_prices()[model]
    assert p.cache_creation_input == p.input * Decimal("1.25")  # 5-minute cache writes
    assert p.cached_input == p.input * Decimal("0.1")  # cache reads


def test_gateway_yaml_models_are_priced() -> None:
    for model in ("gpt-5.4-mini", "gpt-5.5", "claude-sonnet-5-5", "claude-haiku-5-5"):
        assert PriceTable.load().price(model) is not None, model


def test_shipped_prices_are_read_once() -> None:
    assert shipped_prices() is shipped_prices()


def test_load_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        'models:\n  m:\n    input: "1"\n    cached_input: "0.1"\n    cache_creation_input: "1.25"\n'
        '    output: "5"\n    date: 2026-01-01\n    source: https://example.com/p\n    aliases: [m-latest]\n'
    )
    table = PriceTable.load(shipped=path)
    assert table.models() == ["m", "m-latest"]
    with pytest.raises(PriceTableError, match="cannot read price table"):
        PriceTable.load(shipped=tmp_path / "missing.yaml")


GOOD = {
    "input": "1",
    "cached_input": "0.1",
    "cache_creation_input": "1.25",
    "output": "5",
    "date": "2026-01-01",
    "source": "https://example.com/p",
}


def entry(**over: Any) -> dict[str, Any]:
    e = dict(GOOD)
    for k, v in over.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": {"m": entry(input=0.15)}}, "models.m.input: write prices as quoted decimal strings"),
        ({"models": {"m": entry(output="1e3")}}, "models.m.output: '1e3' is not a price"),
        ({"models": {"m": entry(output="-1")}}, "models.m.output: '-1' is not a price"),
        ({"models": {"m": entry(date=None)}}, "models.m.date: Field required"),
        ({"models": {"m": entry(date="yesterday")}}, "models.m.date"),
        ({"models": {"m": entry(source=None)}}, "models.m.source: Field required"),
        ({"models": {"m": entry(source="http://example.com")}}, "models.m.source: String should match pattern"),
        (
            {"models": {"m": entry(cached_input=None)}},
            "models.m: shipped entries state every price; missing: cached_input",
        ),
        ({"models": {"m": entry(colour="red")}}, "models.m.colour: Extra inputs are not permitted"),
        ({"models": {"m": entry(aliases=["a b"])}}, "models.m.aliases: bad alias 'a b'"),
        ({"models": {"m": entry(aliases=["n"]), "n": entry()}}, "'n' is priced twice (m and n)"),
        ({"models": {"bad name": entry()}}, "models: bad model name 'bad name'"),
        ({"prices": {}}, "models: Field required"),
        (["models"], "expected a mapping with a 'models' key"),
    ],
)
def test_invalid_table_names_the_mistake(data: Any, message: str) -> None:
    with pytest.raises(PriceTableError) as err:
        parse_shipped(yaml.safe_dump(data), "t.yaml")
    assert str(err.value).startswith("t.yaml:")
    assert message in str(err.value)


def test_duplicate_keys_are_refused() -> None:
    text = 'models:\n  m: {input: "1", output: "1"}\n  m: {input: "2", output: "2"}\n'
    with pytest.raises(PriceTableError, match="duplicate key 'm'"):
        parse_shipped(text, "t.yaml")


def test_invalid_yaml() -> None:
    with pytest.raises(PriceTableError, match=re.escape("t.yaml: not valid YAML")):
        parse_shipped("models: [", "t.yaml")


def test_price_table_error_is_a_config_error() -> None:
    assert issubclass(PriceTableError, ConfigError)
