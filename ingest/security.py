"""Who is calling and whether they may: credentials, scopes and rate limits on every request.

:func:`auth_middleware` resolves the caller of every non-public route from ``Authorization:
Bearer <access JWT>`` (verified, and its session checked live: a revoked session stops working
at once) or ``X-API-Key`` (a scoped service key). Handlers then call :func:`guard` with their
endpoint class and scope: it checks the scope and counts the request against the per-user and
per-address limits of that class in Redis (429 with ``Retry-After`` when over).
"""

from __future__ import annotations

import msgspec
from aiohttp import web
from redis.asyncio import Redis

from eventstore import Pool, Settings
from ingest.auth.accounts import Accounts
from ingest.auth.apikeys import ApiKeys
from ingest.auth.errors import InvalidApiKey, InvalidToken
from ingest.auth.passwords import PasswordHasher
from ingest.auth.sessions import SessionStore
from ingest.auth.tokens import AccessTokens, TokenKeys
from ingest.config import IngestConfig
from ingest.context import CONFIG, PRINCIPAL, Principal, principal
from ingest.http import Handler
from ingest.problems import ProblemError
from ingest.ratelimit import LoginGuard, RateLimiter, client_ip


class AuthService(msgspec.Struct, frozen=True, kw_only=True):
    """Every auth building block of one process, sharing its pool and Redis."""

    hasher: PasswordHasher
    accounts: Accounts
    tokens: AccessTokens
    sessions: SessionStore
    api_keys: ApiKeys
    limiter: RateLimiter
    logins: LoginGuard

    @classmethod
    def build(
        cls, pool: Pool, redis: Redis, settings: Settings, config: IngestConfig, keys: TokenKeys
    ) -> AuthService:
        namespace = settings.topic_prefix
        hasher = PasswordHasher(cost=config.bcrypt_cost)
        tokens = AccessTokens(
            keys, issuer=config.jwt_issuer, audience=config.jwt_audience, ttl=config.access_ttl
        )
        return cls(
            hasher=hasher,
            accounts=Accounts(pool, hasher),
            tokens=tokens,
            sessions=SessionStore(pool, redis, tokens, namespace=namespace),
            api_keys=ApiKeys(pool),
            limiter=RateLimiter(redis, namespace=namespace, limits=config.rate_limits),
            logins=LoginGuard(redis, namespace=namespace, policy=config.login_policy),
        )


AUTH = web.AppKey("auth", AuthService)
PUBLIC = web.AppKey("public", frozenset)
"""``(method, canonical path)`` of the routes that need no credentials."""


def caller_ip(request: web.Request) -> str:
    return client_ip(
        request.remote,
        request.headers.getall("X-Forwarded-For", []),
        request.app[CONFIG].trusted_proxies,
    )


def _unauthorized(detail: str, slug: str = "unauthorized") -> ProblemError:
    return ProblemError(slug, detail, headers={"WWW-Authenticate": 'Bearer realm="backbone"'})


async def resolve(request: web.Request) -> Principal | None:
    """The caller named by the request's credentials, None when it carries none."""
    auth = request.app[AUTH]
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("use Authorization: Bearer <access token>", "invalid-token")
        try:
            claims = await auth.sessions.authenticate(token.strip())
        except InvalidToken:
            detail = "the access token is invalid, expired or revoked"
            raise _unauthorized(detail, "invalid-token") from None
        return Principal(user_id=claims.user_id, session_id=claims.session_id)
    presented = request.headers.get("X-API-Key")
    if presented is not None:
        try:
            key = await auth.api_keys.verify(presented.strip())
        except InvalidApiKey:
            raise _unauthorized("the API key is invalid or revoked", "invalid-token") from None
        return Principal(user_id=key.owner_id, scopes=key.scopes, api_key_id=key.key_id)
    return None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    public = (request.method, canonical) in request.app[PUBLIC]
    if resource is None:  # no such route: 404/405 without asking for credentials
        return await handler(request)
    found = await resolve(request)
    if found is None and not public:
        raise _unauthorized("send Authorization: Bearer <access token> or X-API-Key")
    if found is not None:
        request[PRINCIPAL] = found
    return await handler(request)


async def limit(
    request: web.Request, endpoint_class: str, caller: Principal | None, cost: int = 1
) -> None:
    """Count the request against its class's limits; 429 with Retry-After when over."""
    decision = await request.app[AUTH].limiter.check(
        endpoint_class,
        user_id=caller.user_id if caller is not None else None,
        ip=caller_ip(request),
        cost=cost,
    )
    if not decision.allowed:
        raise ProblemError(
            "rate-limited",
            f"over the {endpoint_class} limit per {decision.limited_by}",
            headers={"Retry-After": decision.retry_after_header},
        )


async def guard(request: web.Request, endpoint_class: str, *, scope: str) -> Principal:
    """The authenticated caller, with ``scope``, within the limits of ``endpoint_class``."""
    caller = principal(request)
    caller.require_scope(scope)
    await limit(request, endpoint_class, caller)
    return caller
