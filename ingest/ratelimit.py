"""Rate limits, login throttling and the client address, shared by every ingest process.

**Request limits: GCRA.** Each limit is a burst and a sustained rate. The generic cell rate
algorithm keeps one number per key, the theoretical arrival time (TAT) of the next request;
a request is allowed when its TAT is within ``burst`` emission intervals of now, and then
moves the TAT one interval on. A refusal says exactly when the next request would pass
(``retry_after``). All the keys a request is counted against (per user and per IP for its
endpoint class) are checked and advanced in one Lua script, atomically: either every limit
takes the request or none does, and any number of processes sharing Redis see one limit.
Time is Redis's own clock (``TIME``), so hosts with skewed clocks still agree; tests pass
``now`` instead.

**Login throttling** (:class:`LoginGuard`), two counters with different jobs:

- *Per IP*: failed logins from one address are counted in a window (``ip_window``); at
  ``ip_max_failures`` the address is blocked from logging in for ``ip_block`` seconds. This
  stops one source from guessing across many accounts. A success does not reset it, or an
  attacker could interleave logins to an account of their own.
- *Per (account, IP)*: failed logins for one account from one address are counted in
  ``account_window``; at ``account_max_failures`` that address may not try that account
  again until the window ends. The account itself is never locked: its owner, logging in
  from any other address, is unaffected, so failures cannot be used to lock a real user
  out. A success from that address clears the pair's counter.

Accounts appear in Redis keys only as a digest of the case-folded login, never in clear.
Guessing one account from many addresses is bounded by the per-IP blocks times the number
of addresses; stronger defences (proof of work, CAPTCHA) are beyond this module.

**IPv6** clients are counted per /64, the block a single host or subscriber is given.

**Client address** (:func:`client_ip`): ``X-Forwarded-For`` is believed only as far as it was
written by proxies we trust. The chain is walked from the right (the entry added by the proxy
that connected to us) leftwards, skipping trusted proxies; the first untrusted address is the
client. A direct peer that is not a trusted proxy is the client, whatever the header says.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec
import structlog
from prometheus_client import Counter
from redis.asyncio import Redis

from eventstore.codec import uuid_text
from ingest.auth.accounts import fold


def _subject(user_id: uuid.UUID | str | None) -> str | None:
    if user_id is None or isinstance(user_id, str):
        return user_id
    return uuid_text(user_id)  # a few times cheaper than str(), once per request


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

log = structlog.get_logger(__name__)

RATE_LIMITED = Counter(
    "backbone_rate_limited_total",
    "Requests refused by a rate limit, by endpoint class and by what limited them.",
    ["endpoint_class", "scope"],
)
LOGIN_BLOCKS = Counter(
    "backbone_login_blocks_total",
    "Login blocks started: an IP blocked (ip) or an (account, IP) pair throttled (account_ip).",
    ["kind"],
)
LOGIN_REFUSED = Counter(
    "backbone_login_throttled_total",
    "Login attempts refused before checking the password, by reason.",
    ["reason"],
)

# KEYS: the limits' keys. ARGV[1]: now in ms ("" = Redis TIME); ARGV[2]: cost; then per key
# its emission interval and its window (interval * burst), in ms.
# Returns {allowed (1/0), retry_after ms, index of the refusing key}.
GCRA_LUA = """
local function gcra(keys, args)
  local now
  if args[1] == '' then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  else
    now = tonumber(args[1])
  end
  local cost = tonumber(args[2])
  local wait, refusing = 0, 0
  local tats = {}
  for i, key in ipairs(keys) do
    local interval = tonumber(args[1 + 2 * i])
    local window = tonumber(args[2 + 2 * i])
    local tat = tonumber(redis.call('GET', key) or now)
    if tat < now then tat = now end
    tats[i] = tat + interval * cost
    local allow_at = tats[i] - window
    if allow_at > now and allow_at - now > wait then
      wait, refusing = allow_at - now, i
    end
  end
  if refusing > 0 then
    return {0, math.ceil(wait), refusing}
  end
  for i, key in ipairs(keys) do
    local ttl = math.max(1, math.ceil(tats[i] - now))
    redis.call('SET', key, string.format('%.3f', tats[i]), 'PX', ttl)
  end
  return {1, 0, 0}
