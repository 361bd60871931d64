"""The vhost-user protocol: wire format (sans I/O) and back-end state machine."""

from pyvirtio.vhost_user.backend import VhostUserBackend
from pyvirtio.vhost_user.protocol import Message, MessageDecoder, ProtocolFeature, Request

__all__ = ["Message", "MessageDecoder", "ProtocolFeature", "Request", "VhostUserBackend"]
