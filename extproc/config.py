"""gateway.yaml: the one validated config file.

Secrets never live here (later issues read them from env vars or secret files named here), so the
file can be committed and reviewed like envoy.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Schema = Literal["openai", "anthropic"]

_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_MODEL_NAME = re.compile(r"^[^\s\x00-\x1f*]{1,256}$")


class ConfigError(Exception):
    """A config file that cannot be used; the message is meant for the operator as is."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    # host:port, or unix:/path/to.sock
    listen: str = "127.0.0.1:50051"
    # Envoy sends whole buffered request bodies in one gRPC message; keep in step with the listener's
    # per_connection_buffer_limit_bytes in envoy.yaml.
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class ProviderConfig(_Strict):
    # Which wire format the provider speaks; picks the provider adapter.
    schema_: Schema = Field(alias="schema")


class ModelConfig(_Strict):
    # Public name clients send in "model". "prefix/*" routes every "prefix/<x>" to upstream "<x>".
    name: str
    provider: str
    # Name sent to the provider; defaults to `name`. Not allowed on wildcards.
    upstream: str | None = None
    aliases: tuple[str, ...] = ()

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        if v.endswith("/*"):
            if not _MODEL_NAME.match(v[:-2]) or "*" in v[:-2]:
                raise ValueError(f"bad wildcard {v!r}: use '<prefix>/*'")
        elif not _MODEL_NAME.match(v):
            raise ValueError(f"bad model name {v!r}: no spaces, control characters or '*'")
        return v

    @field_validator("aliases")
    @classmethod
    def _alias_shape(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for alias in v:
            if not _MODEL_NAME.match(alias):
                raise ValueError(f"bad alias {alias!r}: no spaces, control characters or '*'")
        return v

    @property
    def is_wildcard(self) -> bool:
        return self.name.endswith("/*")

    @model_validator(mode="after")
    def _wildcard_rules(self) -> ModelConfig:
        if self.is_wildcard and (self.upstream is not None or self.aliases):
            raise ValueError(f"{self.name}: a wildcard takes neither 'upstream' nor 'aliases'")
        return self


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    providers: dict[str, ProviderConfig]
    models: tuple[ModelConfig, ...] = ()

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, v: dict[str, ProviderConfig]) -> dict[str, ProviderConfig]:
        if not v:
            raise ValueError("at least one provider is required")
        for name in v:
            if not _PROVIDER_NAME.match(name):
                raise ValueError(f"bad provider name {name!r}: lowercase letters, digits, '-' and '_' only")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> GatewayConfig:
        seen: dict[str, str] = {}
        for m in self.models:
            if m.provider not in self.providers:
                known = ", ".join(sorted(self.providers))
                raise ValueError(f"model {m.name!r}: unknown provider {m.provider!r} (known: {known})")
            for public in (m.name, *m.aliases):
                if public in seen:
                    raise ValueError(f"model name {public!r} is defined twice ({seen[public]} and {m.name})")
                seen[public] = m.name
        return self


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "gateway.yaml") -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def load_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(data, str(path))
