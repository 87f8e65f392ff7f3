"""What a limit is: the validated shape of `limits` on a tenant or a key, and the rules one request is
checked against.

The same shape is written in gateway.yaml (`tenants.<name>.limits`, `auth.static_keys[].limits`) and
by `extproc limits set` (stored on the tenant or key record, so it travels to running servers with the
key store's own change propagation). Tenant limits bound the tenant as a whole (every key's requests
count against them); key limits bound one key. Both apply, so a key never gets more than its tenant
has left, and a key without limits of its own is bounded by its tenant's alone. A `models` entry adds
rules for the models matching its glob, counted together for that tenant or key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..accounting.periods import Period

PERIODS: tuple[Period, ...] = ("day", "week", "month")
# Money in the limiter is integer pico-USD, like the accounting aggregates it is compared with.
PUSD_PER_USD = 10**12
_USD = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,12})?$")
# Model globs become part of Redis key names: keep them to the characters model names use.
_MODEL_GLOB = re.compile(r"^[A-Za-z0-9._:/@+*?-]{1,128}$")


class LimitsError(ValueError):
    """Limits that cannot be used; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateSpec(_Strict):
    """Rate and concurrency limits: the part that can also be set per model."""

    requests_per_minute: int | None = Field(default=None, ge=1, le=10**9)
    # Input + output tokens per minute.
    tokens_per_minute: int | None = Field(default=None, ge=1, le=10**12)
    # Requests in flight at once, streams included until they end.
    concurrent_requests: int | None = Field(default=None, ge=1, le=10**7)

    @field_validator("requests_per_minute", "tokens_per_minute", "concurrent_requests", mode="before")
    @classmethod
    def _whole(cls, v: object) -> object:
        if isinstance(v, bool) or (v is not None and not isinstance(v, int)):
            raise ValueError("must be a whole number")
        return v


class LimitSpec(RateSpec):
    """Everything `limits:` may hold on a tenant or a key."""

    # Spend per period, as a decimal string (money is exact; floats are refused).
    budget_usd: str | None = None
    # Input + output tokens per period.
    budget_tokens: int | None = Field(default=None, ge=1, le=10**15)
    # Calendar period of the budgets, in UTC: day, week (ISO, from Monday) or month.
    period: Period = "month"
    # Fractions of a budget at which an alert is sent (once per threshold per period).
    alert_at: tuple[float, ...] = (0.8, 1.0)
    # Extra rate limits for the models matching a glob ("gpt-5*"), counted together.
    models: dict[str, RateSpec] = Field(default_factory=dict)

    @field_validator("budget_usd", mode="before")
    @classmethod
    def _usd(cls, v: object) -> object:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError('write money as a quoted decimal string, e.g. "250.00" (floats are not exact)')
        text = str(v)
        if not _USD.match(text):
            raise ValueError(f"{text!r} is not an amount: up to 9 digits, a dot and up to 12 decimals")
        try:
            if Decimal(text) <= 0:
                raise ValueError("must be more than 0")
        except InvalidOperation:
            raise ValueError(f"{text!r} is not a decimal") from None
        return text

    @field_validator("budget_tokens", mode="before")
    @classmethod
    def _whole_tokens(cls, v: object) -> object:
        if isinstance(v, bool) or (v is not None and not isinstance(v, int)):
            raise ValueError("must be a whole number")
        return v

    @field_validator("alert_at")
    @classmethod
    def _thresholds(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        for x in v:
            if not 0 < x <= 10:
                raise ValueError(f"{x} is not a fraction of the budget: use a number in (0, 10], e.g. 0.8")
        if len(v) > 10:
            raise ValueError("at most 10 thresholds")
        return tuple(sorted(set(v)))

    @field_validator("models")
    @classmethod
    def _globs(cls, v: dict[str, RateSpec]) -> dict[str, RateSpec]:
        if len(v) > 50:
            raise ValueError("at most 50 model entries")
        for glob in v:
            if not _MODEL_GLOB.match(glob):
                raise ValueError(f"bad model glob {glob!r}: letters, digits, . _ : / @ + - and the wildcards * ?")
        return v

    @property
    def budget_pusd(self) -> int | None:
        return None if self.budget_usd is None else int(Decimal(self.budget_usd) * PUSD_PER_USD)

    def to_dict(self) -> dict[str, Any]:
        """The stored form: only what was set (so a later default change applies to old records)."""
        return self.model_dump(exclude_none=True, exclude_defaults=True, mode="json")

    @property
    def empty(self) -> bool:
        return not self.to_dict()


def parse_limits(data: object, where: str = "limits") -> LimitSpec:
    """A LimitSpec from a stored or configured mapping; LimitsError names the path of a mistake."""
    if data is None:
        return LimitSpec()
    try:
        return LimitSpec.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in (where, *e["loc"]))
            lines.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
        raise LimitsError("; ".join(lines)) from None