end
"""
"""The GCRA as a Lua function, for scripts that count requests as part of more work."""

_GCRA = GCRA_LUA + "return gcra(KEYS, ARGV)\n"

# Shared by the two login scripts: now in ms from ARGV[1] or Redis TIME.
_NOW = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
"""

# KEYS: ip block, (account, ip) failures. ARGV: now, account_max_failures.
# Returns {0 allowed | 1 ip blocked | 2 account throttled, retry_after ms}.
_LOGIN_CHECK = (
    _NOW
    + """
local blocked_until = tonumber(redis.call('GET', KEYS[1]) or '0')
if blocked_until > now then
  return {1, blocked_until - now}
end
local n = tonumber(redis.call('HGET', KEYS[2], 'n') or '0')
local reset = tonumber(redis.call('HGET', KEYS[2], 'reset') or '0')
if n >= tonumber(ARGV[2]) and reset > now then
  return {2, reset - now}
end
return {0, 0}
"""
)

# KEYS: ip failures, ip block, (account, ip) failures.
# ARGV: now, ip_max_failures, ip_window, ip_block, account_max_failures, account_window (ms).
# Returns {ip blocked until (0: not blocked), account throttled until (0: not), now}.
_LOGIN_FAILURE = (
    _NOW
    + """
local function bump(key, window)
  local reset = tonumber(redis.call('HGET', key, 'reset') or '0')
  local n
  if reset <= now then
    reset = now + window
    n = 1
    redis.call('HSET', key, 'n', 1, 'reset', string.format('%d', reset))
  else
    n = redis.call('HINCRBY', key, 'n', 1)
  end
  redis.call('PEXPIRE', key, math.max(1, reset - now))
  return n, reset
end
local blocked_until = 0
local ip_n = bump(KEYS[1], tonumber(ARGV[3]))
if ip_n >= tonumber(ARGV[2]) then
  blocked_until = now + tonumber(ARGV[4])
  redis.call('SET', KEYS[2], string.format('%d', blocked_until), 'PX', tonumber(ARGV[4]))
  redis.call('DEL', KEYS[1])
end
local account_n, account_reset = bump(KEYS[3], tonumber(ARGV[6]))
local throttled_until = 0
if account_n >= tonumber(ARGV[5]) then
  throttled_until = account_reset
end
return {blocked_until, throttled_until, now}
"""
)


class Limit(msgspec.Struct, frozen=True):
    """``burst`` requests at once, refilled at ``rate`` requests per second."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a limit needs a positive rate and a burst of at least 1")


class ClassLimits(msgspec.Struct, frozen=True):
    """The limits of one endpoint class, per authenticated user and per client address."""

    per_user: Limit | None = None
    per_ip: Limit | None = None


DEFAULT_LIMITS: Final[Mapping[str, ClassLimits]] = {
    # register, login, refresh: unauthenticated, so per address only.
    "auth": ClassLimits(per_ip=Limit(rate=10 / 60, burst=10)),
    # A batch counts each message, so the burst must hold the largest batch (500 messages).
    "message": ClassLimits(per_user=Limit(rate=50, burst=500), per_ip=Limit(rate=200, burst=1000)),
    "write": ClassLimits(per_user=Limit(rate=5, burst=20), per_ip=Limit(rate=50, burst=100)),
    "read": ClassLimits(per_user=Limit(rate=50, burst=100), per_ip=Limit(rate=200, burst=400)),
}
"""Per-address limits are looser than per-user ones: many users may share one NAT address."""


class Decision(msgspec.Struct, frozen=True):
    """Whether a request may proceed; if not, when to retry and which limit refused it."""

    allowed: bool
    retry_after: float = 0.0
    limited_by: str | None = None

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds, rounded up (at least 1)."""
        return str(max(1, math.ceil(self.retry_after)))


