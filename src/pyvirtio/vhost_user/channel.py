"""The back-end request channel, sans I/O (vhost-user.rst "Back-end communication").

With the BACKEND_REQ protocol feature the front-end hands the back-end a socket
(SET_BACKEND_REQ_FD) on which the roles are swapped: the back-end sends
requests, the front-end answers them.  pyvirtio uses it for

- ``VHOST_USER_BACKEND_CONFIG_CHANGE_MSG``: the device's config space changed
  (a blk resize); the front-end re-reads it with GET_CONFIG and gives the
  driver a configuration change notification (VIRTIO 1.4 §2.5.1);
- ``VHOST_USER_BACKEND_VRING_CALL`` / ``VRING_ERR``: in-band notifications,
  when INBAND_NOTIFICATIONS is negotiated.

:class:`BackendChannel` encodes these messages and hands them to a transport
(a callable the runtime supplies, which writes to the socket); the runtime
feeds back what it reads from the socket (:meth:`BackendChannel.receive`).
With REPLY_ACK negotiated, a message may ask for an answer (NEED_REPLY): the
answer is checked and handed to the sender's callback when it arrives, so
nothing here waits (a front-end that re-reads the config space before it
acknowledges, as QEMU does, is answered meanwhile on the main socket).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from pyvirtio.errors import BackendChannelError, NoBackendChannel
from pyvirtio.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    U64,
    VERSION,
    BackendRequest,
    encode,
    encode_vring_state,
)

__all__ = ["ACK_FLAGS", "AckCallback", "BackendChannel", "Transport"]

log = logging.getLogger(__name__)

#: The only flags a front-end's answer may carry: version 1 and the reply bit.
ACK_FLAGS = VERSION | FLAG_REPLY
#: A whole answer: header and its u64 status.
_ACK_SIZE = HEADER.size + U64.size
#: Called with the front-end's status (0: success) or ``None`` (no answer:
#: the channel closed first).
AckCallback = Callable[[int | None], None]
#: Writes one whole message to the channel's socket.
Transport = Callable[[bytes], None]


class BackendChannel:
    """The back-end's end of the back-end request channel of one connection.

    Args:
        reply_ack: REPLY_ACK was negotiated: messages may ask for an answer.
        inband_notifications: INBAND_NOTIFICATIONS was negotiated: VRING_CALL
            and VRING_ERR messages are allowed.
        transport: writes a message to the socket; ``None`` until attached
            (:attr:`transport`).
    """

    def __init__(
        self,
        *,
        reply_ack: bool,
        inband_notifications: bool = False,
        transport: Transport | None = None,
    ) -> None:
        self.reply_ack = reply_ack
        self.inband_notifications = inband_notifications
        self.transport = transport
        self.closed = False
        #: Messages sent with NEED_REPLY, oldest first, with their callbacks.
        self._pending: deque[tuple[BackendRequest, AckCallback | None]] = deque()
        self._buf = bytearray()
        #: Counters for logs and tests: messages sent, answers received.
        self.sent = 0
        self.acked = 0

    @property
    def pending(self) -> int:
        """How many answers are still awaited."""
        return len(self._pending)

    # -- messages ------------------------------------------------------------------------

    def config_changed(self, on_ack: AckCallback | None = None) -> bool:
        """Send CONFIG_CHANGE_MSG: the front-end should re-read the config space.

        With REPLY_ACK the message asks for an answer, which ``on_ack`` gets.

        Returns:
            Whether an answer will come (REPLY_ACK negotiated).

        Raises:
            NoBackendChannel: the channel is closed or has no transport.
            BackendChannelError: the message cannot be sent.
        """
        return self.send(BackendRequest.CONFIG_CHANGE_MSG, b"", need_reply=self.reply_ack,
                         on_ack=on_ack)

    def vring_call(self, queue: int, *, need_reply: bool = False) -> None:
        """Send VRING_CALL: ``queue`` used buffers (in-band notification).

        Raises:
            BackendChannelError: INBAND_NOTIFICATIONS was not negotiated, or
                the message cannot be sent.
            NoBackendChannel: the channel is closed or has no transport.
        """
        self._inband(BackendRequest.VRING_CALL, queue, need_reply)

    def vring_err(self, queue: int, *, need_reply: bool = False) -> None:
        """Send VRING_ERR: ``queue`` hit an error (in-band notification).

        Raises:
            BackendChannelError: as :meth:`vring_call`.
            NoBackendChannel: as :meth:`vring_call`.
        """
        self._inband(BackendRequest.VRING_ERR, queue, need_reply)

    def _inband(self, request: BackendRequest, queue: int, need_reply: bool) -> None:
        if not self.inband_notifications:
            raise BackendChannelError(
                f"{request.name} needs INBAND_NOTIFICATIONS, which was not negotiated"
            )
        if not 0 <= queue <= 0xFF:
            raise BackendChannelError(f"{request.name}: queue {queue} out of range")
        # vhost-user.rst: "The state.num field is currently reserved and must be set to 0."
        self.send(request, encode_vring_state(queue, 0), need_reply=need_reply)

    def send(
        self,
        request: BackendRequest,
        payload: bytes,
        *,
        need_reply: bool = False,
        on_ack: AckCallback | None = None,
    ) -> bool:
        """Send one back-end request; with ``need_reply`` (REPLY_ACK only) await its answer.

        Returns:
            Whether an answer will come.

        Raises:
            NoBackendChannel: the channel is closed or has no transport.
            BackendChannelError: ``need_reply`` without REPLY_ACK negotiated,
                or the transport failed (the channel is then closed).
        """
        if self.closed or self.transport is None:
            raise NoBackendChannel(f"{request.name}: the back-end request channel is "
                                   f"{'closed' if self.closed else 'not connected'}")
        if need_reply and not self.reply_ack:
            raise BackendChannelError(f"{request.name}: NEED_REPLY needs REPLY_ACK, "
                                      "which was not negotiated")
        data = encode(request, payload, flags=FLAG_NEED_REPLY if need_reply else 0)
        try:
            self.transport(data)
        except OSError as exc:
            self.close()
            raise BackendChannelError(f"{request.name}: cannot send: {exc}") from exc
        self.sent += 1
        if need_reply:
            self._pending.append((request, on_ack))
        return need_reply

    # -- what the front-end sends back ---------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes read from the channel: answers to messages sent with NEED_REPLY.

        Each complete answer is checked and handed to its callback.  The
        front-end sends nothing else on this channel.

        Raises:
            BackendChannelError: an answer nobody asked for, for another
                request than the oldest one awaiting an answer, with flags
                other than exactly version 1 | reply (0x5), or with a payload
                that is not a u64.  The channel is closed (pending callbacks get
                ``None``): its byte stream cannot be trusted any more.
        """
        self._buf += data
        while len(self._buf) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self._buf)
            try:
                self._check_answer(request, flags, size)
            except BackendChannelError:
                self.close()
                raise
            if len(self._buf) < _ACK_SIZE:
                return
            (status,) = U64.unpack_from(self._buf, HEADER.size)
            del self._buf[:_ACK_SIZE]
            sent, on_ack = self._pending.popleft()
            self.acked += 1
            if status:
                log.warning("front-end answered %s with status %d (failure)", sent.name, status)
            if on_ack is not None:
                on_ack(status)

    def _check_answer(self, request: int, flags: int, size: int) -> None:
        if not self._pending:
            raise BackendChannelError(
                f"front-end sent request {request} (flags {flags:#x}) on the back-end "
                "channel, where it may only answer, and no answer was awaited"
            )
        expected = self._pending[0][0]
        if request != expected:
            raise BackendChannelError(
                f"answer for request {request}, but the oldest awaiting one is "
                f"{expected.name} ({expected.value})"
            )
        if flags != ACK_FLAGS:
            raise BackendChannelError(
                f"{expected.name}: answer flags {flags:#x}, expected {ACK_FLAGS:#x} "
                "(version 1 | reply)"
            )
        if size != U64.size:
            raise BackendChannelError(
                f"{expected.name}: answer payload of {size} bytes, expected a u64"
            )

    def eof(self) -> None:
        """The front-end closed its end of the channel.

        Raises:
            BackendChannelError: it closed in the middle of an answer, or with
                answers still awaited (their callbacks get ``None``).
        """
        partial, pending = len(self._buf), len(self._pending)
        self.close()
        if partial or pending:
            raise BackendChannelError(
                f"front-end closed the back-end channel with {pending} answer(s) awaited"
                + (f", {partial} bytes into one" if partial else "")
            )

    def close(self) -> None:
        """Forget the channel: no more messages; awaited answers will not come."""
        self.closed = True
        self.transport = None
        self._buf.clear()
        pending, self._pending = self._pending, deque()
        for _request, on_ack in pending:
            if on_ack is not None:
                on_ack(None)
