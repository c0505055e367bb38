"""Erasing a person (GDPR art. 17): the one procedure behind the API and the operator CLI.

Order matters, and each step is idempotent so a failed erasure is simply run again:

1. destroy the person's data key: from this instant every copy of their personal data, in
   Kafka, in the S3 archive and in any backup, is unreadable (crypto-shredding);
2. append ``UserErased``: the projectors redact read models and caches, the fan-out tier
   closes the person's sockets, and the log records that it happened;
3. end every session (PostgreSQL, Redis, the revocation feed) and revoke every API key;
4. release the credentials (username, email, password hash) in ingest's account store;
5. forget the person's send records in Redis (each holds a digest of a message's content).

If step 2 fails, the key is already gone (the essential part), nothing else changed, and the
caller can retry with the same token.
"""

from __future__ import annotations

import uuid

import structlog

from eventstore import EventStore, RecordedEvent
from ingest.commands import forget_sends
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
    sessions = await auth.sessions.revoke_user_sessions(user_id, "erasure")
    keys = await auth.api_keys.revoke_owner(user_id)
    await auth.accounts.mark_erased(user_id)
    sends = await forget_sends(auth.redis, auth.namespace, user_id)
    log.warning(
        "privacy.user_erased",
        user_id=str(user_id),
        actor=str(actor),
        key_destroyed=destroyed,
        sessions_ended=sessions,
        api_keys_revoked=keys,
        send_records_forgotten=sends,
        position=recorded.position.token(),
    )
    return recorded
