"""Authentication with virtual keys, the per-key model allow-list, and provider credentials.

The client's credential headers are removed from every request at header time; the provider's
credential is set on the body reply, once the route (and so the provider) is known. The virtual
key itself is never logged or passed on: logs and Envoy's access log get the key id and tenant.
"""

from __future__ import annotations

import logging

from ..auth.credentials import ProviderAuth
from ..auth.keys import KEY_PREFIX, display_prefix, looks_like_key
from ..auth.service import AuthFailure, KeyService
from ..auth.store import StoreUnavailable
from ..errors import ErrorKind, GatewayError, quote
from ..pipeline import RequestContext, Stage

log = logging.getLogger("extproc.auth")

CREDENTIAL_HEADERS = ("authorization", "x-api-key")
_MESSAGES = {
    "invalid_api_key": "Incorrect API key provided: {prefix}.",
    "expired_api_key": "This API key ({prefix}) has expired.",
    "revoked_api_key": "This API key ({prefix}) has been revoked.",
}


def extract_key(headers: dict[str, str]) -> str:
    """The virtual key from `Authorization: Bearer` (OpenAI SDK) or `x-api-key` (Anthropic SDK)."""
    auth = headers.get("authorization")
    bearer = None
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise GatewayError(
                ErrorKind.UNAUTHENTICATED,
                "Malformed Authorization header: expected 'Bearer <key>'.",
                "invalid_authorization_header",
            )
        bearer = value.strip()
    api_key = headers.get("x-api-key")
    api_key = api_key.strip() if api_key is not None else None
    if bearer and api_key and bearer != api_key:
        raise GatewayError(
            ErrorKind.INVALID_REQUEST,
            "Both Authorization and x-api-key carry a key, and they differ; send one.",
            "conflicting_api_keys",
        )
    secret = bearer or api_key
    if not secret:
        raise GatewayError(
            ErrorKind.UNAUTHENTICATED,
            "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            "missing_api_key",
        )
    if not looks_like_key(secret):
        # Not one of ours (maybe a provider key pasted by mistake): echo none of it.
        raise GatewayError(
            ErrorKind.UNAUTHENTICATED, f"Invalid API key: gateway keys start with '{KEY_PREFIX}'.", "invalid_api_key"
        )
    return secret


class AuthStage(Stage):
    name = "auth"

    def __init__(self, keys: KeyService, fail_open: bool = False) -> None:
        self.keys = keys
        self.fail_open = fail_open

    async def request_headers(self, ctx: RequestContext) -> None:
        headers = ctx.headers
        ctx.remove_headers.extend(h for h in CREDENTIAL_HEADERS if h in headers)
        secret = extract_key(headers)
        try:
            identity = await self.keys.authenticate(secret)
        except AuthFailure as failure:
            prefix = failure.key.prefix if failure.key else display_prefix(secret)
            log.info("auth refused: %s key=%s request=%s", failure.code, prefix, ctx.request_id)
            raise GatewayError(
                ErrorKind.UNAUTHENTICATED, _MESSAGES[failure.code].format(prefix=prefix), failure.code
            ) from None
        except StoreUnavailable as err:
            if not self.fail_open:
                log.warning("auth store unavailable (%s): refusing request %s", err, ctx.request_id)
                raise GatewayError(
                    ErrorKind.UNAVAILABLE,
                    "The gateway cannot verify API keys right now; retry shortly.",
                    "auth_unavailable",
                    headers={"retry-after": "1"},
                ) from None
            log.warning(
                "auth store unavailable (%s): request %s passes unauthenticated (fail-open)", err, ctx.request_id
            )
            ctx.metadata["auth"] = "bypassed"
            return
        ctx.identity = identity
        ctx.metadata["tenant"] = identity.tenant
        ctx.metadata["key_id"] = identity.key_id


class ModelAccessStage(Stage):
    """403 when the key (or its tenant's default) does not allow the requested model."""

    name = "model-access"

    async def request_body(self, ctx: RequestContext) -> None:
        identity, route = ctx.identity, ctx.route
        if identity is None or route is None:
            return
        if not identity.models.allows(route.public_model):
            raise GatewayError(
                ErrorKind.FORBIDDEN,
                f"This API key may not use the model {quote(route.public_model)}.",
                "model_not_allowed",
                "model",
            )


class ProviderCredentialsStage(Stage):
    name = "provider-credentials"

    def __init__(self, provider_auth: dict[str, ProviderAuth]) -> None:
        self.provider_auth = provider_auth

    async def request_body(self, ctx: RequestContext) -> None:
        # A model with targets gets its credential per attempt, for the target Envoy picked.
        if ctx.route is None or ctx.route.targets:
            return
        self.apply(ctx, ctx.route.provider)

    def apply(self, ctx: RequestContext, provider: str) -> None:
        auth = self.provider_auth[provider]
        for key, value in auth.headers:
            ctx.set_headers[key] = value
