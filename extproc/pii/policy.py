"""The `pii:` section: what to do with each entity type, in requests and in responses.

The same shape is written at the top level of gateway.yaml (the defaults) and under
`tenants.<name>.pii`, where each field that is set overrides the default (`entities` per entity
type). No top-level `pii:` and no tenant section: nothing is scanned.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .detect import ENTITY_TYPES, CustomDetector, Detector

Action = Literal["mask", "hash", "block", "restore", "allow"]
ResponseMode = Literal["mask", "restore", "off"]
OnError = Literal["block", "allow"]

_NAME = re.compile(r"^[A-Z][A-Z0-9_]{1,31}$")
# Validators a custom detector can name without code.
_BUILTIN_VALIDATORS = ("luhn", "iban", "us_ssn", "phone")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CustomSpec(_Strict):
    # The entity type it reports (upper case, e.g. EMPLOYEE_ID).
    name: str
    # A Python regular expression; the whole match is the entity.
    pattern: str
    # luhn | iban | us_ssn | phone, or "module:function" (called with the match, True = an entity).
    validator: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"bad entity name {v!r}: upper-case letters, digits and _ (e.g. EMPLOYEE_ID)")
        if v in ENTITY_TYPES:
            raise ValueError(f"{v!r} is a built-in entity type; pick another name")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            compiled = re.compile(v)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        if compiled.match(""):
            raise ValueError("the pattern matches the empty string")
        return v

    @field_validator("validator")
    @classmethod
    def _validator(cls, v: str | None) -> str | None:
        if v is None or v in _BUILTIN_VALIDATORS:
            return v
        if ":" not in v:
            raise ValueError(f"unknown validator {v!r}: one of {', '.join(_BUILTIN_VALIDATORS)}, or 'module:function'")
        _import_validator(v)
        return v


class PiiSpec(_Strict):
    """Every field optional: at the top level a missing field takes the built-in default; under a
    tenant it takes the top level's."""

    action: Action | None = None
    entities: dict[str, Action] = Field(default_factory=dict)
    responses: ResponseMode | None = None
    on_error: OnError | None = None
    custom: tuple[CustomSpec, ...] | None = None
    # Leave documentation values alone: example.com/.org/.net addresses, 555-01xx numbers,
    # 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32 addresses, well-known test cards.
    ignore_documentation_values: bool | None = None
    # Seconds a request's scan may take before on_error applies.
    timeout_seconds: float | None = Field(default=None, gt=0, le=60)
    # The env var holding the secret of `hash` (top level only; default PII_HASH_KEY).
    hash_key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]{0,127}$")

    @field_validator("entities")
    @classmethod
    def _entities(cls, v: dict[str, Action]) -> dict[str, Action]:
        # Names of custom detectors are checked against the config's `custom` lists (config.py).
        for name in v:
            if name not in ENTITY_TYPES and not _NAME.match(name):
                raise ValueError(f"unknown entity type {name!r} (built in: {', '.join(ENTITY_TYPES)})")
        return v


def _import_validator(path: str) -> Callable[[str], bool]:
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"validator {path!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"validator {path!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _builtin_validator(name: str) -> Callable[[str], bool]:
    # Values as a custom pattern matched them (separators and all): stdnum's own checks, which clean
    # them first; the detector's fast ones take only bare candidates.
    from stdnum import iban
    from stdnum.us import ssn

    from .detect import _parse_phone, luhn_valid

    digits = re.compile(r"\D")
    if name == "luhn":
        return lambda s: luhn_valid(digits.sub("", s))
    if name == "iban":
        return lambda s: bool(iban.is_valid(s))
    if name == "us_ssn":
        return lambda s: bool(ssn.is_valid(s))
    return lambda s: _parse_phone(s, None) or _parse_phone(s, "US")


@dataclass(frozen=True)
class Policy:
    """The resolved policy of one tenant (defaults with the tenant's overrides)."""

    actions: dict[str, Action]
    responses: ResponseMode
    on_error: OnError
    # Scans the types whose request action is not "allow".
    detector: Detector
    ignore_documentation_values: bool
    timeout_seconds: float
    # `responses: mask`: scans every type not explicitly allowed under `entities` (the default
    # `action` is about requests: a tenant may send its own data and still not get others').
    response_detector: Detector | None = None

    def action(self, entity: str) -> Action:
        return self.actions.get(entity, "allow")

    @property
    def restores(self) -> bool:
        return "restore" in self.actions.values()


def resolve(default: PiiSpec | None, tenant: PiiSpec | None) -> Policy | None:
    """The policy for a tenant, or None when PII handling is off for it."""
    if default is None and tenant is None:
        return None
    base = default or PiiSpec()
    over = tenant or PiiSpec()
    action: Action = over.action or base.action or "mask"
    entities = {**base.entities, **over.entities}
    custom = over.custom if over.custom is not None else (base.custom or ())
    actions: dict[str, Action] = {t: entities.get(t, action) for t in (*ENTITY_TYPES, *(c.name for c in custom))}
    responses: ResponseMode = over.responses or base.responses or "restore"
    on_error: OnError = over.on_error or base.on_error or "block"
    ignore = over.ignore_documentation_values
    if ignore is None:
        ignore = bool(base.ignore_documentation_values)
    timeout = over.timeout_seconds or base.timeout_seconds or 2.0
    detectors = {c.name: _custom_detector(c) for c in custom}

    def detector(types: set[str]) -> Detector:
        return Detector((t for t in ENTITY_TYPES if t in types), [d for n, d in detectors.items() if n in types])

    request_types = {t for t, a in actions.items() if a != "allow"}
    response_detector = None
    if responses == "mask":
        response_detector = detector({t for t in actions if entities.get(t) != "allow"})
    return Policy(actions, responses, on_error, detector(request_types), ignore, timeout, response_detector)


def _custom_detector(c: CustomSpec) -> CustomDetector:
    validator = None
    if c.validator is not None:
        validator = (
            _builtin_validator(c.validator) if c.validator in _BUILTIN_VALIDATORS else _import_validator(c.validator)
        )
    return CustomDetector(c.name, re.compile(c.pattern), validator)
