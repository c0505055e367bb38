"""Password policy and hashing: the 72-byte policy, normalisation, cost, the common list.

bcrypt at cost 12 takes about 0.25 s here, so the suite hashes once (module fixture) and
verifies a handful of times.
"""

from __future__ import annotations

import unicodedata

import pytest

from ingest.auth import PasswordHasher, PasswordPolicy, WeakPassword
from ingest.auth.passwords import common_passwords, prehash

# 80 code points, 81 bytes: everything after the 72nd byte is where truncation would bite.
LONG = "correct horse battery staple " * 2 + "naïve-tail-A-0123456789"
SAME_FIRST_72_BYTES = LONG[:-1] + "B"


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(cost=12)


@pytest.fixture(scope="module")
async def long_hash(hasher: PasswordHasher) -> str:
    return await hasher.hash(LONG)


def test_the_two_passwords_really_share_their_first_72_bytes() -> None:
    assert LONG.encode()[:72] == SAME_FIRST_72_BYTES.encode()[:72]
    assert LONG != SAME_FIRST_72_BYTES
    assert len(LONG.encode()) > 72


async def test_every_byte_counts_past_72(hasher: PasswordHasher, long_hash: str) -> None:
    """Two passwords sharing their first 72 bytes do not verify against each other."""
    assert await hasher.verify(LONG, long_hash) is True
    assert await hasher.verify(SAME_FIRST_72_BYTES, long_hash) is False


async def test_composed_and_decomposed_accents_are_one_password(
    hasher: PasswordHasher, long_hash: str
) -> None:
    decomposed = unicodedata.normalize("NFD", LONG)
    assert decomposed != LONG
    assert await hasher.verify(decomposed, long_hash) is True


async def test_hashes_are_bcrypt_at_the_configured_cost(long_hash: str) -> None:
    assert long_hash.startswith("$2b$12$")
    assert len(long_hash) == 60


def test_the_prehash_is_short_ascii_without_nul() -> None:
    """bcrypt never sees more than 44 bytes, and never a NUL, whatever the password holds."""
    for password in ("a\x00b" * 10, "x" * 1000, "пароль-пароль", LONG):
        digest = prehash(password)
        assert len(digest) == 44
        assert b"\x00" not in digest
        assert digest.isascii()
    assert prehash("a\x00b") != prehash("a\x00c")


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short1!", "too_short"),
        ("x" * 129, "too_long"),
        ("password123", "common"),
        ("PassWord123", "common"),
        ("QWERTYUIOP", "common"),
        ("alice-the-great", "personal"),
        ("ALICE@example.com", "personal"),
    ],
)
def test_weak_passwords_are_refused_with_a_reason(
    hasher: PasswordHasher, password: str, reason: str
) -> None:
    with pytest.raises(WeakPassword) as refused:
        hasher.check(password, personal=("alice-the-great", "alice@example.com"))
    assert refused.value.reason == reason


@pytest.mark.parametrize("password", ["日本語のパスワード", "x" * 128, "tr0ub4dor&3-horse"])
def test_acceptable_passwords_pass(hasher: PasswordHasher, password: str) -> None:
    hasher.check(password, personal=("alice",))


def test_length_is_counted_in_code_points_not_bytes(hasher: PasswordHasher) -> None:
    assert len("🔑🔑🔑🔑🔑🔑🔑".encode()) > 8
    with pytest.raises(WeakPassword):
        hasher.check("🔑🔑🔑🔑🔑🔑🔑")  # seven code points
    hasher.check("🔑🔑🔑🔑🔑🔑🔑🔑")


async def test_hash_checks_the_policy_before_spending_any_work(hasher: PasswordHasher) -> None:
    with pytest.raises(WeakPassword):
        await hasher.hash("password1")


def test_the_bundled_common_list_is_sizeable_and_folded() -> None:
    common = common_passwords()
    assert 500 <= len(common) <= 5000
    assert all(p == p.casefold() for p in common)
    assert {"123456", "password", "iloveyou", "qwerty123"} <= common


def test_a_policy_and_list_of_ones_own_can_be_given() -> None:
    strict = PasswordHasher(policy=PasswordPolicy(min_length=12), common=["Backbone-Rocks!"])
    with pytest.raises(WeakPassword, match="common"):
        strict.check("backbone-rocks!")
    with pytest.raises(WeakPassword, match="too_short"):
        strict.check("eleven-char")


def test_a_cost_below_12_is_refused() -> None:
    with pytest.raises(ValueError, match="cost 10"):
        PasswordHasher(cost=10)


async def test_a_malformed_stored_hash_never_matches(hasher: PasswordHasher) -> None:
    assert await hasher.verify(LONG, "not-a-bcrypt-hash") is False
