"""Who is calling and whether they may: credentials, scopes and rate limits on every request.

:func:`auth_middleware` resolves the caller of every non-public route from ``Authorization:
Bearer <access JWT>`` (verified, and its session checked live: a revoked session stops working
at once) or ``X-API-Key`` (a scoped service key); public routes (register, login, refresh, the
service endpoints) ignore both headers, so an expired token never blocks a refresh. Handlers
then call :func:`guard` with their endpoint class and scope: it checks the scope and counts the
request against the per-user and per-address limits of that class in Redis (429 with
``Retry-After`` when over).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import msgspec
from aiohttp import web
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from eventstore import Pool, Settings
from eventstore.codec import uuid_text
from ingest.auth.accounts import Accounts
from ingest.auth.apikeys import ApiKeys
from ingest.auth.errors import InvalidApiKey, InvalidToken
from ingest.auth.feed import RevocationFeed
from ingest.auth.passwords import PasswordHasher
from ingest.auth.sessions import SessionStore
from ingest.auth.tokens import AccessTokens, TokenKeys
from ingest.autopipe import AutoPipeline
from ingest.config import IngestConfig
from ingest.context import CONFIG, PRINCIPAL, SETTINGS_KEY, Principal, principal
from ingest.http import Handler
from ingest.problems import ProblemError
from ingest.ratelimit import GCRA_LUA, Decision, LoginGuard, Network, RateLimiter, client_ip
from projectors.read import members_key


class AuthService(msgspec.Struct, frozen=True, kw_only=True):
    """Every auth building block of one process, sharing its pool and Redis.

    :meth:`start` subscribes to the revocation feed (which lets ``api_keys`` cache verified
    keys); :meth:`close` ends it. Built but never started (a CLI), it works without the cache.
    """

    hasher: PasswordHasher
    accounts: Accounts
    tokens: AccessTokens
    sessions: SessionStore
    api_keys: ApiKeys
    limiter: RateLimiter
    logins: LoginGuard
    admission: AsyncScript
    autopipe: AutoPipeline
    feed: RevocationFeed
    redis: Redis
    namespace: str
    """The deployment's Redis key prefix (the topic prefix)."""

    @classmethod
    def build(
        cls,
        pool: Pool,
        redis: Redis,
        settings: Settings,
        config: IngestConfig,
        keys: TokenKeys,
        *,
        pipelined: Redis | None = None,
    ) -> AuthService:
        """The service over ``redis``; the hot path's commands go through ``pipelined`` when
        given (an :func:`~ingest.autopipe.untimed_sibling` of it, which the caller closes)."""
        namespace = settings.topic_prefix
        hasher = PasswordHasher(cost=config.bcrypt_cost)
        tokens = AccessTokens(
            keys, issuer=config.jwt_issuer, audience=config.jwt_audience, ttl=config.access_ttl
        )
        sessions = SessionStore(
            pool,
            redis,
            tokens,
            namespace=namespace,
            reuse_interval=config.refresh_reuse_interval,
        )
        api_keys = ApiKeys(
            pool, redis=redis, namespace=namespace, cache_ttl=config.api_key_cache_ttl
        )
        return cls(
            hasher=hasher,
            accounts=Accounts(pool, hasher),
            tokens=tokens,
            sessions=sessions,
            api_keys=api_keys,
            limiter=RateLimiter(redis, namespace=namespace, limits=config.rate_limits),
            logins=LoginGuard(redis, namespace=namespace, policy=config.login_policy),
            admission=redis.register_script(_ADMIT),
            autopipe=AutoPipeline(pipelined or redis),
            feed=RevocationFeed(redis, sessions.revocations_channel, api_keys),
            redis=redis,
            namespace=namespace,
        )

    async def start(self) -> None:
        """Listen to the revocation feed (a process serving requests does, before it serves)."""
        if self.api_keys.cache_ttl > 0:
            await self.feed.start()

    async def close(self) -> None:
        await self.feed.stop()
        await self.autopipe.close()


AUTH = web.AppKey("auth", AuthService)
PUBLIC = web.AppKey("public", frozenset)
"""``(method, canonical path)`` of the routes that need no credentials."""


