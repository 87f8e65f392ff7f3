"""The stages, in pipeline order. Later issues insert theirs (limits, redaction, ...) here."""

from __future__ import annotations

from ..auth.credentials import ProviderAuth
from ..auth.service import KeyService
from ..config import GatewayConfig
from ..pipeline import Stage
from ..routing import Router
from ..translate import translators
from .accounting import AccountingStage
from .admission import AdmissionStage
from .attempt import AttemptStage
from .auth import AuthStage, ModelAccessStage, ProviderCredentialsStage
from .cache import CacheReplyStage, CacheStage
from .capture import ContentCaptureStage
from .endpoints import EndpointStage
from .headers import StripInternalHeaders
from .hygiene import RequestHygieneStage
from .limits import LimitsStage
from .models import ModelsStage
from .observability import ObservabilityStage
from .pii import PiiStage
from .route import RoutingStage
from .targets import TargetsStage
from .translate import TranslationStage
from .upstream_headers import UpstreamHeadersStage


def default_stages(
    config: GatewayConfig,
    keys: KeyService,
    provider_auth: dict[str, ProviderAuth],
    accounting: AccountingStage | None = None,
    limits: LimitsStage | None = None,
    pii: PiiStage | None = None,
    observability: ObservabilityStage | None = None,
    capture: ContentCaptureStage | None = None,
    cache: CacheStage | None = None,
) -> list[Stage]:
    router = Router(config)
    server = config.server
    # First: its finish runs last and sees what every other stage concluded.
    stages: list[Stage] = [observability] if observability is not None else []
    stages += [
        # Shed load before doing any work for a request.
        AdmissionStage(server.max_concurrent_streams, server.max_body_bytes_in_flight),
        StripInternalHeaders(),
        RequestHygieneStage(server.max_request_headers, server.max_request_headers_kb),
        AuthStage(keys, fail_open=config.auth.failure_mode == "open"),
        ModelsStage(router),
        EndpointStage(),
        RoutingStage(router, translate=config.translation.enabled),
        ModelAccessStage(),
    ]
    if pii is not None:
        # Once the tenant and model are known; before anything estimates tokens from the text (the
        # provider is billed for the redacted text). Its response hooks run last: the client's view.
        stages.append(pii)
    if capture is not None:
        # Right after redaction: it sees the request as the provider will, the answer before restore.
        stages.append(capture)
    if cache is not None:
        # After redaction (keys and entries hold only redacted text) and before translation,
        # limits and accounting: a hit is answered in the client's schema and costs no limit.
        stages.append(cache)
    if config.translation.enabled:
        # After redaction and capture (they read the client's schema), before credentials, limits
        # and accounting (they read the provider's). Its response hooks turn the provider's answer
        # into the client's schema after accounting has read it.
        stages.append(TranslationStage(translators(config.translation.default_max_tokens)))
    stages.append(ProviderCredentialsStage(provider_auth))
    if limits is not None:
        # After routing and the model check (it needs the tenant, key and model), and before
        # accounting: its finish then runs after accounting's and settles on the usage record.
        stages.append(limits)
    if cache is not None:
        # Hits that count against limits are answered here, once the limits stage admitted them.
        stages.append(CacheReplyStage(cache))
    if accounting is not None:
        # After routing (it records the upstream model) and late in the request, so its response
        # hooks see the provider's response first (the onion order).
        stages.append(accounting)
    if any(m.targets for m in config.models):
        # After accounting: its response hook runs before accounting's and names the target that
        # answered a model with targets.
        stages.append(TargetsStage())
    # Last: it must see every header the stages above set, so it never removes one of them.
    stages.append(UpstreamHeadersStage(config))
    return stages


def attempt_stage(config: GatewayConfig, provider_auth: dict[str, ProviderAuth]) -> AttemptStage | None:
    """What runs per attempt of a model with targets (None when no model has targets)."""
    if not any(m.targets for m in config.models):
        return None
    return AttemptStage(
        Router(config),
        translators(config.translation.default_max_tokens),
        ProviderCredentialsStage(provider_auth),
        UpstreamHeadersStage(config),
    )


__all__ = [
    "AccountingStage",
    "AdmissionStage",
    "AttemptStage",
    "AuthStage",
    "CacheStage",
    "ContentCaptureStage",
    "EndpointStage",
    "LimitsStage",
    "ModelAccessStage",
    "ModelsStage",
    "ObservabilityStage",
    "PiiStage",
    "ProviderCredentialsStage",
    "RequestHygieneStage",
    "RoutingStage",
    "StripInternalHeaders",
    "TargetsStage",
    "TranslationStage",
    "UpstreamHeadersStage",
    "attempt_stage",
    "default_stages",
]
