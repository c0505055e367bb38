"""Typed errors of the authentication library.

::

    AuthError                      (base; ``retriable`` says whether trying again can help)
    ├── WeakPassword               a new password breaks the policy (``reason``)
    ├── Taken                      a username or email is already reserved (``field``)
    ├── BadCredentials             login or password wrong, or no such active account
    ├── InvalidToken               an access token is refused (``reason``)
    ├── InvalidRefreshToken        a refresh token is unknown, expired or its session ended
    │   └── RefreshTokenReused     a spent refresh token came back: its session is now revoked
    ├── InvalidApiKey              an API key is malformed, unknown, wrong or revoked
    └── InvalidScope               an API key was asked for a scope that does not exist

Every ``reason`` is a short stable word for logs and metrics. What a client is told is the
HTTP layer's decision: it must not repeat reasons that enumerate accounts (``BadCredentials``
deliberately has none).
"""

from __future__ import annotations


class AuthError(Exception):
    """Base of every authentication error."""

    retriable: bool = False


class WeakPassword(AuthError):
    """A new password is refused by the policy; ``reason`` says which rule it broke."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"password refused: {reason}")
        self.reason = reason


class Taken(AuthError):
    """``field`` (``"username"`` or ``"email"``) is already held by another account."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is taken")
        self.field = field


class BadCredentials(AuthError):
    """The login/password pair does not match an active account. Says no more, on purpose."""

    def __init__(self) -> None:
        super().__init__("bad credentials")


class InvalidToken(AuthError):
    """An access token is refused; ``reason`` names the check that failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid access token: {reason}")
        self.reason = reason


class InvalidRefreshToken(AuthError):
    """A refresh token is unknown, expired, or belongs to a session that has ended."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid refresh token: {reason}")
        self.reason = reason


class RefreshTokenReused(InvalidRefreshToken):
    """A spent refresh token was presented again; its whole session has been revoked."""

    def __init__(self) -> None:
        super().__init__("reused")


class InvalidApiKey(AuthError):
    """An API key is refused; ``reason`` names the check that failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid API key: {reason}")
        self.reason = reason


class InvalidScope(AuthError):
    """An API key was requested with a scope outside :data:`ingest.auth.apikeys.SCOPES`."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"unknown API key scope {scope!r}")
        self.scope = scope