def _ms(now: float | None) -> str:
    return "" if now is None else repr(now * 1000)


@functools.lru_cache(maxsize=4096)  # as _parse_address: the same few peers send every request
def ip_key(ip: str) -> str:
    """What an address is counted as: itself for IPv4, its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@functools.lru_cache(maxsize=256)
def _gcra_args(limit: Limit) -> tuple[str, str]:
    """The script's arguments for ``limit``: the emission interval and the window (ms)."""
    interval = 1000 / limit.rate
    return repr(interval), repr(interval * limit.burst)


class RateLimiter:
    """GCRA limits per endpoint class, per user and per address. Redis is owned by the caller."""

    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str,
        limits: Mapping[str, ClassLimits] = DEFAULT_LIMITS,
    ) -> None:
        self.namespace = namespace
        self.limits = dict(limits)
        self._script = redis.register_script(_GCRA)

    def prepare(
        self,
        endpoint_class: str,
        *,
        user_id: uuid.UUID | str | None = None,
        ip: str | None = None,
        cost: int = 1,
        now: float | None = None,
    ) -> Counting | None:
        """The script call that counts one request, or None when no limit applies to it.

        A limit whose subject is unknown (no user on a public route) is not applied. ``now``
        (Unix seconds) replaces Redis's clock, for tests.
        """
        limits = self.limits[endpoint_class]
        keys: list[str] = []
        scopes: list[str] = []
        args: list[str] = [_ms(now), str(cost)]
        for scope, limit, subject in (
            ("user", limits.per_user, _subject(user_id)),
            ("ip", limits.per_ip, None if ip is None else ip_key(ip)),
        ):
            if limit is None or subject is None:
                continue
            keys.append(f"{self.namespace}:rl:{endpoint_class}:{scope}:{subject}")
            scopes.append(scope)
            args += _gcra_args(limit)
        if not keys:
            return None
        return Counting(endpoint_class, tuple(keys), tuple(args), tuple(scopes))

    def decide(self, counting: Counting, reply: Sequence[Any]) -> Decision:
        """The decision the script's ``reply`` to ``counting`` stands for."""
        allowed, wait_ms, refusing = reply
        if allowed:
            return Decision(allowed=True)
        scope = counting.scopes[int(refusing) - 1]
        RATE_LIMITED.labels(counting.endpoint_class, scope).inc()
        return Decision(allowed=False, retry_after=int(wait_ms) / 1000, limited_by=scope)

    async def check(
        self,
        endpoint_class: str,
        *,
        user_id: uuid.UUID | str | None = None,
        ip: str | None = None,
        cost: int = 1,
        now: float | None = None,
    ) -> Decision:
        """Count one request (``cost`` units) of ``endpoint_class`` from ``user_id`` at ``ip``."""
        counting = self.prepare(endpoint_class, user_id=user_id, ip=ip, cost=cost, now=now)
        if counting is None:
            return Decision(allowed=True)
        reply = await self._script(keys=list(counting.keys), args=list(counting.args))
        return self.decide(counting, reply)


class Counting(msgspec.Struct, frozen=True):
    """One request's limit keys and script arguments (see :meth:`RateLimiter.prepare`)."""

    endpoint_class: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    scopes: tuple[str, ...]


class LoginPolicy(msgspec.Struct, frozen=True):
    """Thresholds of :class:`LoginGuard` (windows and blocks in seconds)."""

    ip_max_failures: int = 20
    ip_window: float = 15 * 60
    ip_block: float = 15 * 60
    account_max_failures: int = 5
    account_window: float = 15 * 60


