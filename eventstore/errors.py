"""Typed errors of the event store.

::

    EventStoreError                  (base; ``retriable`` says whether trying again can help)
    ├── ConfigError                  a setting is missing or bad; names the variable
    ├── LogUnavailable               Kafka cannot take the write now (retriable)
    │   ├── NotEnoughReplicas        ISR below min.insync.replicas (retriable)
    │   └── SendTimeout              no ack within the bound; outcome unknown (retriable)
    ├── RecordRejected               Kafka refused the record itself (too large, invalid)
    │   └── InvalidEvent             the event breaks its schema; never written
    ├── KeyStoreUnavailable          the data-key store cannot be reached (retriable)
    ├── SubjectErased                writing personal data of an erased subject
    ├── DecodeError                  a record cannot be decoded (poison)
    └── MigrationError               a schema migration failed or was altered after applying
"""

from __future__ import annotations


class EventStoreError(Exception):
    """Base of every event-store error."""

    retriable: bool = False


class ConfigError(EventStoreError):
    """A configuration value is missing or invalid. The message names the variable."""


class LogUnavailable(EventStoreError):
    """The log cannot accept the write right now; nothing was acknowledged."""

    retriable = True


class NotEnoughReplicas(LogUnavailable):
    """Fewer in-sync replicas than ``min.insync.replicas``: writes are refused."""


class SendTimeout(LogUnavailable):
    """No acknowledgement within the send bound.

    The outcome is unknown: the record may still be appended later. Retrying with the same
    event id is safe because every consumer deduplicates by id.
    """


class RecordRejected(EventStoreError):
    """Kafka refused this record (e.g. larger than the topic allows); retrying cannot help."""


class InvalidEvent(RecordRejected):
    """The event breaks its own schema (a limit, a pattern): it would be poison in the log."""


class KeyStoreUnavailable(EventStoreError):
    """The data-key store (PostgreSQL) cannot be reached."""

    retriable = True


class SubjectErased(EventStoreError):
    """Personal data of an erased subject cannot be written: their key is gone for good."""


class DecodeError(EventStoreError):
    """A record cannot be decoded into a known event (a poison record)."""


class MigrationError(EventStoreError):
    """A migration failed, or an applied migration's file changed since it was applied."""
