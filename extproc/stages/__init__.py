"""The stages, in pipeline order. Later issues insert theirs (limits, redaction, ...) here."""

from __future__ import annotations

from ..auth.credentials import ProviderAuth
from ..auth.service import KeyService
from ..pipeline import Stage
from ..routing import Router
from .auth import AuthStage, ModelAccessStage, ProviderCredentialsStage
from .endpoints import EndpointStage
from .headers import StripInternalHeaders
from .models import ModelsStage
from .route import RoutingStage


def default_stages(
    router: Router, keys: KeyService, provider_auth: dict[str, ProviderAuth], fail_open: bool = False
) -> list[Stage]:
    return [
        StripInternalHeaders(),
        AuthStage(keys, fail_open),
        ModelsStage(router),
        EndpointStage(),
        RoutingStage(router),
        ModelAccessStage(),
        ProviderCredentialsStage(provider_auth),
    ]


__all__ = [
    "AuthStage",
    "EndpointStage",
    "ModelAccessStage",
    "ModelsStage",
    "ProviderCredentialsStage",
    "RoutingStage",
    "StripInternalHeaders",
    "default_stages",
]
