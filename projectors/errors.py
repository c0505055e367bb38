"""Typed errors of the projectors.

::

    ProjectorError                 (base)
    ├── SchemaNameInvalid          a read-model schema name that is not a plain identifier
    ├── ProjectionError            an event contradicts the read model (dead-lettered)
    └── DeadLetterNotFound         no dead letter at the given position
"""

from __future__ import annotations


class ProjectorError(Exception):
    """Base of every projector error."""


class SchemaNameInvalid(ProjectorError):
    """A schema name that cannot be spliced into SQL safely."""


class ProjectionError(ProjectorError):
    """An event cannot be applied to the read model (e.g. a message of an unknown conversation).

    The event goes to the dead-letter table with this message; the batch goes on.
    """


class DeadLetterNotFound(ProjectorError):
    """A retry named a position that has no dead letter."""