_CALLER_IPS: dict[tuple[tuple[Network, ...], str | None, tuple[str, ...]], str] = {}
_CALLER_IPS_MAX = 8192


def caller_ip(request: web.Request) -> str:
    """The client's address (:func:`~ingest.ratelimit.client_ip`), remembered per peer and
    ``X-Forwarded-For``: parsing addresses and walking networks was 5 % of a request."""
    trusted = request.app[CONFIG].trusted_proxies
    forwarded = tuple(request.headers.getall("X-Forwarded-For", ()))
    key = (trusted, request.remote, forwarded)
    found = _CALLER_IPS.get(key)
    if found is None:
        found = client_ip(request.remote, forwarded, trusted)
        if len(_CALLER_IPS) >= _CALLER_IPS_MAX:
            _CALLER_IPS.clear()
        _CALLER_IPS[key] = found
    return found


def _unauthorized(detail: str, slug: str = "unauthorized") -> ProblemError:
    return ProblemError(slug, detail, headers={"WWW-Authenticate": 'Bearer realm="backbone"'})


async def resolve(request: web.Request) -> Principal | None:
    """The caller named by the request's credentials, None when it carries none.

    An access token is verified here (signature, claims); whether its session is still live is
    checked by :func:`admit`, in the same Redis round trip as the rate limit.
    """
    auth = request.app[AUTH]
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("use Authorization: Bearer <access token>", "invalid-token")
        try:
            claims = auth.tokens.verify(token.strip())
        except InvalidToken:
            raise _unauthorized(_BAD_TOKEN, "invalid-token") from None
        return Principal(user_id=claims.user_id, session_id=claims.session_id)
    presented = request.headers.get("X-API-Key")
    if presented is not None:
        try:
            key = await auth.api_keys.verify(presented.strip())
        except InvalidApiKey:
            raise _unauthorized("the API key is invalid or revoked", "invalid-token") from None
        return Principal(user_id=key.owner_id, scopes=key.scopes, api_key_id=key.key_id)
    return None


_BAD_TOKEN = "the access token is invalid, expired or revoked"  # noqa: S105 - a message


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the caller of every non-public route; leave public routes' credentials alone.

    A public route (``public=True`` in its :class:`~ingest.openapi.Operation`: register, login,
    refresh, healthz, readyz, metrics, the OpenAPI document) never looks at ``Authorization``
    or ``X-API-Key``: they are not resolved at all, so a stale, garbage or revoked credential
    is ignored rather than answered with 401, and no principal is set. Not resolving (rather
    than resolving and swallowing a failure) is right for every one of them:

    * refresh is called exactly when the access token has run out, and clients keep attaching
      it: the refresh token in the body is the credential, checked by the session store;
    * login and register establish who the caller is from the body (and are limited per
      address, never per user), so a leftover bearer of another or the same account has
      nothing to add and must not block signing in again;
    * health, readiness, metrics and the document serve anyone, probes and gateways included,
      whatever headers they forward.

    None of their handlers reads the principal, so resolving would only cost a JWT check or an
    API-key lookup for nothing. A route that one day wants an optional caller must not be
    public: authenticated routes refuse missing or bad credentials exactly as before.
    """
    resource = request.match_info.route.resource
    if resource is None:  # no such route: 404/405 without asking for credentials
        return await handler(request)
    if (request.method, resource.canonical) in request.app[PUBLIC]:
        return await handler(request)
    found = await resolve(request)
    if found is None:
        raise _unauthorized("send Authorization: Bearer <access token> or X-API-Key")
    request[PRINCIPAL] = found
    return await handler(request)


def _limited(endpoint_class: str, decision: Decision) -> ProblemError:
    return ProblemError(
        "rate-limited",
        f"over the {endpoint_class} limit per {decision.limited_by}",
        headers={"Retry-After": decision.retry_after_header},
    )


async def limit(
    request: web.Request, endpoint_class: str, caller: Principal | None, cost: int = 1
) -> None:
    """Count an unauthenticated request against its class's limits (429 when over)."""
    decision = await request.app[AUTH].limiter.check(
        endpoint_class,
        user_id=caller.user_id if caller is not None else None,
        ip=caller_ip(request),
        cost=cost,
    )
    if not decision.allowed:
        raise _limited(endpoint_class, decision)


