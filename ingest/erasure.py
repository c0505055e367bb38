"""Erasing a person (GDPR art. 17): the one procedure behind the API and the operator CLI.

Order matters, and each step is idempotent so a failed erasure is simply run again:

1. destroy the person's data key: from this instant every copy of their personal data, in
   Kafka, in the S3 archive and in any backup, is unreadable (crypto-shredding), and their
   media and exports are no longer served (downloads and export reads answer 404);
2. append ``UserErased``: the projectors redact read models and caches, the fan-out tier
   closes the person's sockets, and the log records that it happened;
3. end every session (PostgreSQL, Redis, the revocation feed) and revoke every API key;
4. release the credentials (username, email, password hash) in ingest's account store;
5. forget the person's send records in Redis (each holds a digest of a message's content);
6. delete their exports (:func:`ingest.exports.forget_exports`): the rows (a GET of one
   answers 404), then every archive under their prefix in the exports bucket (plain text,
   never sealed). After step 4, because an export still being built checks the account, under
   its row's lock, before it writes its archive: one that wrote before the rows were deleted
   is deleted here, one that comes later writes nothing;
7. forget their media (:func:`ingest.media.forget_media`): the filename and verified key of
   every upload are cleared (the copy is never served again), then the uploaded objects and
   verified copies are deleted from the media bucket (plain bytes, never sealed).

Steps 6 and 7 delete objects by the person's key prefixes, not only by the keys their rows
name, so a rerun after a failure between a row change and its objects' deletion still finds
them. If step 2 fails, the key is already gone (the essential part), nothing else changed, and
the caller can retry with the same token; a failure after step 3 is retried by the operator
(``backbone erase``), as the person's token no longer works.
"""

from __future__ import annotations

import asyncio
import uuid

import structlog

from eventstore import EventStore, RecordedEvent
from eventstore.objects import s3_client
from ingest.commands import forget_sends
from ingest.exports import forget_exports
from ingest.media import forget_media
from ingest.security import AuthService
from schemas import UserErased

log = structlog.get_logger(__name__)


async def erase_user(
    store: EventStore,
    auth: AuthService,
    user_id: uuid.UUID,
    *,
    actor: uuid.UUID,
    correlation_id: str | None = None,
) -> RecordedEvent:
    """Erase ``user_id`` everywhere; the ``UserErased`` event as written."""
    destroyed = await store.keyring.erase(user_id)
    (recorded,) = await store.producer.append(
        [UserErased(user_id=user_id)], actor=str(actor), correlation_id=correlation_id
    )
    released = await release_user(store, auth, user_id)
    log.warning(
        "privacy.user_erased",
        user_id=str(user_id),
        actor=str(actor),
        key_destroyed=destroyed,
        **released,
        position=recorded.position.token(),
    )
    return recorded


async def release_user(store: EventStore, auth: AuthService, user_id: uuid.UUID) -> dict[str, int]:
    """Steps 3 onward: every step after the key and the log, with what each did, by name.

    A restore re-applies these for every ``UserErased`` in the log (:mod:`ops.backup`, inside
    its transaction: ``store`` and ``auth`` then work on that one connection), so a step that
    concerns ingest's records belongs here, not in :func:`erase_user`.
    """
    sessions = await auth.sessions.revoke_user_sessions(user_id, "erasure")
    keys = await auth.api_keys.revoke_owner(user_id)
    await auth.accounts.mark_erased(user_id)
    sends = await forget_sends(auth.redis, auth.namespace, user_id)
    s3 = s3_client(store.settings)
    try:
        exports = await forget_exports(store, s3, user_id)
        media = await forget_media(store, s3, user_id)
    finally:
        await asyncio.to_thread(s3.close)
    return {
        "sessions_ended": sessions,
        "api_keys_revoked": keys,
        "send_records_forgotten": sends,
        "export_archives_deleted": exports,
        "media_objects_deleted": media,
    }
