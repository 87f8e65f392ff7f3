"""gateway.yaml: the one validated config file.

Secrets never live here (later issues read them from env vars or secret files named here), so the
file can be committed and reviewed like envoy.yaml.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .limits.spec import LimitSpec
from .pii.policy import PiiSpec

Schema = Literal["openai", "anthropic"]

_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_MODEL_NAME = re.compile(r"^[^\s\x00-\x1f*]{1,256}$")
_HEADER_GLOB = re.compile(r"^[a-z0-9][a-z0-9!#$%&'+.^_`|~-]*\*?$")
# Client headers that carry credentials or session state: removed from every request, and refused
# in forward_headers. Globs cover vendor variants (x-goog-api-key, x-amz-security-token, ...).
_CREDENTIAL_HEADERS = re.compile(
    r"^(authorization|proxy-authorization|cookie|x-api-key|api-key|"
    r".*-(key|token|secret|secrets|credential|credentials|auth|password|session))$|"
    r"(^x-gateway-)|(^x-envoy-)"
)


def is_credential_header(name: str) -> bool:
    """Whether a client header carries credentials or is gateway-internal: never forwarded, whatever
    forward_headers says."""
    return _CREDENTIAL_HEADERS.match(name) is not None


_FIXED_CREDENTIALS = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
    "x-gateway-",
    "x-envoy-",
)


def _glob_reaches_credentials(glob: str) -> bool:
    """A forward_headers entry that could let a credential through: a credential name itself, a
    glob matching one of the fixed names ("x-*" matches x-api-key), or a glob inside a reserved
    family ("x-gateway-foo*")."""
    if not glob.endswith("*"):
        return is_credential_header(glob)
    prefix = glob[:-1]
    return any(c.startswith(prefix) or (c.endswith("-") and prefix.startswith(c)) for c in _FIXED_CREDENTIALS)


class ConfigError(Exception):
    """A config file that cannot be used; the message is meant for the operator as is."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    # host:port, or unix:/path/to.sock
    listen: str = "127.0.0.1:50051"
    # Envoy's listener as the server reaches it for calls of its own (the semantic cache's
    # embeddings): they go through Envoy and the gateway like any client's, never to a provider.
    envoy_url: str = Field(default="http://127.0.0.1:10000", pattern=r"^https?://[^\s/]+$")
    # Envoy sends whole buffered request bodies in one gRPC message; keep in step with the listener's
    # per_connection_buffer_limit_bytes in envoy.yaml.
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Client header limits, below Envoy's own (envoy.yaml max_headers_count / max_request_headers_kb)
    # so the headers the gateway adds always fit; `extproc check` verifies the room. Over: 431.
    max_request_headers: int = Field(default=80, ge=16, le=1000)
    max_request_headers_kb: int = Field(default=48, ge=8, le=8192)
    # Open ext_proc streams (HTTP exchanges, SSE included) one process serves; past it new requests
    # get 503 gateway_overloaded with retry-after instead of queueing without bound.
    max_concurrent_streams: int = Field(default=5000, ge=1)
    # Request bodies held in this process at once (bytes as sent). A body that would pass it gets
    # 503 gateway_overloaded. Peak memory per body is ~1.5-3x its size (bytes, parsed JSON, a
    # rewritten copy): see the README's sizing rule next to the container memory limit.
    max_body_bytes_in_flight: int = Field(default=96 * 1024 * 1024, ge=1024 * 1024)
    # How the server speaks gRPC to Envoy: its own HTTP/2 transport (native, ~3x less CPU per
    # request) or grpc.aio (grpcio).
    transport: Literal["native", "grpcio"] = "native"
    # HTTP address of /metrics (Prometheus), /healthz, /readyz and /status (for `extproc status`);
    # null turns it off. It names no tenant or key, but keep it off the public network.
    metrics_listen: str | None = "127.0.0.1:9464"
    # Server processes `extproc serve` runs, each with its own event loop (one Python process uses
    # one core). auto: the cores this container may use (CPU affinity and cgroup quota) with the
    # redis store; 1 with the embedded store, whose state and limits belong to one process.
    workers: int | Literal["auto"] = "auto"
    # How several workers share server.listen. reuse_port: all on the same address (SO_REUSEPORT),
    # the kernel spreads Envoy's connections among them: no envoy.yaml change, but Envoy opens only
    # a few connections, so the spread can be uneven. ports: worker i listens on port+i (unix:
    # <path>.<i>), each an endpoint of envoy.yaml's extproc cluster (LEAST_REQUEST spreads streams
    # evenly; `extproc check` verifies the endpoints). README, "Worker processes", has the figures.
    worker_listen: Literal["reuse_port", "ports"] = "reuse_port"

    def ops_address(self, override: str | None = None) -> str | None:
        """The ops address in effect: --metrics-listen (off: none, whatever this file says), else
        metrics_listen."""
        if override is None:
            return self.metrics_listen
        return None if override == "off" else override

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError(f"expected 1 to 64 or 'auto', got {v}")
        return v

    def worker_addresses(self, n: int, listen: str | None = None) -> list[str]:
        """Each of n workers' gRPC address (reuse_port shares `listen`, ports counts up from it)."""
        listen = listen or self.listen
        if n == 1:
            return [listen]
        if listen.startswith("unix:"):
            if self.worker_listen == "reuse_port":
                raise ConfigError(
                    "server.worker_listen: reuse_port cannot share a unix socket among workers; use ports "
                    "(worker i listens on <path>.<i>)"
                )
            return [f"{listen}.{i}" for i in range(n)]
        host, _, port = listen.rpartition(":")
        if not port.isdigit() or int(port) == 0:
            raise ConfigError(f"server.listen {listen}: {n} workers need a fixed port (Envoy must know where they are)")
        if self.worker_listen == "reuse_port":
            return [listen] * n
        if int(port) + n - 1 > 65535:
            raise ConfigError(f"server.listen {listen}: ports {port}..{int(port) + n - 1} do not exist")
        return [f"{host}:{int(port) + i}" for i in range(n)]

    @model_validator(mode="after")
    def _ports_need_count(self) -> ServerConfig:
        if self.worker_listen == "ports" and self.workers == "auto":
            raise ValueError(
                "server.workers: set a number with worker_listen: ports (envoy.yaml lists one endpoint per worker)"
            )
        return self

    @field_validator("metrics_listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"expected host:port, got {v!r}")
        return v


class MetricsConfig(_Strict):
    # Label series by tenant (requests, tokens, cost). Off: the tenant label is empty everywhere,
    # for deployments with many tenants.
    tenant_labels: bool = True
    # Distinct label sets one metric keeps; past it new ones are counted under label values
    # "__overflow__" (a client choosing model names under a wildcard cannot grow memory without bound).
    max_series: int = Field(default=2000, ge=10, le=1_000_000)


class TracingConfig(_Strict):
    """OpenTelemetry traces; exported only when an OTLP endpoint is set in the environment
    (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)."""

    # Share of requests traced when no caller decided (Envoy's own decision, passed in the trace
    # context, wins): also what `extproc dev` gives Envoy's tracer as random_sampling.
    sampling_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # Put the prompt and the answer on spans (gen_ai.input.messages / gen_ai.output.messages),
    # after PII redaction. Off by default: traces are often kept longer and wider than logs.
    capture_content: bool = False
    # service.name of the server's spans (OTEL_SERVICE_NAME overrides it).
    service_name: str = Field(default="llm-gateway-extproc", min_length=1, max_length=128)


class ProviderConfig(_Strict):
    # Which wire format the provider speaks; picks the provider adapter.
    schema_: Schema = Field(alias="schema")
    # Where the provider's API key comes from: an env var name, or a file (e.g. a mounted secret).
    # Neither: the request goes upstream without credentials (a self-hosted server without auth).
    api_key_env: str | None = None
    api_key_file: str | None = None
    # Sent to Anthropic-schema providers when the client did not send its own.
    anthropic_version: str = "2023-06-01"
    # Client headers forwarded to this provider (names or "prefix-*" globs, lowercase); everything
    # else the client sent is removed. Absent: the schema's defaults (README). Credentials never.
    forward_headers: tuple[str, ...] | None = None
    # OpenAI organization / project, chosen here and never by the client (openai schema only).
    organization: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,128}$")
    project: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,128}$")

    @model_validator(mode="after")
    def _one_key_source(self) -> ProviderConfig:
        if self.api_key_env and self.api_key_file:
            raise ValueError("set api_key_env or api_key_file, not both")
        if (self.organization or self.project) and self.schema_ != "openai":
            raise ValueError("organization and project apply to openai-schema providers only")
        return self

    @field_validator("forward_headers")
    @classmethod
    def _forwardable(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in v or ():
            if not _HEADER_GLOB.match(name):
                raise ValueError(f"bad header name {name!r}: lowercase token, optionally ending in '*'")
            if _glob_reaches_credentials(name):
                raise ValueError(f"{name!r} carries credentials and is never forwarded from clients")
        return v


class StoreConfig(_Strict):
    # embedded: SQLite file + memory, zero setup, one server process. redis: shared by replicas.
    backend: Literal["embedded", "redis"] = "embedded"
    # Embedded store file; relative paths are relative to this config file's directory.
    path: str = ".extproc/state.db"
    # Name of the env var holding the Redis URL (it may contain a password, so it is not in this file).
    redis_url_env: str = "REDIS_URL"
    redis_prefix: str = "gw:"


class LedgerConfig(_Strict):
    # Name of the env var holding a PostgreSQL URL (it may contain a password). Unset: SQLite.
    database_url_env: str | None = None
    # SQLite ledger file when no database_url_env is set; default: ledger.db next to store.path.
    path: str | None = None
    # Redis backend: whether each server process moves usage records from Redis into the ledger.
    # false: `extproc db consume` does it, as a process of its own (the servers then open no
    # database connection). The embedded backend writes records straight into its ledger.
    consumer: bool = True


class UsageConfig(_Strict):
    # Where records wait while Redis is unreachable; default: usage-spool/ next to store.path.
    spool_path: str | None = None
    # A full spool refuses nothing but logs and counts every record it cannot keep.
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)


