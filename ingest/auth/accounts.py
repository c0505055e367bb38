"""The credential store: accounts, case-insensitive uniqueness, password login.

Registration reserves the username and email *before* ``UserRegistered`` is written, so two
racing registrations cannot both succeed: :meth:`Accounts.reserve` inserts a ``pending``
row (the unique constraints decide), :meth:`Accounts.activate` flips it once the log
acknowledged the event, and :meth:`Accounts.release` drops it if the write failed. A pending
row older than ``pending_timeout`` belongs to a registration that died between the two
(a crashed process); a new registration of the same name or email reclaims it. The timeout
must stay far above the log's send bound, or a slow but successful registration could lose
its reservation after its event was written.

Uniqueness is on case-folded forms (NFKC, then ``str.casefold``): ``Alice`` and ``ALICE``
are one name. A login containing ``@`` is an email, otherwise a username; usernames cannot
contain ``@`` (the request schema says so), so one login never matches two accounts.

Registration may reveal that a name is taken (API.md answers 409): that is accepted, since a
name must be unique and the user has to learn it. Login reveals nothing: an unknown login
costs one bcrypt verification, like a wrong password, and both raise the same
:class:`BadCredentials`.
"""

from __future__ import annotations

import time
import unicodedata
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Literal

import asyncpg
import msgspec
import structlog

from eventstore import Pool
from ingest.auth.errors import BadCredentials, Taken
from ingest.auth.metrics import AUTH_FAILURES, LOGINS
from ingest.auth.passwords import PasswordHasher

Role = Literal["user", "admin", "operator"]
AccountState = Literal["pending", "active", "erased"]

DEFAULT_PENDING_TIMEOUT: Final = 5 * 60
_COLUMNS: Final = "user_id, role, state, created_at"

log = structlog.get_logger(__name__)


class Account(msgspec.Struct, frozen=True):
    """An account as other code may see it (never with its password hash)."""

    user_id: uuid.UUID
    role: Role
    state: AccountState
    created_at: datetime


def fold(value: str) -> str:
    """The form usernames and emails are compared in."""
    return unicodedata.normalize("NFKC", value).casefold()


def _account(row: asyncpg.Record) -> Account:
    return Account(row["user_id"], row["role"], row["state"], row["created_at"])