class LoginVerdict(msgspec.Struct, frozen=True):
    """Whether a login may be attempted; if not, why (``ip_blocked``, ``account_throttled``)."""

    allowed: bool
    retry_after: float = 0.0
    reason: str | None = None

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds, rounded up (at least 1)."""
        return str(max(1, math.ceil(self.retry_after)))


class LoginGuard:
    """Throttles password guessing per address and per (account, address); see the module doc.

    Call :meth:`check` before verifying a password, then :meth:`record_failure` or
    :meth:`record_success`. Redis is owned by the caller.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str,
        policy: LoginPolicy | None = None,
    ) -> None:
        self.namespace = namespace
        self.policy = policy or LoginPolicy()
        self._redis = redis
        self._check = redis.register_script(_LOGIN_CHECK)
        self._failure = redis.register_script(_LOGIN_FAILURE)

    def _keys(self, ip: str, login: str) -> tuple[str, str, str]:
        account = hashlib.sha256(fold(login).encode("utf-8")).hexdigest()[:32]
        address = ip_key(ip)
        base = f"{self.namespace}:login"
        return (
            f"{base}:ipfail:{address}",
            f"{base}:ipblock:{address}",
            f"{base}:acct:{account}:{address}",
        )

    async def check(self, ip: str, login: str, *, now: float | None = None) -> LoginVerdict:
        """May ``ip`` try a password for ``login`` now?"""
        _, block_key, account_key = self._keys(ip, login)
        code, wait_ms = await self._check(
            keys=[block_key, account_key],
            args=[_ms(now), self.policy.account_max_failures],
        )
        if int(code) == 0:
            return LoginVerdict(allowed=True)
        reason = "ip_blocked" if int(code) == 1 else "account_throttled"
        LOGIN_REFUSED.labels(reason).inc()
        log.info("auth.login_throttled", reason=reason, ip=ip)
        return LoginVerdict(allowed=False, retry_after=int(wait_ms) / 1000, reason=reason)

    async def record_failure(
        self, ip: str, login: str, *, now: float | None = None
    ) -> LoginVerdict:
        """Count a failed login; the verdict says whether the next attempt may follow."""
        policy = self.policy
        blocked_until, throttled_until, at = await self._failure(
            keys=list(self._keys(ip, login)),
            args=[
                _ms(now),
                policy.ip_max_failures,
                int(policy.ip_window * 1000),
                int(policy.ip_block * 1000),
                policy.account_max_failures,
                int(policy.account_window * 1000),
            ],
        )
        now_ms = float(at)
        if int(blocked_until):
            LOGIN_BLOCKS.labels("ip").inc()
            log.warning("auth.ip_blocked", ip=ip, seconds=policy.ip_block)
            return LoginVerdict(False, (int(blocked_until) - now_ms) / 1000, "ip_blocked")
        if int(throttled_until):
            LOGIN_BLOCKS.labels("account_ip").inc()
            log.warning("auth.account_throttled", ip=ip)
            return LoginVerdict(False, (int(throttled_until) - now_ms) / 1000, "account_throttled")
        return LoginVerdict(allowed=True)

    async def record_success(self, ip: str, login: str) -> None:
        """A correct password from ``ip``: forget that pair's failures (not the address's)."""
        await self._redis.delete(self._keys(ip, login)[2])


@functools.lru_cache(maxsize=4096)
def _parse_address(value: str) -> Address | None:
    # Cached: the same few peers and proxies send every request, and parsing costs µs.
    value = value.strip()
    if value.startswith("["):  # "[v6]" or "[v6]:port"
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:  # "v4:port"
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_ip(
    remote: str | None, forwarded_for: Iterable[str], trusted_proxies: Sequence[Network]
) -> str:
    """The client's address, believing ``X-Forwarded-For`` only as far as trusted proxies wrote it.

    ``remote`` is the TCP peer (aiohttp: ``request.remote``); ``forwarded_for`` every
    ``X-Forwarded-For`` header value in order (``request.headers.getall(name, [])``): a client
    may send its own header line ahead of the one a proxy appends. An entry that is not an
    address ends the walk at the last trusted hop before it.
    """
    peer = _parse_address(remote or "")
    if peer is None:
        return remote or "unknown"

    def trusted(address: Address) -> bool:
        return any(address in network for network in trusted_proxies)

    current = peer
    if not trusted(current):
        return str(current)
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = _parse_address(hop)
        if address is None:
            break
        current = address
        if not trusted(current):
            break
    return str(current)