_PRICE = re.compile(r"^[0-9]{1,6}(\.[0-9]{1,6})?$")


class PriceConfig(_Strict):
    """USD per 1M tokens, as decimal strings (never floats: money is exact)."""

    input: str
    output: str
    # Default to the input price when a model has no separate cache price.
    cached_input: str | None = None
    cache_creation_input: str | None = None

    @field_validator("input", "output", "cached_input", "cache_creation_input", mode="before")
    @classmethod
    def _decimal(cls, v: object) -> object:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError('write prices as quoted decimal strings, e.g. "0.15" (floats are not exact)')
        text = str(v)
        if not _PRICE.match(text):
            raise ValueError(f"{text!r} is not a price: up to 6 digits, a dot and up to 6 decimals")
        try:
            Decimal(text)
        except InvalidOperation:
            raise ValueError(f"{text!r} is not a decimal") from None
        return text


class CacheSpec(_Strict):
    """Response cache settings (README, "Response cache"). The same shape at the top level
    (defaults), under a tenant and on a model entry; every field set overrides per field (model over
    tenant over default), so all fields are optional here and `CacheSettings` holds the result."""

    mode: Literal["off", "exact", "semantic"] | None = None
    ttl_seconds: int | None = Field(default=None, ge=1, le=30 * 86400)

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as false.
        return "off" if v is False else v

    # A larger answer is not stored.
    max_entry_bytes: int | None = Field(default=None, ge=256, le=64 * 1024 * 1024)
    # Answers to requests with a temperature above 0 (or none: the provider's default is 1) are
    # not reused unless this is true.
    cache_nonzero_temperature: bool | None = None
    # Answers cut by max_tokens (finish_reason length / stop_reason max_tokens) are not stored
    # unless this is true.
    cache_truncated: bool | None = None
    # Semantic mode: the least cosine similarity between the last user turns of two requests
    # (same tenant, model, parameters and earlier turns) for one's answer to serve the other.
    similarity_threshold: float | None = Field(default=None, gt=0, le=1)
    # Where semantic mode's embeddings come from: "local" (a hashed bag of words computed in the
    # server, no network; it matches near-duplicates, not meaning), or the name of an embeddings
    # model in `models` on an OpenAI-schema provider, called through Envoy's listener
    # (server.envoy_url) with the virtual key in the env var `embedding_key_env`, like any client.
    embedding: str | None = Field(default=None, min_length=1, max_length=256)
    embedding_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # An embedding that takes longer is a miss (the request goes to the provider).
    embedding_timeout_seconds: float | None = Field(default=None, gt=0, le=60)
    # A search of the cached vectors that takes longer is a miss (the request goes to the provider).
    search_timeout_seconds: float | None = Field(default=None, gt=0, le=10)
    # Hits count against the caller's limits and token budgets (with the original answer's
    # tokens; USD budgets see their cost, 0). Default: hits count against nothing.
    count_hits: bool | None = None


