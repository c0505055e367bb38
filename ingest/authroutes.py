"""Accounts and sessions over HTTP: register, login, refresh, logout, profile, password, keys.

Credentials and uniqueness reservations are written synchronously to ingest's own PostgreSQL
tables, so a login works the instant registration answers; the facts others need
(``UserRegistered``, ``SessionStarted``, ``SessionRevoked``, ``UserProfileUpdated``,
``PasswordChanged``) go to the log. Failures never enumerate accounts: a wrong password and an
unknown login answer the same 401 after the same bcrypt work.
"""

from __future__ import annotations

import time

import msgspec
import structlog
from aiohttp import web

from ingest.auth.errors import (
    BadCredentials,
    InvalidRefreshToken,
    RefreshTokenReused,
    Taken,
    WeakPassword,
)
from ingest.auth.sessions import TokenPair as IssuedPair
from ingest.context import EXPORTS, STORE, Principal, append
from ingest.erasure import erase_user
from ingest.http import REQUEST_ID, json_response, path_uuid, read_body
from ingest.openapi import Operation
from ingest.problems import ProblemError
from ingest.security import AUTH, caller_ip, guard, limit
from schemas import (
    PasswordChanged,
    SessionRevoked,
    SessionStarted,
    UserProfileUpdated,
    UserRegistered,
)
from schemas.api import (
    Accepted,
    ApiKeyBody,
    ApiKeyCreated,
    ExportStarted,
    ExportState,
    LoginBody,
    PasswordBody,
    ProfilePatch,
    RefreshBody,
    RegisterBody,
    TokenPair,
    UserCreated,
)

log = structlog.get_logger(__name__)


async def register(request: web.Request) -> web.Response:
    await limit(request, "auth", None)
    body = await read_body(request, RegisterBody)
    auth = request.app[AUTH]
    try:
        password_hash = await auth.hasher.hash(body.password, personal=(body.username, body.email))
    except WeakPassword as exc:
        raise ProblemError(
            "weak-password", exc.reason, errors=[f"password: {exc.reason}"]
        ) from None
    try:
        user_id = await auth.accounts.reserve(body.username, body.email, password_hash)
    except Taken as exc:
        raise ProblemError(
            "taken", f"{exc.field} is taken", errors=[f"{exc.field}: taken"]
        ) from None
    event = UserRegistered(
        user_id=user_id, username=body.username, email=body.email, display_name=body.display_name
    )
    try:
        await append(request, user_id, [event])
    except BaseException:
        await auth.accounts.release(user_id)
        raise
    if not await auth.accounts.activate(user_id):
        # The reservation outlived its timeout and was reclaimed: the log has a registration
        # whose credentials are gone. Refuse rather than leave an account nobody can use.
        raise ProblemError("conflict", "the registration took too long; register again")
    log.info("auth.registered", user_id=str(user_id))
    return json_response(UserCreated(user_id=user_id), 201)


async def login(request: web.Request) -> web.Response:
    await limit(request, "auth", None)
    body = await read_body(request, LoginBody)
    auth = request.app[AUTH]
    ip = caller_ip(request)
    verdict = await auth.logins.check(ip, body.login)
    if not verdict.allowed:
        slug = "ip-blocked" if verdict.reason == "ip_blocked" else "rate-limited"
        raise ProblemError(
            slug, "too many failed logins", headers={"Retry-After": verdict.retry_after_header}
        )
    try:
        account = await auth.accounts.authenticate(body.login, body.password)
    except BadCredentials:
        await auth.logins.record_failure(ip, body.login)
        raise ProblemError("invalid-credentials") from None
    await auth.logins.record_success(ip, body.login)
    pair = await auth.sessions.create(account.user_id)
    try:
        started = SessionStarted(
            user_id=account.user_id,
            session_id=pair.session_id,
            expires_at=int(time.time()) + auth.sessions.session_ttl,
            device=body.device,
        )
        await append(request, account.user_id, [started])
    except BaseException:
        await auth.sessions.revoke(pair.session_id, "admin")
        raise
    log.info("auth.login", user_id=str(account.user_id), session_id=str(pair.session_id), ip=ip)
    return json_response(_pair(pair))


def _pair(pair: IssuedPair) -> TokenPair:
    return TokenPair(
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        expires_in=pair.expires_in,
    )


async def refresh(request: web.Request) -> web.Response:
    await limit(request, "auth", None)
    body = await read_body(request, RefreshBody)
    auth = request.app[AUTH]
    try:
        pair = await auth.sessions.refresh(body.refresh_token)
    except RefreshTokenReused:
        raise ProblemError("refresh-reuse") from None
    except InvalidRefreshToken:
        raise ProblemError("invalid-token", "the refresh token is invalid or expired") from None
    return json_response(_pair(pair))


async def _end_session(request: web.Request, caller: Principal) -> None:
    if caller.session_id is None:
        raise ProblemError("forbidden", "an API key has no session to end")
    # The fact goes to the log first: if that fails nothing changed and the client retries.
    revoked = SessionRevoked(user_id=caller.user_id, session_id=caller.session_id, reason="logout")
    await append(request, caller.user_id, [revoked])
    await request.app[AUTH].sessions.revoke(caller.session_id, "logout")


async def logout(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="sessions")
    await _end_session(request, caller)
    return web.Response(status=204)