Kind = Literal["tenant", "key"]


@dataclass(frozen=True, slots=True)
class Rule:
    """The limits of one scope (a tenant, a key, or the models matching a glob under one of them)."""

    tenant: str
    # Whose usage a budget reads: the tenant's aggregates or one key's.
    kind: Kind
    # The key id for kind "key"; "" for a tenant.
    owner: str
    # The model glob for a per-model rule; "" for the scope's own limits.
    models: str
    # Bumped by `extproc limits reset`: rate and concurrency state starts over under a new name.
    epoch: int
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    budget_pusd: int | None = None
    budget_tokens: int | None = None
    period: Period = "month"
    alert_at: tuple[float, ...] = ()
    # Rules are dictionary keys on the request path (the limiters' caches): hashed once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def scope(self) -> str:
        """Name of the scope's budget state (reservations, alerts): survives a reset."""
        base = "tenant" if self.kind == "tenant" else f"key:{self.owner}"
        return f"{base}:model:{self.models}" if self.models else base

    @property
    def state_scope(self) -> str:
        """Name of the scope's rate and concurrency state: a reset starts a new one."""
        return f"{self.scope}#{self.epoch}"

    @property
    def label(self) -> str:
        """How messages and alerts name the scope."""
        who = f"tenant {self.tenant!r}" if self.kind == "tenant" else f"key {self.owner}"
        return f"{who} for models {self.models!r}" if self.models else who

    @property
    def needs_tokens(self) -> bool:
        return self.tpm is not None or self.budget_tokens is not None

    @property
    def needs_cost(self) -> bool:
        return self.budget_pusd is not None


def rules_of(spec: LimitSpec, tenant: str, kind: Kind, owner: str, epoch: int) -> tuple[Rule, ...]:
    """The scope's own rule (if it sets anything) and one per model entry."""
    out: list[Rule] = []
    if any(
        v is not None
        for v in (
            spec.requests_per_minute,
            spec.tokens_per_minute,
            spec.concurrent_requests,
            spec.budget_usd,
            spec.budget_tokens,
        )
    ):
        out.append(
            Rule(
                tenant,
                kind,
                owner,
                "",
                epoch,
                spec.requests_per_minute,
                spec.tokens_per_minute,
                spec.concurrent_requests,
                spec.budget_pusd,
                spec.budget_tokens,
                spec.period,
                spec.alert_at,
            )
        )
    for glob, rate in spec.models.items():
        if rate.requests_per_minute or rate.tokens_per_minute or rate.concurrent_requests:
            out.append(
                Rule(
                    tenant,
                    kind,
                    owner,
                    glob,
                    epoch,
                    rate.requests_per_minute,
                    rate.tokens_per_minute,
                    rate.concurrent_requests,
                )
            )
    return tuple(out)


EPOCH_FIELD = "limits_epoch"


class Limits:
    """The rules of one identity (its tenant's and its key's), and which apply to a model."""

    __slots__ = ("_by_model", "rules")

    def __init__(self, rules: tuple[Rule, ...] = ()) -> None:
        self.rules = rules
        self._by_model: dict[str, tuple[Rule, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def for_model(self, model: str) -> tuple[Rule, ...]:
        found = self._by_model.get(model)
        if found is None:
            found = tuple(r for r in self.rules if not r.models or fnmatchcase(model, r.models))
            if len(self._by_model) < 1024:  # bounded: wildcard routes accept any model name
                self._by_model[model] = found
        return found

    @staticmethod
    def of(tenant: str, tenant_policy: dict[str, Any], key_id: str, key_policy: dict[str, Any]) -> Limits:
        """From the stored policies. A stored spec that no longer validates (written by a newer
        version, or by hand) fails safe: the error propagates and the request is refused."""
        rules = rules_of(
            parse_limits(tenant_policy.get("limits"), f"tenant {tenant}: limits"),
            tenant,
            "tenant",
            "",
            int(tenant_policy.get(EPOCH_FIELD) or 0),
        ) + rules_of(
            parse_limits(key_policy.get("limits"), f"key {key_id}: limits"),
            tenant,
            "key",
            key_id,
            int(key_policy.get(EPOCH_FIELD) or 0),
        )
        return Limits(rules)
