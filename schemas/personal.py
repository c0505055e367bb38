"""Personal data in events: which fields hold it, whose it is, and how an erased value looks.

A personal field is encrypted on the way into the log under the data key of the event's
*subject* (the person the data belongs to), and decrypted on the way out. Once the subject's
key is destroyed, the field decodes as :data:`ERASED`, everywhere and for every copy.
"""

from __future__ import annotations

import msgspec


class Erased(msgspec.Struct, frozen=True, tag="erased", tag_field="kind"):
    """The value a personal field decodes to once its subject's data key is destroyed."""


ERASED = Erased()


def is_erased(value: object) -> bool:
    """Whether a decoded personal value is the erased marker."""
    return isinstance(value, Erased)