async def patch_me(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="sessions")
    body = await read_body(request, ProfilePatch)
    if body.display_name is None and body.status is None and body.settings is None:
        raise ProblemError("invalid-body", "nothing to change")
    event = UserProfileUpdated(
        user_id=caller.user_id,
        display_name=body.display_name,
        status=body.status,
        settings=body.settings,
    )
    (recorded,) = await append(request, caller.user_id, [event])
    return json_response(Accepted(position=recorded.position.token()), 202)


async def change_password(request: web.Request) -> web.Response:
    caller = await guard(request, "auth", scope="sessions")
    body = await read_body(request, PasswordBody)
    auth = request.app[AUTH]
    account = await auth.accounts.get(caller.user_id)
    if account is None or account.state != "active":
        raise ProblemError("invalid-token", "the account is not active")
    if not await auth.accounts.verify_password(caller.user_id, body.current_password):
        raise ProblemError("invalid-credentials", "the current password is wrong")
    try:
        new_hash = await auth.hasher.hash(body.new_password)
    except WeakPassword as exc:
        raise ProblemError("weak-password", exc.reason) from None
    (recorded,) = await append(request, caller.user_id, [PasswordChanged(user_id=caller.user_id)])
    await auth.accounts.set_password(caller.user_id, new_hash)
    await auth.sessions.revoke_user_sessions(caller.user_id, "password_change")
    return json_response(Accepted(position=recorded.position.token()), 202)


async def erase_me(request: web.Request) -> web.Response:
    caller = await guard(request, "auth", scope="sessions")
    recorded = await erase_user(
        request.app[STORE],
        request.app[AUTH],
        caller.user_id,
        actor=caller.user_id,
        correlation_id=request[REQUEST_ID],
    )
    return json_response(Accepted(position=recorded.position.token()), 202)


async def start_export(request: web.Request) -> web.Response:
    caller = await guard(request, "auth", scope="sessions")
    export_id = await request.app[EXPORTS].start(caller.user_id)
    return json_response(ExportStarted(export_id=export_id), 202)


async def get_export(request: web.Request) -> web.Response:
    caller = await guard(request, "read", scope="sessions")
    found = await request.app[EXPORTS].status(caller.user_id, path_uuid(request, "export_id"))
    if found is None:
        raise ProblemError("not-found", "no such export")
    return json_response(msgspec.convert(found, ExportState))


async def create_api_key(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="sessions")
    body = await read_body(request, ApiKeyBody)
    key_id, presented = await request.app[AUTH].api_keys.create(
        caller.user_id, body.scopes, body.name
    )
    return json_response(ApiKeyCreated(key_id=key_id, api_key=presented, scopes=body.scopes), 201)


async def revoke_api_key(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="sessions")
    key_id = request.match_info["key_id"]
    keys = request.app[AUTH].api_keys
    if not await keys.revoke_owned(key_id, caller.user_id):
        raise ProblemError("not-found", "no such API key")
    return web.Response(status=204)


OPERATIONS = (
    Operation(
        method="POST",
        path="/v1/auth/register",
        handler=register,
        summary="Create an account (login works as soon as this answers)",
        status=201,
        body=RegisterBody,
        answer=UserCreated,
        public=True,
        problems=(409,),
    ),
    Operation(
        method="POST",
        path="/v1/auth/login",
        handler=login,
        summary="Exchange a login and password for a token pair",
        body=LoginBody,
        answer=TokenPair,
        public=True,
        problems=(401,),
    ),
    Operation(
        method="POST",
        path="/v1/auth/refresh",
        handler=refresh,
        summary=(
            "Spend a refresh token for a new pair (a spent one revokes the session, unless it"
            " comes back within the reuse interval: then its successor is answered again)"
        ),
        body=RefreshBody,
        answer=TokenPair,
        public=True,
        problems=(401,),
    ),
    Operation(
        method="POST",
        path="/v1/auth/logout",
        handler=logout,
        summary="End this session: its tokens stop working at once",
        status=204,
    ),
    Operation(
        method="PATCH",
        path="/v1/users/me",
        handler=patch_me,
        summary="Change the caller's display name, status or settings",
        status=202,
        body=ProfilePatch,
        answer=Accepted,
    ),
    Operation(
        method="POST",
        path="/v1/users/me/password",
        handler=change_password,
        summary="Change the password; every session of the user ends",
        status=202,
        body=PasswordBody,
        answer=Accepted,
    ),
    Operation(
        method="DELETE",
        path="/v1/users/me",
        handler=erase_me,
        summary="Erase the caller: data key destroyed, content redacted, sessions ended",
        status=202,
        answer=Accepted,
    ),
    Operation(
        method="POST",
        path="/v1/users/me/export",
        handler=start_export,
        summary="Export everything held about the caller (JSON archive in S3)",
        status=202,
        answer=ExportStarted,
    ),
    Operation(
        method="GET",
        path="/v1/users/me/export/{export_id}",
        handler=get_export,
        summary="An export's state and, when done, a short-lived download URL",
        answer=ExportState,
    ),
    Operation(
        method="POST",
        path="/v1/api-keys",
        handler=create_api_key,
        summary="Create a scoped API key (shown once)",
        status=201,
        body=ApiKeyBody,
        answer=ApiKeyCreated,
    ),
    Operation(
        method="DELETE",
        path="/v1/api-keys/{key_id}",
        handler=revoke_api_key,
        summary="Revoke one of the caller's API keys",
        status=204,
    ),
)
