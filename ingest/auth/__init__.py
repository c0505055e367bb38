"""Authentication building blocks of the ingest tier, free of any web framework.

- :mod:`~ingest.auth.passwords` -- password policy and bcrypt hashing (the 72-byte policy)
- :mod:`~ingest.auth.tokens` -- access JWTs (HS256 pinned, keys rotated by ``kid``)
- :mod:`~ingest.auth.sessions` -- sessions, refresh-token rotation, revocation
- :mod:`~ingest.auth.accounts` -- credentials and username/email reservation
- :mod:`~ingest.auth.apikeys` -- scoped API keys for service clients (cached per process)
- :mod:`~ingest.auth.feed` -- the revocation feed a process listens to (what makes caching safe)
- :mod:`~ingest.auth.errors` -- the typed errors (hierarchy in its docstring)

Rate limits and login throttling live beside it in :mod:`ingest.ratelimit`.
"""

from ingest.auth.accounts import Account, Accounts, AccountState, Role, fold
from ingest.auth.apikeys import SCOPES, ApiKey, ApiKeys
from ingest.auth.errors import (
    AuthError,
    BadCredentials,
    InvalidApiKey,
    InvalidRefreshToken,
    InvalidScope,
    InvalidToken,
    RefreshTokenReused,
    Taken,
    WeakPassword,
)
from ingest.auth.feed import Notice, RevocationFeed
from ingest.auth.passwords import PasswordHasher, PasswordPolicy
from ingest.auth.sessions import (
    NO_SESSION,
    Revocation,
    RevocationReason,
    SessionStore,
    TokenPair,
)
from ingest.auth.tokens import (
    AccessClaims,
    AccessTokens,
    SigningKey,
    TokenKeys,
    load_jwt_keys,
    local_jwt_keys,
    new_jwt_key,
    parse_jwt_keys,
)

__all__ = [
    "NO_SESSION",
    "SCOPES",
    "AccessClaims",
    "AccessTokens",
    "Account",
    "AccountState",
    "Accounts",
    "ApiKey",
    "ApiKeys",
    "AuthError",
    "BadCredentials",
    "InvalidApiKey",
    "InvalidRefreshToken",
    "InvalidScope",
    "InvalidToken",
    "Notice",
    "PasswordHasher",
    "PasswordPolicy",
    "RefreshTokenReused",
    "Revocation",
    "RevocationFeed",
    "RevocationReason",
    "Role",
    "SessionStore",
    "SigningKey",
    "Taken",
    "TokenKeys",
    "TokenPair",
    "WeakPassword",
    "fold",
    "load_jwt_keys",
    "local_jwt_keys",
    "new_jwt_key",
    "parse_jwt_keys",
]
