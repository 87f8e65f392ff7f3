"""The foundation's stages, in pipeline order. Later issues insert theirs (auth, limits, ...) here."""

from __future__ import annotations

from ..pipeline import Stage
from ..routing import Router
from .endpoints import EndpointStage
from .headers import StripInternalHeaders
from .models import ModelsStage
from .route import RoutingStage


def default_stages(router: Router) -> list[Stage]:
    return [StripInternalHeaders(), ModelsStage(router), EndpointStage(), RoutingStage(router)]


__all__ = ["EndpointStage", "ModelsStage", "RoutingStage", "StripInternalHeaders", "default_stages"]
