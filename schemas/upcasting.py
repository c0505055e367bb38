"""Upcasters: how an older payload version becomes the current one, on read.

The log is never rewritten. When an event class moves from version N to N+1, a function
``(payload dict at version N) -> payload dict at version N+1`` is registered here, and the
decoder applies the chain from the stored version up to the class's current ``version``. Old
payloads kept in ``tests/fixtures/events`` prove the chain still works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]


class UpcastError(Exception):
    """A stored payload's version has no path to the current version."""


class Upcasters:
    """A registry of single-step upcasters keyed by (event type, from-version)."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcaster] = {}

    def register(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: register the step from ``from_version`` to ``from_version + 1``."""

        def decorate(func: Upcaster) -> Upcaster:
            key = (event_type, from_version)
            if key in self._steps:
                raise ValueError(f"two upcasters for {event_type} v{from_version}")
            self._steps[key] = func
            return func

        return decorate

    def upcast(self, event_type: str, version: int, target: int, payload: Payload) -> Payload:
        """Apply every step from ``version`` to ``target``; the payload is not mutated."""
        if version > target:
            raise UpcastError(
                f"{event_type} v{version} is newer than this reader (v{target}); upgrade it"
            )
        while version < target:
            step = self._steps.get((event_type, version))
            if step is None:
                raise UpcastError(f"no upcaster for {event_type} from v{version}")
            payload = step(dict(payload))
            version += 1
        return payload

    def steps(self) -> Mapping[tuple[str, int], Upcaster]:
        return dict(self._steps)


# The registry the event store uses. No event has changed shape since v1 yet; the first change
# registers its step here, e.g.:
#
#     @UPCASTERS.register("chat.message.sent", 1)
#     def _message_sent_v1(p: Payload) -> Payload:
#         p["body"] = p.pop("text")
#         return p
UPCASTERS = Upcasters()
