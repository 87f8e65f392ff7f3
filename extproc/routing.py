"""Model resolution: public model name -> (provider, upstream model).

Built once from config into dicts so the per-request cost is one or two dict lookups.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import GatewayConfig, Schema


@dataclass(frozen=True, slots=True)
class Route:
    public_model: str
    provider: str
    schema: Schema
    upstream_model: str

    @property
    def rewrites_model(self) -> bool:
        return self.public_model != self.upstream_model


class Router:
    def __init__(self, config: GatewayConfig) -> None:
        self._exact: dict[str, Route] = {}
        wildcards: list[tuple[str, str, Schema]] = []
        for m in config.models:
            schema = config.providers[m.provider].schema_
            if m.is_wildcard:
                wildcards.append((m.name[:-1], m.provider, schema))  # keep the trailing "/"
                continue
            upstream = m.upstream or m.name
            for public in (m.name, *m.aliases):
                self._exact[public] = Route(public, m.provider, schema, upstream)
        # Longest prefix wins, so "openai/ft/*" can override "openai/*".
        self._wildcards = sorted(wildcards, key=lambda w: len(w[0]), reverse=True)
        self.listed = tuple(self._exact.values())

    def resolve(self, model: str) -> Route | None:
        route = self._exact.get(model)
        if route is not None:
            return route
        for prefix, provider, schema in self._wildcards:
            if model.startswith(prefix) and len(model) > len(prefix):
                return Route(model, provider, schema, model[len(prefix) :])
        return None
