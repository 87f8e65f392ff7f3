"""One attempt of a model with targets, on the target Envoy picked for it.

Envoy makes the attempts (retry policy and priorities on the model's target cluster, outlier
detection to skip unhealthy targets); an ext_proc filter on that cluster's upstream side calls the
server again for each attempt, with the picked endpoint's metadata (`gateway.target`:
"<provider>/<upstream model>"). This stage rewrites the request for that target: the model name,
the schema (the request arrives in the client's schema, already checked, authorized and redacted
by the downstream pipeline), the path, the provider's credential and header allow-list. The answer
goes back through the downstream pipeline, which learns the target from the response headers
Envoy adds (stages/targets.py).
"""

from __future__ import annotations

from ..errors import ErrorKind, GatewayError, quote
from ..pipeline import RequestContext, Stage
from ..providers import ADAPTERS
from ..routing import Router
from ..translate import Translator
from .auth import ProviderCredentialsStage
from .upstream_headers import UpstreamHeadersStage


class AttemptStage(Stage):
    name = "attempt"

    def __init__(
        self,
        router: Router,
        translators: dict[tuple[str, str], Translator],
        credentials: ProviderCredentialsStage,
        headers: UpstreamHeadersStage,
    ) -> None:
        self.router = router
        self.translators = translators
        self.credentials = credentials
        self.headers = headers

    async def request_body(self, ctx: RequestContext) -> None:
        """`ctx.notes["target"]` holds the picked endpoint's target key (set by the processor)."""
        adapter = ctx.adapter
        key = ctx.notes.get("target", "")
        if adapter is None or ctx.endpoint is None:
            raise _misrouted("the attempt's path is not a known endpoint")
        body = ctx.json
        model = adapter.model_of(body)
        route = self.router.resolve(model)
        attempt = route.answered_by(key) if route is not None else None
        if route is None or attempt is None:
            raise _misrouted(f"no target {quote(key)} of model {quote(model)}")
        ctx.route = attempt
        ctx.streaming = adapter.is_streaming(body)
        body["model"] = attempt.upstream_model
        ctx.mark_body_changed()
        if attempt.schema != adapter.schema:
            translator = self.translators.get((adapter.schema, attempt.schema))
            path = translator.paths.get(ctx.path) if translator is not None else None
            if translator is None or path is None:
                raise GatewayError(
                    ErrorKind.INVALID_REQUEST,
                    f"{quote(ctx.path)} cannot be served by the target {quote(key)} of {quote(model)}.",
                    "unsupported_endpoint",
                    "model",
                )
            translated, _ = translator.request(body)
            ctx.replace_json(translated)
            ctx.set_headers[":path"] = path
        if ctx.streaming and ADAPTERS[attempt.schema].request_usage_in_stream(ctx.json):
            # The usage chunk the client did not ask for is hidden downstream (accounting).
            ctx.mark_body_changed()
        self.credentials.apply(ctx, attempt.provider)
        self.headers.apply(ctx, attempt.provider)


def _misrouted(why: str) -> GatewayError:
    """Envoy's target cluster and gateway.yaml disagree (`extproc check` reports how)."""
    return GatewayError(
        ErrorKind.INTERNAL, f"The gateway's Envoy and model configuration disagree: {why}.", "target_mismatch"
    )