class TenantConfig(_Strict):
    # Models the tenant's keys may use by default (names or globs like "gpt-*"); absent = all.
    models: tuple[str, ...] | None = None
    # Rate limits, concurrency and budgets of the tenant as a whole (README, "Limits and budgets").
    limits: LimitSpec | None = None
    # PII handling for this tenant: each field set here overrides the top-level `pii:`.
    pii: PiiSpec | None = None
    # Response cache for this tenant: each field set here overrides the top-level `cache:`.
    cache: CacheSpec | None = None
    # Defaults for later policy stages (limits, budgets, PII); keys override per field.
    policy: dict[str, Any] = Field(default_factory=dict)


class StaticKeyConfig(_Strict):
    """A key kept in this file for small deployments: only its SHA-256 is written here."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    name: str
    tenant: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    models: tuple[str, ...] | None = None
    expires_at: datetime | None = None
    # This key's own limits (its tenant's apply too).
    limits: LimitSpec | None = None


class LimitsConfig(_Strict):
    """How limits are enforced; the limits themselves are set per tenant and per key."""

    # Redis unreachable: "open" falls back to a per-process limiter that allows each limit divided
    # by expected_replicas; "closed" refuses with 503 limits_unavailable. Logged and counted.
    failure_mode: Literal["open", "closed"] = "open"
    expected_replicas: int = Field(default=1, ge=1, le=10_000)
    # Output tokens reserved for a request that sets no max_tokens / max_completion_tokens.
    default_max_output_tokens: int = Field(default=4096, ge=1, le=10_000_000)
    # A request's concurrency slot and budget reservation are leases, renewed while it runs: a
    # replica that died stops holding them within this time.
    lease_seconds: float = Field(default=30.0, ge=2, le=3600)


class AlertsConfig(_Strict):
    # Budget alerts are POSTed here as JSON (retried with backoff, off the request path); absent:
    # alerts are a log line and a counter only.
    webhook_url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=60)


class TranslationConfig(_Strict):
    """OpenAI <-> Anthropic schema translation (README, "Schema translation")."""

    # Off: a model served through the other schema's API gets 400 schema_mismatch, as before.
    enabled: bool = True
    # Anthropic requires max_tokens: sent when an OpenAI client asks for none.
    default_max_tokens: int = Field(default=4096, ge=1, le=10_000_000)


class AuthConfig(_Strict):
    # When the key store is unreachable: "closed" refuses with 503 (default); "open" lets
    # requests through unauthenticated (availability over control; logged and marked in metadata).
    failure_mode: Literal["closed", "open"] = "closed"
    # Backstop for cached key lookups; revocations normally arrive by invalidation within ~1s.
    cache_ttl_seconds: float = Field(default=5.0, gt=0, le=300)
    static_keys: tuple[StaticKeyConfig, ...] = ()


def _seconds(v: Any) -> Any:
    """A duration as seconds: a number, or a string like "5s" or "500ms"."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s)\s*", v)
        if m is None:
            raise ValueError(f"bad duration {v!r}: use seconds (5, 2.5) or a string like '5s' or '500ms'")
        return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return v


