"""Pick the provider from the body's model and tell Envoy where to send the request.

Envoy picks a route from headers before the body arrives; this stage sets the routing headers on
the body reply with clear_route_cache so Envoy re-evaluates routes with them. When the public model
name differs from the provider's, the body's `model` is rewritten (the processor fixes
content-length).
"""

from __future__ import annotations

from ..errors import ErrorKind, GatewayError, quote
from ..pipeline import RequestContext, Stage
from ..routing import Router

PROVIDER_HEADER = "x-gateway-provider"
MODEL_HEADER = "x-gateway-model"
# A model with targets: Envoy's route for it (matched on this header, value the public model
# name) sends each attempt to one target of its cluster, where the attempt stage rewrites it.
TARGETS_HEADER = "x-gateway-targets"


class RoutingStage(Stage):
    name = "routing"

    def __init__(self, router: Router, translate: bool = False) -> None:
        self._router = router
        # With translation on, the translation stage takes a route of the other schema.
        self._translate = translate

    async def request_body(self, ctx: RequestContext) -> None:
        adapter = ctx.adapter
        if adapter is None or ctx.endpoint is None or not ctx.endpoint.routed:
            return
        body = ctx.json
        model = adapter.model_of(body)
        route = self._router.resolve(model)
        if route is None:
            raise GatewayError(
                ErrorKind.NOT_FOUND,
                f"The model {quote(model)} does not exist or is not served by this gateway.",
                "model_not_found",
                "model",
            )
        if route.schema != adapter.schema and not self._translate:
            raise GatewayError(
                ErrorKind.INVALID_REQUEST,
                f"The model {quote(model)} is served through the {route.schema} API; "
                f"call it with the {route.schema} SDK (translation between schemas is not enabled).",
                "schema_mismatch",
                "model",
            )
        ctx.route = route
        ctx.streaming = adapter.is_streaming(body)
        ctx.body_schema = adapter.schema
        ctx.clear_route_cache = True
        if route.targets:
            # Model name, path, schema and credentials are per attempt (stages/attempt.py).
            ctx.set_headers[TARGETS_HEADER] = route.public_model
            ctx.metadata["model"] = route.public_model
            ctx.metadata["stream"] = ctx.streaming
            return
        if route.rewrites_model:
            body["model"] = route.upstream_model
            ctx.mark_body_changed()
        ctx.set_headers[PROVIDER_HEADER] = route.provider
        ctx.set_headers[MODEL_HEADER] = route.upstream_model
        ctx.metadata["provider"] = route.provider
        ctx.metadata["model"] = route.public_model
        ctx.metadata["upstream_model"] = route.upstream_model
        ctx.metadata["stream"] = ctx.streaming
