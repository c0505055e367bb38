"""Access tokens: short-lived JWTs signed with HS256, keys rotated by ``kid``.

**Why HS256.** Only this deployment's own tiers (ingest, fanout) issue and verify access
tokens, so a shared secret costs nothing in trust and verifies several times faster than
EdDSA on the hot path. The algorithm is pinned: a token whose header names anything else
(``none``, ``HS512``, ``RS256`` -- the algorithm-confusion family) is refused before any
key is touched.

**Keys** come from ``BACKBONE_JWT_KEYS`` = ``kid:base64secret[,kid:base64secret...]``, parsed
like ``BACKBONE_MASTER_KEY``: the first key signs, every listed key verifies. To rotate, put
a new key first, keep the old one listed for one access-token lifetime, then drop it. Each
secret must be at least 32 bytes (RFC 7518 section 3.2). A local stack gets generated keys
from :func:`local_jwt_keys`; nothing in this module carries a built-in secret.

**Claims**: ``iss``, ``aud`` (a single string), ``sub`` (user id), ``sid`` (session id),
``iat``, ``exp``, ``typ`` = ``"access"``; header ``kid``. Time checks use the injected clock
with a small leeway for skew between hosts. Whether the session behind a valid token is
still active is :class:`ingest.auth.sessions.SessionStore`'s question, not this module's.
"""

from __future__ import annotations

import base64
import binascii
import collections
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import jwt
import msgspec
import structlog

from eventstore import ConfigError
from ingest.auth.errors import InvalidToken
from ingest.auth.metrics import AUTH_FAILURES

ALGORITHM: Final = "HS256"
TOKEN_TYPE: Final = "access"  # noqa: S105 - the `typ` claim, not a secret
KEYS_VARIABLE: Final = "BACKBONE_JWT_KEYS"
LOCAL_KEYS_FILE: Final = "jwt.keys"
MIN_SECRET_BYTES: Final = 32
MAX_TOKEN_LENGTH: Final = 4096
"""Longer input is refused unparsed: no real access token comes near it."""
DEFAULT_TTL: Final = 15 * 60
DEFAULT_LEEWAY: Final = 10
_REQUIRED: Final = ("iss", "aud", "sub", "sid", "iat", "exp", "typ")
_KID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

log = structlog.get_logger(__name__)


class SigningKey(msgspec.Struct, frozen=True):
    """One HMAC secret and the ``kid`` that names it in token headers."""

    kid: str
    secret: bytes

    def __repr__(self) -> str:  # never let a secret reach a log line or a traceback
        return f"SigningKey(kid={self.kid!r})"


class TokenKeys:
    """The configured keys: the first signs, all verify."""

    def __init__(self, keys: Iterable[SigningKey]) -> None:
        listed = tuple(keys)
        if not listed:
            raise ConfigError(f"{KEYS_VARIABLE} is empty")
        if len({k.kid for k in listed}) != len(listed):
            raise ConfigError(f"{KEYS_VARIABLE}: key ids must be unique")
        for key in listed:
            if not _KID.match(key.kid):
                raise ConfigError(f"{KEYS_VARIABLE}: key id {key.kid!r} is not [A-Za-z0-9._-]")
            if len(key.secret) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"{KEYS_VARIABLE}: key {key.kid!r} is {len(key.secret)} bytes; HS256 needs "
                    f"at least {MIN_SECRET_BYTES}"
                )
        self.signing = listed[0]
        self._by_kid = {k.kid: k for k in listed}

    def find(self, kid: str) -> SigningKey | None:
        return self._by_kid.get(kid)

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._by_kid)


def parse_jwt_keys(raw: str, variable: str = KEYS_VARIABLE) -> TokenKeys:
    """Parse ``kid:base64secret[,kid:base64secret...]``; a bare secret gets the kid ``k1``."""
    keys: list[SigningKey] = []
    for index, item in enumerate(part.strip() for part in raw.split(",") if part.strip()):
        kid, sep, encoded = item.partition(":")
        if not sep:
            kid, encoded = f"k{index + 1}", item
        try:
            secret = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{variable}: key {kid!r} is not valid base64") from None
        keys.append(SigningKey(kid=kid, secret=secret))
    return TokenKeys(keys)


def load_jwt_keys(env: Mapping[str, str] | None = None) -> TokenKeys:
    """The keys from ``BACKBONE_JWT_KEYS`` (default: the process environment)."""
    env = os.environ if env is None else env
    raw = env.get(KEYS_VARIABLE, "").strip()
    if not raw:
        raise ConfigError(f"{KEYS_VARIABLE} is not set")
    return parse_jwt_keys(raw)


