"""Model resolution: public model name -> (provider, upstream model), or an ordered list of targets.

Built once from config into dicts so the per-request cost is one or two dict lookups.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import GatewayConfig, Schema


@dataclass(frozen=True, slots=True)
class Target:
    """One provider a model with targets can be served by; Envoy picks among them per attempt."""

    provider: str
    schema: Schema
    upstream_model: str
    weight: int = 1
    priority: int = 1
    first_byte_timeout: float = 30.0

    @property
    def key(self) -> str:
        """How Envoy names this target back (endpoint metadata `gateway.target`)."""
        return f"{self.provider}/{self.upstream_model}"


@dataclass(frozen=True, slots=True)
class Route:
    public_model: str
    provider: str
    schema: Schema
    upstream_model: str
    # A model served by several targets: the request goes to Envoy's target cluster for it, and
    # provider, schema and upstream_model are the first target's until the answer names the one
    # that answered (`answered_by`).
    targets: tuple[Target, ...] = ()

    @property
    def rewrites_model(self) -> bool:
        return self.public_model != self.upstream_model

    def answered_by(self, key: str) -> Route | None:
        """This route as served by the target Envoy reported (`provider/upstream`), if it is one."""
        for t in self.targets:
            if t.key == key:
                return replace(self, provider=t.provider, schema=t.schema, upstream_model=t.upstream_model)
        return None


class Router:
    def __init__(self, config: GatewayConfig) -> None:
        self._exact: dict[str, Route] = {}
        wildcards: list[tuple[str, str, Schema]] = []
        for m in config.models:
            if m.targets:
                targets = tuple(
                    Target(
                        t.provider,
                        config.providers[t.provider].schema_,
                        t.upstream,
                        t.weight,
                        t.priority,
                        t.first_byte_timeout,
                    )
                    for t in sorted(m.targets, key=lambda t: t.priority)
                )
                first = targets[0]
                for public in (m.name, *m.aliases):
                    self._exact[public] = Route(public, first.provider, first.schema, first.upstream_model, targets)
                continue
            assert m.provider is not None
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
