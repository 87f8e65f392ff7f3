"""Per-provider allow-list of client headers forwarded upstream.

Headers steer providers (organization, project, beta features, cookies for session affinity), so
the client only gets to send the ones the provider config allows; organization and project are set
by the gateway from gateway.yaml. Credential-like headers are removed whatever the list says. Runs
on the body reply, once the route (and so the provider) is known.
"""

from __future__ import annotations

from ..config import GatewayConfig, is_credential_header
from ..pipeline import RequestContext, Stage
from ..providers import ADAPTERS

# Set or managed by Envoy and needed on the way out: never removed here. (Removing
# x-forwarded-proto makes Envoy's route match fail: the virtual host drops it at the router instead.)
_KEEP = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "x-request-id",
        "te",
        "transfer-encoding",
        "connection",
        "x-forwarded-proto",
    }
)


class _AllowList:
    """Whether a client header goes upstream, decided once per header name (clients send the same
    few dozen names over and over; the cache is bounded for those that do not)."""

    __slots__ = ("exact", "prefixes", "verdict_cache")
    MAX_CACHED = 4096

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.exact = frozenset(p for p in patterns if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
        self.verdict_cache: dict[str, bool] = {}

    def forwards(self, name: str) -> bool:
        verdict = self.verdict_cache.get(name)
        if verdict is None:
            if name[0] == ":" or name in _KEEP or name.startswith("x-envoy-"):
                verdict = True  # not the client's to choose: kept as Envoy has it
            else:
                verdict = not is_credential_header(name) and (name in self.exact or name.startswith(self.prefixes))
            if len(self.verdict_cache) < self.MAX_CACHED:
                self.verdict_cache[name] = verdict
        return verdict


class UpstreamHeadersStage(Stage):
    name = "upstream-headers"

    def __init__(self, config: GatewayConfig) -> None:
        self._lists = {
            name: _AllowList(
                p.forward_headers if p.forward_headers is not None else ADAPTERS[p.schema_].forward_headers
            )
            for name, p in config.providers.items()
        }
        # Anthropic requires anthropic-version: the configured one goes out when the client's does not.
        self._versions = {name: p.anthropic_version for name, p in config.providers.items() if p.schema_ == "anthropic"}

    async def request_body(self, ctx: RequestContext) -> None:
        # A model with targets: per attempt, for the target Envoy picked (stages/attempt.py).
        if ctx.route is None or ctx.route.targets:
            return
        self.apply(ctx, ctx.route.provider)

    def apply(self, ctx: RequestContext, provider: str) -> None:
        allowed = self._lists[provider]
        removed = ctx.remove_headers
        for name in ctx.headers:
            if not allowed.forwards(name) and name not in ctx.set_headers:
                removed.append(name)
        version = self._versions.get(provider)
        if version and ("anthropic-version" not in ctx.headers or "anthropic-version" in removed):
            ctx.set_headers["anthropic-version"] = version
            if "anthropic-version" in removed:
                removed.remove("anthropic-version")