class Admission(msgspec.Struct, frozen=True):
    """What :func:`admit` learnt in its round trip, besides letting the caller in."""

    caller: Principal
    role: str | None = None
    """The caller's role in the conversation asked about, as cached (None: not cached/member)."""
    claims: list[bytes | None] = []
    """The values of the extra keys asked for, in order."""


async def admit(
    request: web.Request,
    endpoint_class: str,
    *,
    scope: str,
    cost: int = 1,
    conversation_id: uuid.UUID | None = None,
    read_keys: Sequence[str] = (),
) -> Admission:
    """Let the caller in: session live, scope held, within the class's limits.

    One Redis script checks the session, counts the request, and reads what the command needs
    next (the caller's cached role in ``conversation_id``, the ``read_keys``): the hot path of a
    send costs one round trip here and one append to the log.
    """
    caller = principal(request)
    caller.require_scope(scope)
    app = request.app
    auth = app[AUTH]
    counting = auth.limiter.prepare(
        endpoint_class, user_id=caller.user_id, ip=caller_ip(request), cost=cost
    )
    keys: list[str] = []
    if caller.session_id is not None:
        keys.append(auth.sessions.cache_key(caller.session_id))
    if counting is not None:
        keys.extend(counting.keys)
    if conversation_id is not None:
        keys.append(members_key(app[SETTINGS_KEY].topic_prefix, conversation_id))
    keys.extend(read_keys)
    args = [
        "1" if caller.session_id is not None else "0",
        str(len(counting.keys)) if counting is not None else "0",
        "1" if conversation_id is not None else "0",
        uuid_text(caller.user_id),
        *(counting.args if counting is not None else ()),
    ]
    reply = await auth.autopipe.script(auth.admission, keys, args)
    session, allowed, wait_ms, refusing, role, *claims = reply
    if caller.session_id is not None and not await auth.sessions.is_active_cached(
        caller.session_id, session
    ):
        raise _unauthorized(_BAD_TOKEN, "invalid-token")
    if counting is not None:
        decision = auth.limiter.decide(counting, (allowed, wait_ms, refusing))
        if not decision.allowed:
            raise _limited(endpoint_class, decision)
    if isinstance(role, bytes):
        role = role.decode()
    return Admission(caller=caller, role=role, claims=claims)


# One script, one round trip: the session's cached state, the rate limits (GCRA), the caller's
# cached role in a conversation, and any other keys the command reads.
# KEYS: [session]? limit keys..., [members hash]?, read keys...
# ARGV: has session (0/1), number of limit keys, has members hash (0/1), member field,
#       then the GCRA arguments (now, cost, interval and window per limit key).
# Returns {session or nil, allowed, wait ms, refusing index, role or nil, read values...}.
_ADMIT = (
    GCRA_LUA
    + """
local k = 1
local session = false
if ARGV[1] == '1' then
  session = redis.call('GET', KEYS[1])
  k = 2
end
local limits = {}
for i = 1, tonumber(ARGV[2]) do
  limits[i] = KEYS[k]
  k = k + 1
end
local gargs = {}
for i = 5, #ARGV do
  gargs[#gargs + 1] = ARGV[i]
end
local verdict = {1, 0, 0}
if #limits > 0 then
  verdict = gcra(limits, gargs)
end
local role = false
if ARGV[3] == '1' then
  role = redis.call('HGET', KEYS[k], ARGV[4])
  k = k + 1
end
local out = {session, verdict[1], verdict[2], verdict[3], role}
for i = k, #KEYS do
  out[#out + 1] = redis.call('GET', KEYS[i])
end
return out
"""
)


async def guard(request: web.Request, endpoint_class: str, *, scope: str) -> Principal:
    """The authenticated caller, with ``scope``, within the limits of ``endpoint_class``."""
    return (await admit(request, endpoint_class, scope=scope)).caller
