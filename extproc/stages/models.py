"""GET /v1/models and /v1/models/{id}, answered from config so clients can discover routable names
(only those the caller's key may use).

The list is rendered in the caller's schema.
"""

from __future__ import annotations

from urllib.parse import unquote

from ..errors import ErrorKind, GatewayError, method_not_allowed, quote
from ..pipeline import DirectReply, RequestContext, Stage
from ..providers import ADAPTERS
from ..routing import Router

_PREFIX = "/v1/models/"


class ModelsStage(Stage):
    name = "models"

    def __init__(self, router: Router) -> None:
        self._router = router
        self._lists = {schema: a.models_body(router.listed) for schema, a in ADAPTERS.items()}

    async def request_headers(self, ctx: RequestContext) -> None:
        path = ctx.path
        if path != "/v1/models" and not path.startswith(_PREFIX):
            return
        # The processor already picked the caller's schema (Anthropic's SDK sends anthropic-version).
        adapter = ctx.adapter
        assert adapter is not None
        if ctx.method != "GET":
            raise method_not_allowed(ctx.method, path)
        allowed = ctx.identity.models if ctx.identity is not None else None
        if path == "/v1/models":
            if allowed is None or allowed.patterns is None:
                ctx.reply = DirectReply(200, self._lists[adapter.schema])
            else:
                visible = tuple(r for r in self._router.listed if allowed.allows(r.public_model))
                ctx.reply = DirectReply(200, adapter.models_body(visible))
            return
        model = unquote(path[len(_PREFIX) :])
        route = self._router.resolve(model)
        if route is None or (allowed is not None and not allowed.allows(model)):
            raise GatewayError(
                ErrorKind.NOT_FOUND, f"The model {quote(model)} does not exist.", "model_not_found", "model"
            )
        ctx.reply = DirectReply(200, adapter.model_body(route))
