"""Limits of the ``tgnstream.rpc.v1`` wire protocol that servers and clients both need.

This module imports nothing, so a client can read it without importing any server code.
"""

from __future__ import annotations

__all__ = ["MAX_MESSAGE_BYTES"]

#: The largest request and reply a server accepts and sends by default
#: (``GrpcConfig.max_message_bytes``), and so the receive limit a client defaults to: an Embed
#: reply of the most nodes a request may ask for (10,000) is about 7 MB at width 100, above
#: gRPC's own 4 MiB default.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
