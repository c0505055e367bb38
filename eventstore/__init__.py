"""The event store: the log on Kafka, envelopes, positions, personal-data keys, migrations.

Import what you need from here; submodules are implementation detail.
"""

from eventstore.codec import (
    Decoded,
    OutgoingRecord,
    RecordedEvent,
    Skipped,
    decode_records,
    encode_event,
    stream_placement,
)
from eventstore.consumer import Batch, GroupReader, LogReader, OffsetRange, PositionStore
from eventstore.ends import LogEnds
from eventstore.epoch import bump_epoch, read_epoch
from eventstore.errors import (
    ConfigError,
    DecodeError,
    EventStoreError,
    InvalidEvent,
    KeyStoreUnavailable,
    LogUnavailable,
    MigrationError,
    NotEnoughReplicas,
    RecordRejected,
    SendTimeout,
    SubjectErased,
)
from eventstore.keyring import KeyRing
from eventstore.migrations import Migration, load_migrations, migrate, migrate_eventstore
from eventstore.pg import Connection, Pool, create_pool, redact_dsn
from eventstore.positions import InvalidPosition, Position
from eventstore.producer import EventProducer, default_producer_factory
from eventstore.settings import MasterKey, Settings, load_settings
from eventstore.store import EventStore
from eventstore.topics import TopicLayout, provision_topics

__all__ = [
    "Batch",
    "ConfigError",
    "Connection",
    "DecodeError",
    "Decoded",
    "EventProducer",
    "EventStore",
    "EventStoreError",
    "GroupReader",
    "InvalidEvent",
    "InvalidPosition",
    "KeyRing",
    "KeyStoreUnavailable",
    "LogEnds",
    "LogReader",
    "LogUnavailable",
    "MasterKey",
    "Migration",
    "MigrationError",
    "NotEnoughReplicas",
    "OffsetRange",
    "OutgoingRecord",
    "Pool",
    "Position",
    "PositionStore",
    "RecordRejected",
    "RecordedEvent",
    "SendTimeout",
    "Settings",
    "Skipped",
    "SubjectErased",
    "TopicLayout",
    "bump_epoch",
    "create_pool",
    "decode_records",
    "default_producer_factory",
    "encode_event",
    "load_migrations",
    "load_settings",
    "migrate",
    "migrate_eventstore",
    "provision_topics",
    "read_epoch",
    "redact_dsn",
    "stream_placement",
]
