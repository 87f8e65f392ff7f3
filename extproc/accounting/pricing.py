"""Prices per upstream model, and exact USD costs from token counts.

The table ships in prices.yaml next to this file (USD per 1M tokens, each entry with the date the
price was read and its source). gateway.yaml's `pricing:` section overrides or adds entries by
upstream model name; there a missing cached_input / cache_creation_input means "same as input".
Build the table once at startup with `PriceTable.from_config(config)`: a bad file fails startup with
the path of the mistake, never a request.

Lookup (`PriceTable.price`): the exact upstream model name first (an entry or one of its aliases);
failing that, a dated snapshot name falls back to its base name when the base is in the table:
`gpt-4o-2024-08-06` -> `gpt-4o` (OpenAI's -YYYY-MM-DD), `claude-sonnet-4-5-20250929` ->
`claude-sonnet-4-5` (Anthropic's -YYYYMMDD; Vertex's @YYYYMMDD too). A snapshot priced differently
from its base must be listed under its own name. Unknown model: None, so the record says "no price"
(cost_usd None), never a silent 0.

Money is Decimal end to end: prices are parsed from strings, costs are computed in a context that
traps any rounding (so a result is exact or an error), and `format_usd` writes plain decimals.

Not modelled: long-context surcharges (e.g. OpenAI gpt-5.4 above 272K input tokens, Claude Haiku 5.5
above 100K), Batch/Flex/Priority tiers, data-residency uplifts, 1-hour cache writes (priced here at the
5-minute rate) and per-request tool fees. The shipped entries carry a note where this matters.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import ConfigError, GatewayConfig, PriceConfig

SHIPPED_PRICES: Final = "prices.yaml"
_PER_TOKENS: Final = Decimal(1_000_000)
# Exact arithmetic: 60 digits is far above any token count x price, and Inexact traps if it were not.
_EXACT: Final = decimal.Context(
    prec=60, rounding=decimal.ROUND_HALF_EVEN, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow]
)
_MODEL_KEY: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,255}$")
_SNAPSHOT_SUFFIX: Final = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|[-@]\d{8})$")


class PriceTableError(ConfigError):
    """The shipped price table or a pricing override cannot be used; the message names the spot."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Price:
    """USD per 1M tokens of each kind."""

    input: Decimal
    cached_input: Decimal
    cache_creation_input: Decimal
    output: Decimal

    def pusd_per_token(self) -> tuple[int, int]:
        """(input, output) in pico-USD per token, exact: a price has at most 6 decimals per 1M
        tokens, so per token it is a whole number of pico-USD (for estimates on the request path,
        where Decimal arithmetic cost more than the rest of the limit check)."""
        scale = Decimal(10**6)  # 10^12 pico-USD per USD / 10^6 tokens
        return int(self.input * scale), int(self.output * scale)

    @classmethod
    def from_config(cls, cfg: PriceConfig) -> Price:
        base = Decimal(cfg.input)
        return cls(
            input=base,
            cached_input=Decimal(cfg.cached_input) if cfg.cached_input is not None else base,
            cache_creation_input=Decimal(cfg.cache_creation_input) if cfg.cache_creation_input is not None else base,
            output=Decimal(cfg.output),
        )


class _ShippedEntry(PriceConfig):
    """One prices.yaml entry: all four prices spelled out, plus where they came from."""

    date: datetime.date
    source: str = Field(pattern=r"^https://\S+$")
    note: str | None = None
    aliases: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _all_prices(self) -> _ShippedEntry:
        missing = [f for f in ("cached_input", "cache_creation_input") if getattr(self, f) is None]
        if missing:
            raise ValueError(f"shipped entries state every price; missing: {', '.join(missing)}")
        return self

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for alias in v:
            if not _MODEL_KEY.match(alias):
                raise ValueError(f"bad alias {alias!r}")
        return v


