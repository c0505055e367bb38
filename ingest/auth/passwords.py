"""Password policy and hashing: bcrypt over a keyed pre-hash, off the event loop.

**The 72-byte policy.** bcrypt reads at most 72 bytes of its input (the Python binding
refuses longer ones) and many implementations stop at a NUL byte. Truncating would make two
passwords that share their first 72 bytes equal; refusing long passphrases would punish the
people doing the right thing. So bcrypt never sees the password itself: it gets
``base64(HMAC-SHA256(PREHASH_KEY, NFKC(password)))`` -- 44 ASCII bytes, never a NUL -- and
every code point of the password counts, up to the policy maximum.

HMAC with a fixed, public key rather than bare SHA-256: the key is domain separation, not a
secret pepper. It stops "hash shucking", where a leaked bcrypt(sha256(pw)) is attacked with
a list of unsalted SHA-256 hashes leaked from some other site instead of by guessing.

**Normalisation.** Passwords are NFKC-normalised before they are measured or hashed
(NIST SP 800-63B), so the same password typed on two keyboards that compose accents
differently still matches.

**Timing.** A login for an unknown account must cost what a wrong password costs, or the
response time tells who has an account. :meth:`PasswordHasher.verify_dummy` spends one
bcrypt verification against a dummy hash of the same cost (random salt; built without
hashing, so start-up stays cheap).

bcrypt releases the GIL, so hashing runs in the default thread pool and the event loop keeps
serving other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import unicodedata
from collections.abc import Iterable
from importlib import resources
from typing import Final

import bcrypt
import msgspec
import structlog

from ingest.auth.errors import WeakPassword

PREHASH_KEY: Final = b"backbone/password-prehash/v1"
DEFAULT_COST: Final = 12
MIN_COST: Final = 12
"""OWASP's floor for bcrypt today; a lower cost is refused rather than silently accepted."""
COMMON_PASSWORDS_FILE: Final = "common_passwords.txt"

log = structlog.get_logger(__name__)


class PasswordPolicy(msgspec.Struct, frozen=True):
    """Length bounds in code points after NFKC normalisation (ASVS 6.2.1, 6.2.9)."""

    min_length: int = 8
    max_length: int = 128


@functools.cache
def common_passwords() -> frozenset[str]:
    """The bundled list of common passwords, case-folded (read once per process)."""
    text = resources.files("ingest.auth").joinpath(COMMON_PASSWORDS_FILE).read_text("utf-8")
    return frozenset(
        line.strip().casefold()
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    )


def _normalise(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def prehash(password: str) -> bytes:
    """What bcrypt is given for ``password``: 44 ASCII bytes, no NUL (see the module doc)."""
    digest = hmac.new(PREHASH_KEY, _normalise(password).encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest)


def _dummy_hash(cost: int) -> bytes:
    # A well-formed bcrypt hash of the right cost whose checksum matches no password:
    # verifying against it costs exactly a real verification.
    return bcrypt.gensalt(cost) + b"." * 31


class PasswordHasher:
    """Checks new passwords against the policy, hashes them, verifies logins.

    ``cost`` is bcrypt's work factor (at least :data:`MIN_COST`); ``common`` replaces the
    bundled common-password list (case-insensitive).
    """

    def __init__(
        self,
        *,
        cost: int = DEFAULT_COST,
        policy: PasswordPolicy | None = None,
        common: Iterable[str] | None = None,
    ) -> None:
        if not MIN_COST <= cost <= 31:
            raise ValueError(f"bcrypt cost {cost} is outside {MIN_COST}..31")
        self.cost = cost
        self.policy = policy or PasswordPolicy()
        self._common = (
            common_passwords() if common is None else frozenset(p.casefold() for p in common)
        )
        self._dummy = _dummy_hash(cost)

    def check(self, password: str, *, personal: Iterable[str] = ()) -> None:
        """Raise :class:`WeakPassword` unless ``password`` may be set as a new password.

        ``personal`` are values the password must not equal (username, email): the first
        things a guesser tries.
        """
        normalised = _normalise(password)
        if len(normalised) < self.policy.min_length:
            raise WeakPassword("too_short")
        if len(normalised) > self.policy.max_length:
            raise WeakPassword("too_long")
        folded = normalised.casefold()
        if folded in self._common:
            raise WeakPassword("common")
        if any(folded == _normalise(value).casefold() for value in personal if value):
            raise WeakPassword("personal")

    async def hash(self, password: str, *, personal: Iterable[str] = ()) -> str:
        """Check ``password`` against the policy and return its bcrypt hash."""
        self.check(password, personal=personal)
        salt = bcrypt.gensalt(self.cost)
        hashed = await asyncio.to_thread(bcrypt.hashpw, prehash(password), salt)
        return hashed.decode("ascii")

    async def verify(self, password: str, password_hash: str) -> bool:
        """Whether ``password`` matches ``password_hash`` (constant time, off the loop)."""
        try:
            return await asyncio.to_thread(
                bcrypt.checkpw, prehash(password), password_hash.encode("ascii")
            )
        except ValueError:
            # Only our own hashes are stored; a malformed one is corruption, never a match.
            log.error("auth.password_hash_malformed")
            return False

    async def verify_dummy(self, password: str) -> None:
        """Spend one verification, as for a real account, when there is none to check."""
        await asyncio.to_thread(bcrypt.checkpw, prehash(password), self._dummy)
