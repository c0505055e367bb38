"""What the tier puts on the wire: server text frames encoded once, and its close codes.

RFC 6455 itself (framing, masking, the handshake, client-frame parsing) is ``wsproto``'s job;
this module only fixes how it is used. The server sends unmasked, unfragmented frames and never
negotiates an extension (no permessage-deflate), so a frame does not depend on the socket it is
written to: :func:`text_frame` asks wsproto's frame encoder once per event and the very same
bytes are written to every subscriber.
"""

from __future__ import annotations

from typing import Final

from wsproto.frame_protocol import FrameProtocol

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_TRY_AGAIN: Final = 1013
CLOSE_UNAUTHORIZED: Final = 4001
CLOSE_TOO_SLOW: Final = 4008
CLOSE_EPOCH_CHANGED: Final = 4009
CLOSE_RATE_LIMITED: Final = 4029

# A server-side encoder without extensions: its frames are unmasked and uncompressed, and with
# ``fin=True`` it keeps no state between calls, so one instance serves the whole process.
_SERVER_FRAMES: Final = FrameProtocol(client=False, extensions=[])


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame carrying ``payload`` (UTF-8 JSON)."""
    return bytes(_SERVER_FRAMES.send_data(payload.decode(), fin=True))