def new_jwt_key(kid: str) -> str:
    """A fresh random ``kid:base64secret`` entry for ``BACKBONE_JWT_KEYS``."""
    return f"{kid}:{base64.b64encode(os.urandom(MIN_SECRET_BYTES)).decode()}"


def local_jwt_keys(data_dir: Path) -> str:
    """A local stack's ``BACKBONE_JWT_KEYS`` value, generated into ``data_dir`` on first use.

    Every process of the stack reads the same file, so tokens issued by one ingest worker
    verify in the others and in fanout. Production sets the variable from a secret store.
    """
    path = data_dir / LOCAL_KEYS_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        # Created 0600 from the start: a signing key must never be readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(new_jwt_key("local1") + "\n")
    return path.read_text().strip()


VERIFIED_MEMO: Final = 65536
"""How many verified tokens a process remembers (each costs a few hundred bytes)."""


class AccessClaims(msgspec.Struct, frozen=True):
    """What a verified access token says."""

    user_id: uuid.UUID
    session_id: uuid.UUID
    issued_at: int
    expires_at: int
    kid: str


class AccessTokens:
    """Issues and verifies access tokens for one issuer and audience.

    ``clock`` returns Unix seconds; tests pass their own to move time without sleeping.
    """

    def __init__(
        self,
        keys: TokenKeys,
        *,
        issuer: str,
        audience: str,
        ttl: int = DEFAULT_TTL,
        leeway: int = DEFAULT_LEEWAY,
        clock: Callable[[], float] = time.time,
        memo: bool = True,
    ) -> None:
        if ttl <= 0 or leeway < 0:
            raise ValueError("ttl must be positive and leeway not negative")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        self.leeway = leeway
        self._clock = clock
        self._memo = memo
        self._verified: collections.OrderedDict[str, AccessClaims] = collections.OrderedDict()
        self._decoder = jwt.PyJWT(
            options={
                "require": list(_REQUIRED),
                "strict_aud": True,
                # Times are checked below against the injected clock, with our leeway.
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "enforce_minimum_key_length": True,
            }
        )

    def issue(self, user_id: uuid.UUID, session_id: uuid.UUID) -> str:
        """A signed access token for ``user_id`` in ``session_id``, valid for ``ttl`` seconds."""
        now = int(self._clock())
        key = self.keys.signing
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": str(user_id),
            "sid": str(session_id),
            "iat": now,
            "exp": now + self.ttl,
            "typ": TOKEN_TYPE,
        }
        return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers={"kid": key.kid})

    def verify(self, token: str) -> AccessClaims:
        """The claims of ``token``, or :class:`InvalidToken` naming the first failed check.

        A token that verified before is not checked again, only its times: the signature and
        claims of an identical string cannot have changed, and a client sends the same token
        on every request until it expires. The memo is bounded (LRU) and per process.
        """
        known = self._verified.get(token)
        if known is not None:
            self._verified.move_to_end(token)
            now = self._clock()
            if now < known.expires_at + self.leeway and known.issued_at <= now + self.leeway:
                return known
            del self._verified[token]
        try:
            claims = self._verify(token)
        except InvalidToken as exc:
            AUTH_FAILURES.labels("access_token", exc.reason).inc()
            log.info("auth.access_token_refused", reason=exc.reason)
            raise
        if not self._memo:
            return claims
        self._verified[token] = claims
        if len(self._verified) > VERIFIED_MEMO:
            self._verified.popitem(last=False)
        return claims

    def _verify(self, token: str) -> AccessClaims:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed") from None
        if header.get("alg") != ALGORITHM:
            raise InvalidToken("algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("kid_missing")
        key = self.keys.find(kid)
        if key is None:
            raise InvalidToken("kid_unknown")
        try:
            claims: dict[str, Any] = self._decoder.decode(
                token,
                key.secret,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("signature") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("issuer") from None
        except jwt.DecodeError:
            raise InvalidToken("malformed") from None
        except jwt.PyJWTError:
            raise InvalidToken("claims") from None
        if claims["typ"] != TOKEN_TYPE:
            raise InvalidToken("type")
        issued_at, expires_at = claims["iat"], claims["exp"]
        if not all(type(t) is int for t in (issued_at, expires_at)):
            raise InvalidToken("claims")
        now = self._clock()
        if now >= expires_at + self.leeway:
            raise InvalidToken("expired")
        if issued_at > now + self.leeway:
            raise InvalidToken("not_yet_valid")
        try:
            user_id, session_id = uuid.UUID(claims["sub"]), uuid.UUID(claims["sid"])
        except (TypeError, ValueError, AttributeError):
            raise InvalidToken("claims") from None
        return AccessClaims(
            user_id=user_id,
            session_id=session_id,
            issued_at=issued_at,
            expires_at=expires_at,
            kid=kid,
        )
