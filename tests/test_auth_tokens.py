"""Access tokens: pinned HS256, rotation by kid, and every forgery refused (pure, no servers)."""

from __future__ import annotations

import base64
import hmac
import json
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from eventstore import ConfigError
from ingest.auth import (
    AccessTokens,
    InvalidToken,
    SigningKey,
    TokenKeys,
    load_jwt_keys,
    local_jwt_keys,
    new_jwt_key,
    parse_jwt_keys,
)
from tests.auth_fixtures import T0, Clock

ISSUER, AUDIENCE = "urn:backbone:test", "backbone-test"


CURRENT = SigningKey("k2", os.urandom(32))
PREVIOUS = SigningKey("k1", os.urandom(32))
USER, SESSION = uuid.uuid4(), uuid.uuid4()


def tokens(*keys: SigningKey, clock: Clock | None = None) -> AccessTokens:
    return AccessTokens(
        TokenKeys(keys or (CURRENT, PREVIOUS)),
        issuer=ISSUER,
        audience=AUDIENCE,
        clock=clock or Clock(),
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(USER),
        "sid": str(SESSION),
        "iat": int(T0),
        "exp": int(T0) + 900,
        "typ": "access",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def signed(payload: dict[str, Any], key: SigningKey = CURRENT, **header: Any) -> str:
    return jwt.encode(payload, key.secret, algorithm="HS256", headers={"kid": key.kid, **header})


def hand_made(
    header: dict[str, Any], payload: dict[str, Any], secret: bytes | None, digest: str = "sha256"
) -> str:
    """A token built without pyjwt, so its header can say anything."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b""
    if secret is not None:
        signature = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


def tampered_subject() -> str:
    head, _, signature = signed(claims()).split(".")
    payload = b64(json.dumps(claims(sub=str(uuid.uuid4()))).encode())
    return f"{head}.{payload}.{signature}"


def without(name: str) -> Callable[[], str]:
    return lambda: signed(claims(**{name: None}))


def no_kid() -> str:
    return jwt.encode(claims(), CURRENT.secret, algorithm="HS256")


FORGERIES: dict[str, tuple[Callable[[], str], str]] = {
    "alg none, unsigned": (
        lambda: hand_made({"alg": "none", "kid": CURRENT.kid}, claims(), None),
        "algorithm",
    ),
    "alg None spelled differently": (
        lambda: hand_made({"alg": "None", "kid": CURRENT.kid}, claims(), CURRENT.secret),
        "algorithm",
    ),
    "alg missing": (lambda: hand_made({"kid": CURRENT.kid}, claims(), CURRENT.secret), "algorithm"),
    "HS512 with the right secret": (
        lambda: hand_made({"alg": "HS512", "kid": CURRENT.kid}, claims(), CURRENT.secret, "sha512"),
        "algorithm",
    ),
    "RS256 header, HMAC signature (confusion)": (
        lambda: hand_made({"alg": "RS256", "kid": CURRENT.kid}, claims(), CURRENT.secret),
        "algorithm",
    ),
    "lower-case hs256": (
        lambda: hand_made({"alg": "hs256", "kid": CURRENT.kid}, claims(), CURRENT.secret),
        "algorithm",
    ),
    "missing kid": (no_kid, "kid_missing"),
    "kid not a string": (
        lambda: hand_made({"alg": "HS256", "kid": 2}, claims(), CURRENT.secret),
        "malformed",  # pyjwt refuses a non-string kid while parsing the header
    ),
    "unknown kid": (lambda: signed(claims(), SigningKey("k9", CURRENT.secret)), "kid_unknown"),
    "known kid, wrong secret": (
        lambda: signed(claims(), SigningKey(CURRENT.kid, os.urandom(32))),
        "signature",
    ),
    "kid of the other key": (
        lambda: signed(claims(), SigningKey(PREVIOUS.kid, CURRENT.secret)),
        "signature",
    ),
    "signature stripped": (lambda: signed(claims()).rsplit(".", 1)[0] + ".", "signature"),
    "payload changed after signing": (tampered_subject, "signature"),
    "wrong audience": (lambda: signed(claims(aud="someone-else")), "audience"),
    "audience list": (lambda: signed(claims(aud=[AUDIENCE, "other"])), "audience"),
    "wrong issuer": (lambda: signed(claims(iss="urn:evil")), "issuer"),
    "expired": (lambda: signed(claims(iat=int(T0) - 2000, exp=int(T0) - 1000)), "expired"),
    "issued in the future": (
        lambda: signed(claims(iat=int(T0) + 3600, exp=int(T0) + 4500)),
        "not_yet_valid",
    ),
    "refresh typ": (lambda: signed(claims(typ="refresh")), "type"),
    "id typ": (lambda: signed(claims(typ="id")), "type"),
    "exp as a string": (lambda: signed(claims(exp=str(int(T0) + 900))), "claims"),
    "sub not a user id": (lambda: signed(claims(sub="admin")), "claims"),
    "sid not a session id": (lambda: signed(claims(sid="x")), "claims"),
    **{
        f"missing {name}": (without(name), "claims")
        for name in ("iss", "aud", "sub", "sid", "iat", "exp", "typ")
    },
    "empty": (lambda: "", "malformed"),
    "garbage": (lambda: "not a token", "malformed"),
    "three dots of nothing": (lambda: "a.b.c", "malformed"),
    "a refresh token (opaque)": (
        lambda: "Jm0y8n4V0f0Yd9v3e2bXgk1Qz7Hq3cR4uW6yT8pL2sA",
        "malformed",
    ),
    "oversized": (lambda: signed(claims(pad="x" * 5000)), "malformed"),
}


def test_a_fresh_token_verifies_with_its_claims() -> None:
    issuer = tokens()
    verified = issuer.verify(issuer.issue(USER, SESSION))
    assert (verified.user_id, verified.session_id, verified.kid) == (USER, SESSION, CURRENT.kid)
    assert verified.expires_at - verified.issued_at == issuer.ttl == 15 * 60


def test_the_header_names_the_pinned_algorithm_and_the_signing_kid() -> None:
    header = jwt.get_unverified_header(tokens().issue(USER, SESSION))
    assert (header["alg"], header["kid"]) == ("HS256", CURRENT.kid)


def test_every_forgery_is_refused_with_its_reason() -> None:
    """Accepted 0 of N, and each case is refused for the reason it was built to test."""
    verifier = tokens()
    outcomes: dict[str, str] = {}
    for case, (make, _) in FORGERIES.items():
        try:
            verifier.verify(make())
            outcomes[case] = "ACCEPTED"
        except InvalidToken as exc:
            outcomes[case] = exc.reason
    assert {case: expected for case, (_, expected) in FORGERIES.items()} == outcomes
    assert len(outcomes) >= 30


def test_expiry_follows_the_clock_with_leeway() -> None:
    clock = Clock()
    issuer = tokens(clock=clock)
    token = issuer.issue(USER, SESSION)
    clock.now = T0 + issuer.ttl + issuer.leeway - 1
    issuer.verify(token)
    clock.now = T0 + issuer.ttl + issuer.leeway
    with pytest.raises(InvalidToken) as refused:
        issuer.verify(token)
    assert refused.value.reason == "expired"


def test_rotation_old_tokens_verify_until_their_key_is_dropped() -> None:
    before = tokens(PREVIOUS)
    old_token = before.issue(USER, SESSION)
    rotated = tokens(CURRENT, PREVIOUS)
    assert rotated.verify(old_token).kid == PREVIOUS.kid
    assert jwt.get_unverified_header(rotated.issue(USER, SESSION))["kid"] == CURRENT.kid
    with pytest.raises(InvalidToken) as refused:
        tokens(CURRENT).verify(old_token)
    assert refused.value.reason == "kid_unknown"


def test_keys_parse_like_the_master_key_first_signs() -> None:
    raw = f"{new_jwt_key('new')}, {new_jwt_key('old')}"
    keys = parse_jwt_keys(raw)
    assert (keys.signing.kid, keys.kids) == ("new", ("new", "old"))
    assert load_jwt_keys({"BACKBONE_JWT_KEYS": raw}).kids == ("new", "old")


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ("", "empty"),
        ("k1:not-base64!", "not valid base64"),
        (f"k1:{base64.b64encode(b'short').decode()}", "at least 32"),
        (f"{new_jwt_key('a')},{new_jwt_key('a')}", "unique"),
        (new_jwt_key("bad kid"), "is not"),
    ],
)
def test_bad_key_configuration_names_the_variable(raw: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match="BACKBONE_JWT_KEYS") as refused:
        parse_jwt_keys(raw)
    assert complaint in str(refused.value)


def test_missing_keys_stop_start_up() -> None:
    with pytest.raises(ConfigError, match="BACKBONE_JWT_KEYS is not set"):
        load_jwt_keys({})


def test_local_keys_are_generated_once_and_private(tmp_path: Path) -> None:
    first = local_jwt_keys(tmp_path)
    assert local_jwt_keys(tmp_path) == first
    assert parse_jwt_keys(first).signing.kid == "local1"
    assert stat.S_IMODE((tmp_path / "jwt.keys").stat().st_mode) == 0o600


def test_a_signing_key_never_shows_its_secret() -> None:
    assert CURRENT.secret.hex() not in repr(CURRENT) + str(TokenKeys([CURRENT]).signing)