class TargetConfig(_Strict):
    """One place a model can be served from (README, "Fallback and weighted targets")."""

    provider: str
    # The model name sent to this provider.
    upstream: str
    # Share of traffic among targets of the same priority.
    weight: int = Field(default=1, ge=1, le=1000)
    # 1 is tried first; a higher number only when every target of the lower numbers failed.
    priority: int = Field(default=1, ge=1, le=10)
    # An attempt without response headers within this time fails over to the next target.
    first_byte_timeout: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("first_byte_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return _seconds(v)

    @field_validator("upstream")
    @classmethod
    def _upstream_shape(cls, v: str) -> str:
        if not _MODEL_NAME.match(v):
            raise ValueError(f"bad upstream model {v!r}: no spaces, control characters or '*'")
        return v


class ModelConfig(_Strict):
    # Public name clients send in "model". "prefix/*" routes every "prefix/<x>" to upstream "<x>".
    name: str
    # One provider, or `targets` (an ordered, weighted list of providers tried in turn by Envoy).
    provider: str | None = None
    # Name sent to the provider; defaults to `name`. Not allowed on wildcards.
    upstream: str | None = None
    aliases: tuple[str, ...] = ()
    targets: tuple[TargetConfig, ...] | None = None
    # Response cache for this model: overrides the tenant's and the default per field.
    cache: CacheSpec | None = None

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

    @property
    def providers(self) -> tuple[str, ...]:
        """Every provider this model may be served by (its targets' in order, or its one)."""
        if self.targets:
            return tuple(dict.fromkeys(t.provider for t in self.targets))
        return (self.provider,) if self.provider else ()

    @model_validator(mode="after")
    def _wildcard_rules(self) -> ModelConfig:
        if self.is_wildcard and (self.upstream is not None or self.aliases):
            raise ValueError(f"{self.name}: a wildcard takes neither 'upstream' nor 'aliases'")
        if self.targets is not None:
            if self.provider is not None or self.upstream is not None:
                raise ValueError(f"{self.name}: give either 'provider' (and 'upstream') or 'targets', not both")
            if self.is_wildcard:
                raise ValueError(f"{self.name}: a wildcard cannot have targets")
            if not self.targets:
                raise ValueError(f"{self.name}: 'targets' needs at least one target")
            seen = set()
            for t in self.targets:
                if (t.provider, t.upstream) in seen:
                    raise ValueError(f"{self.name}: target {t.provider}/{t.upstream} is listed twice")
                seen.add((t.provider, t.upstream))
        elif self.provider is None:
            raise ValueError(f"{self.name}: 'provider' (or 'targets') is required")
        return self


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    providers: dict[str, ProviderConfig]
    models: tuple[ModelConfig, ...] = ()
    store: StoreConfig = StoreConfig()
    auth: AuthConfig = AuthConfig()
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    ledger: LedgerConfig = LedgerConfig()
    usage: UsageConfig = UsageConfig()
    # Per upstream model; overrides the price table shipped in extproc/accounting/prices.yaml.
    pricing: dict[str, PriceConfig] = Field(default_factory=dict)
    limits: LimitsConfig = LimitsConfig()
    alerts: AlertsConfig = AlertsConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()
    # PII and secret redaction defaults (README, "PII redaction"); absent: nothing is scanned.
    pii: PiiSpec | None = None
    translation: TranslationConfig = TranslationConfig()
    # Response cache defaults (README, "Response cache"); mode off unless set.
    cache: CacheSpec = CacheSpec()
    # Directory relative paths in this config are resolved against (the config file's).
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self._base_dir / p

    @property
    def state_dir(self) -> Path:
        """Where this process keeps local files (embedded state, SQLite ledger, usage spool)."""
        return self.resolve(self.store.path).parent

    @property
    def ledger_path(self) -> Path:
        return self.resolve(self.ledger.path) if self.ledger.path else self.state_dir / "ledger.db"

    @property
    def spool_path(self) -> Path:
        return self.resolve(self.usage.spool_path) if self.usage.spool_path else self.state_dir / "usage-spool"

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, v: dict[str, ProviderConfig]) -> dict[str, ProviderConfig]:
        if not v:
            raise ValueError("at least one provider is required")
        for name in v:
            if not _PROVIDER_NAME.match(name):
                raise ValueError(f"bad provider name {name!r}: lowercase letters, digits, '-' and '_' only")
        return v

    def _check_cache_embeddings(self) -> None:
        specs = [("cache", self.cache)]
        specs += [(f"tenants.{n}.cache", t.cache) for n, t in self.tenants.items() if t.cache is not None]
        specs += [(f"models.{m.name}.cache", m.cache) for m in self.models if m.cache is not None]
        by_name = {n: m for m in self.models for n in (m.name, *m.aliases)}
        for where, spec in specs:
            if spec.embedding in (None, "local"):
                continue
            model = by_name.get(spec.embedding)
            if model is None or model.provider is None or self.providers[model.provider].schema_ != "openai":
                raise ValueError(
                    f"{where}.embedding: {spec.embedding!r} is not 'local' nor a model in `models` served by an "
                    "OpenAI-schema provider"
                )
            if spec.embedding_key_env is None and self.cache.embedding_key_env is None:
                raise ValueError(f"{where}.embedding_key_env: needed to call {spec.embedding!r} through Envoy")

    def _check_pii(self) -> None:
        top = _pii_names(self.pii)
        _check_pii_entities("pii", self.pii, top)
        for name, tenant in self.tenants.items():
            own = _pii_names(tenant.pii)
            _check_pii_entities(f"tenants.{name}.pii", tenant.pii, own if tenant.pii and tenant.pii.custom else top)
            if tenant.pii is not None and tenant.pii.hash_key_env is not None:
                raise ValueError(f"tenants.{name}.pii.hash_key_env: set the hash secret once, at the top level")

    @model_validator(mode="after")
    def _cross_checks(self) -> GatewayConfig:
        seen: dict[str, str] = {}
        for m in self.models:
            for provider in m.providers:
                if provider not in self.providers:
                    known = ", ".join(sorted(self.providers))
                    raise ValueError(f"model {m.name!r}: unknown provider {provider!r} (known: {known})")
            for public in (m.name, *m.aliases):
                if public in seen:
                    raise ValueError(f"model name {public!r} is defined twice ({seen[public]} and {m.name})")
                seen[public] = m.name
        self._check_pii()
        self._check_cache_embeddings()
        if self.store.backend == "embedded" and self.server.workers not in ("auto", 1):
            raise ValueError(
                f"server.workers: {self.server.workers} workers need store.backend redis (the embedded store's "
                "limits, caches and key changes belong to one process)"
            )
        if not self.ledger.consumer and self.store.backend == "embedded":
            raise ValueError(
                "ledger.consumer: false needs store.backend redis (the embedded backend writes each record "
                "straight into its ledger: there is no consumer to run elsewhere)"
            )
        ids: set[str] = set()
        hashes: set[str] = set()
        for k in self.auth.static_keys:
            if k.tenant not in self.tenants:
                raise ValueError(f"static key {k.id!r}: tenant {k.tenant!r} is not defined under 'tenants'")
            if k.id in ids or k.sha256 in hashes:
                raise ValueError(f"static key {k.id!r}: duplicate id or sha256")
            ids.add(k.id)
            hashes.add(k.sha256)
        return self


def _pii_names(spec: PiiSpec | None) -> set[str]:
    return {c.name for c in (spec.custom or ())} if spec is not None else set()


def _check_pii_entities(where: str, spec: PiiSpec | None, custom: set[str]) -> None:
    from .pii.detect import ENTITY_TYPES

    for name in spec.entities if spec is not None else ():
        if name not in ENTITY_TYPES and name not in custom:
            known = ", ".join((*ENTITY_TYPES, *sorted(custom)))
            raise ValueError(f"{where}.entities: unknown entity type {name!r} (known: {known})")


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "gateway.yaml", base_dir: Path | None = None) -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None
    if base_dir is not None:
        config._base_dir = base_dir
    return config


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
    return parse_config(data, str(path), path.resolve().parent)