class _ShippedFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, _ShippedEntry]

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, _ShippedEntry]) -> dict[str, _ShippedEntry]:
        seen: dict[str, str] = {}
        for name, entry in v.items():
            if not _MODEL_KEY.match(name):
                raise ValueError(f"bad model name {name!r}")
            for key in (name, *entry.aliases):
                if key in seen:
                    raise ValueError(f"{key!r} is priced twice ({seen[key]} and {name})")
                seen[key] = name
        return v


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (plain YAML keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    keys: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid price table"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def parse_shipped(text: str, source: str = SHIPPED_PRICES) -> dict[str, Price]:
    """Parse and validate a prices.yaml text: model name (and each alias) -> Price."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise PriceTableError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise PriceTableError(f"{source}: expected a mapping with a 'models' key at the top level")
    try:
        parsed = _ShippedFile.model_validate(data)
    except ValidationError as err:
        raise PriceTableError(_format_errors(source, err)) from None
    prices: dict[str, Price] = {}
    for name, entry in parsed.models.items():
        price = Price.from_config(entry)
        for key in (name, *entry.aliases):
            prices[key] = price
    return prices


@functools.cache
def shipped_prices() -> Mapping[str, Price]:
    """The price table shipped in the package, read and validated once per process."""
    resource = resources.files(__package__ or "extproc.accounting") / SHIPPED_PRICES
    try:
        text = resource.read_text(encoding="utf-8")
    except OSError as err:
        raise PriceTableError(f"{SHIPPED_PRICES}: cannot read the shipped price table: {err}") from None
    return parse_shipped(text, str(resource))


class PriceTable:
    """Upstream model name -> Price: the shipped table with gateway.yaml's overrides on top."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices: dict[str, Price] = dict(prices)

    @classmethod
    def load(cls, overrides: Mapping[str, PriceConfig] | None = None, shipped: Path | None = None) -> PriceTable:
        """The shipped table (or the prices.yaml at `shipped`) plus `overrides`, which win by name."""
        if shipped is None:
            base = dict(shipped_prices())
        else:
            try:
                text = shipped.read_text(encoding="utf-8")
            except OSError as err:
                raise PriceTableError(f"{shipped}: cannot read price table: {err.strerror}") from None
            base = parse_shipped(text, str(shipped))
        for name, cfg in (overrides or {}).items():
            if not _MODEL_KEY.match(name):
                raise PriceTableError(f"gateway.yaml: pricing.{name}: bad model name")
            base[name] = Price.from_config(cfg)
        return cls(base)

    @classmethod
    def from_config(cls, config: GatewayConfig) -> PriceTable:
        return cls.load(config.pricing)

    def price(self, upstream_model: str) -> Price | None:
        """The price for `upstream_model`: exact name, else its dated snapshot's base name, else None."""
        found = self._prices.get(upstream_model)
        if found is not None:
            return found
        base = _SNAPSHOT_SUFFIX.sub("", upstream_model)
        return self._prices.get(base) if base != upstream_model else None

    def __contains__(self, upstream_model: object) -> bool:
        return isinstance(upstream_model, str) and self.price(upstream_model) is not None

    def __len__(self) -> int:
        return len(self._prices)

    def models(self) -> list[str]:
        return sorted(self._prices)


def _count(name: str, value: int) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return Decimal(value)


def cost_usd(
    price: Price,
    input_tokens: int,
    cached_input_tokens: int = 0,
    cache_creation_input_tokens: int = 0,
    output_tokens: int = 0,
) -> Decimal:
    """Exact USD cost: ((input - cached - cache_creation) x input + cached x cached_input +
    cache_creation x cache_creation_input + output x output) / 1,000,000.

    `input_tokens` counts ALL prompt tokens, cache reads and writes included (UsageRecord's
    convention). If cached + cache_creation exceed it (a provider reporting its cache counts apart
    from input, or an estimate below the provider's cache counts), the uncached part is clamped at 0:
    the cache tokens are still billed at their own rates, and nothing is billed negative."""
    total_in = _count("input_tokens", input_tokens)
    cached = _count("cached_input_tokens", cached_input_tokens)
    creation = _count("cache_creation_input_tokens", cache_creation_input_tokens)
    out = _count("output_tokens", output_tokens)
    uncached = max(Decimal(0), _EXACT.subtract(_EXACT.subtract(total_in, cached), creation))
    total = Decimal(0)
    for tokens, rate in (
        (uncached, price.input),
        (cached, price.cached_input),
        (creation, price.cache_creation_input),
        (out, price.output),
    ):
        total = _EXACT.add(total, _EXACT.multiply(tokens, rate))
    return _EXACT.divide(total, _PER_TOKENS)


def format_usd(amount: Decimal) -> str:
    """A plain decimal string: no exponent, no trailing zeros, at least "0" ("0.15", "12", "0")."""
    if not amount.is_finite():
        raise ValueError(f"not a finite amount: {amount}")
    if amount.is_zero():
        return "0"
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text
