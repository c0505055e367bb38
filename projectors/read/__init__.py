"""The read side: the one public face of the projectors package.

Other tiers (ingest serves the read API; fanout bootstraps audiences and resumes) import only
from here, never from projector internals. The read model's schema has one owner, so the
queries over it live next to it.
"""

from projectors.read.contract import (
    LIVE_SCHEMA,
    MessageRef,
    ReadSide,
    members_key,
    recent_key,
    user_conversations_key,
)

__all__ = [
    "LIVE_SCHEMA",
    "MessageRef",
    "ReadSide",
    "members_key",
    "recent_key",
    "user_conversations_key",
]