class Accounts:
    """Accounts in ``ingest.accounts``. The pool is owned by the caller."""

    def __init__(
        self,
        pool: Pool,
        hasher: PasswordHasher,
        *,
        pending_timeout: float = DEFAULT_PENDING_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self.hasher = hasher
        self.pending_timeout = pending_timeout
        self._clock = clock

    async def reserve(self, username: str, email: str, password_hash: str) -> uuid.UUID:
        """Hold ``username`` and ``email`` for a new account; its id, or :class:`Taken`."""
        user_id = uuid.uuid4()
        now = self._clock()
        username_lc, email_lc = fold(username), fold(email)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM ingest.accounts WHERE state = 'pending' AND created_at < $3 "
                "AND (username_lc = $1 OR email_lc = $2)",
                username_lc,
                email_lc,
                datetime.fromtimestamp(now - self.pending_timeout, UTC),
            )
            try:
                await conn.execute(
                    "INSERT INTO ingest.accounts "
                    "(user_id, username_lc, email_lc, password_hash, state, created_at) "
                    "VALUES ($1, $2, $3, $4, 'pending', $5)",
                    user_id,
                    username_lc,
                    email_lc,
                    password_hash,
                    datetime.fromtimestamp(now, UTC),
                )
            except asyncpg.UniqueViolationError as exc:
                field = "email" if exc.constraint_name == "accounts_email_taken" else "username"
                log.info("auth.registration_taken", field=field)
                raise Taken(field) from None
        return user_id

    async def activate(self, user_id: uuid.UUID) -> bool:
        """Make a reserved account live (its ``UserRegistered`` is in the log).

        False if the reservation is gone: it was released, or reclaimed after
        ``pending_timeout``.
        """
        status = await self._pool.execute(
            "UPDATE ingest.accounts SET state = 'active' WHERE user_id = $1 AND state = 'pending'",
            user_id,
        )
        return status == "UPDATE 1"

    async def release(self, user_id: uuid.UUID) -> bool:
        """Drop a reservation whose ``UserRegistered`` could not be written."""
        status = await self._pool.execute(
            "DELETE FROM ingest.accounts WHERE user_id = $1 AND state = 'pending'", user_id
        )
        return status == "DELETE 1"

    async def get(self, user_id: uuid.UUID) -> Account | None:
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM ingest.accounts WHERE user_id = $1",  # noqa: S608 - constant
            user_id,
        )
        return None if row is None else _account(row)

    async def find_for_login(self, login: str) -> Account | None:
        """The active account whose username or email (case-insensitive) is ``login``."""
        found = await self._credentials(login)
        return None if found is None else found[0]

    async def authenticate(self, login: str, password: str) -> Account:
        """The active account ``login`` names if ``password`` is its password.

        Always spends exactly one bcrypt verification (against a dummy hash when there is no
        such account), and raises :class:`BadCredentials` for either failure alike.
        """
        found = await self._credentials(login)
        if found is None:
            await self.hasher.verify_dummy(password)
            AUTH_FAILURES.labels("login", "unknown_account").inc()
            log.info("auth.login_failed", reason="unknown_account")
            raise BadCredentials
        account, password_hash = found
        if not await self.hasher.verify(password, password_hash):
            AUTH_FAILURES.labels("login", "wrong_password").inc()
            log.info("auth.login_failed", reason="wrong_password", user_id=str(account.user_id))
            raise BadCredentials
        LOGINS.inc()
        log.info("auth.login", user_id=str(account.user_id))
        return account

    async def verify_password(self, user_id: uuid.UUID, password: str) -> bool:
        """Whether ``password`` is the current password of the active account ``user_id``.

        For re-authentication (a password change); costs one bcrypt verification either way.
        """
        password_hash = await self._pool.fetchval(
            "SELECT password_hash FROM ingest.accounts WHERE user_id = $1 AND state = 'active'",
            user_id,
        )
        if password_hash is None:
            await self.hasher.verify_dummy(password)
            return False
        matches = await self.hasher.verify(password, password_hash)
        if not matches:
            AUTH_FAILURES.labels("reauthentication", "wrong_password").inc()
            log.info("auth.reauthentication_failed", user_id=str(user_id))
        return matches

    async def set_password(self, user_id: uuid.UUID, password_hash: str) -> bool:
        """Replace an active account's password hash (the caller revokes its sessions)."""
        status = await self._pool.execute(
            "UPDATE ingest.accounts SET password_hash = $2 WHERE user_id = $1 AND state = 'active'",
            user_id,
            password_hash,
        )
        changed = status == "UPDATE 1"
        if changed:
            log.info("auth.password_changed", user_id=str(user_id))
        return changed

    async def mark_erased(self, user_id: uuid.UUID) -> bool:
        """Erase an account's credentials: name and email are released, login is impossible."""
        status = await self._pool.execute(
            "UPDATE ingest.accounts SET state = 'erased', username_lc = NULL, email_lc = NULL, "
            "password_hash = NULL WHERE user_id = $1 AND state <> 'erased'",
            user_id,
        )
        erased = status == "UPDATE 1"
        if erased:
            log.info("auth.account_erased", user_id=str(user_id))
        return erased

    async def _credentials(self, login: str) -> tuple[Account, str] | None:
        column = "email_lc" if "@" in login else "username_lc"
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS}, password_hash FROM ingest.accounts "  # noqa: S608 - constants
            f"WHERE {column} = $1 AND state = 'active'",
            fold(login),
        )
        return None if row is None else (_account(row), row["password_hash"])
