"""One vsock connection: its state, its credit accounting and what it owes the guest.

VIRTIO 1.4 §5.10.6.3 (buffer space management): each side publishes ``buf_alloc``
(its receive buffer) and ``fwd_cnt`` (the bytes it has consumed); a sender may
have at most ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes in flight.

Here the *guest side* is the guest's socket and the *far side* is what the device
bridges it to: a Unix socket of a host program (CID 2) or of a sibling daemon (a
guest of the same ``--group``).  The device's receive buffer for a connection is
what it holds on its way to the far socket (``pending`` / ``messages``), so the
credit it publishes (``buf_alloc``) bounds that buffering; the guest's credit
bounds what the device reads from the far socket, which it reads straight into
the guest's rx buffers (nothing held).
"""

from __future__ import annotations

import enum
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from pyvirtio.spec.vsock import ShutdownFlag, VsockOp, VsockType

__all__ = ["ConnKey", "Connection", "Initiator", "State"]

#: (guest port, far CID, far port): a flow as the guest's packets name it.
ConnKey = tuple[int, int, int]

_U32 = 0xFFFFFFFF
#: The shutdown bits as plain ints: ``IntFlag`` arithmetic costs microseconds per packet.
_RCV = int(ShutdownFlag.RCV)


class State(enum.Enum):
    """Where a connection is (the table ``pyvirtio vsock`` prints)."""

    #: A REQUEST is on its way (to the guest, or to a sibling daemon's guest).
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    #: Shut down in both directions or reset: output still flushes, then it goes.
    CLOSING = "closing"


class Initiator(enum.Enum):
    """Who asked for the connection."""

    GUEST = "guest"
    HOST = "host"
    SIBLING = "sibling"


@dataclass(eq=False, slots=True)
class Connection:
    """A flow between the guest's ``guest_port`` and ``far_cid:far_port``."""

    guest_port: int
    far_cid: int
    far_port: int
    type: int
    sock: socket.socket
    initiator: Initiator
    buf_alloc: int
    state: State = State.CONNECTING
    created: float = field(default_factory=time.monotonic)
    # -- our receive side (guest -> far): what we publish ------------------------------
    rx_cnt: int = 0
    fwd_cnt: int = 0
    sent_fwd_cnt: int = 0
    pending: bytearray = field(default_factory=bytearray, repr=False)
    partial: bytearray = field(default_factory=bytearray, repr=False)
    messages: deque[bytes] = field(default_factory=deque, repr=False)
    # -- the guest's receive side (far -> guest) ---------------------------------------
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    #: Bytes read from the far socket before the guest got them: handshake leftovers
    #: (stream) or the rest of one message (seqpacket).
    staged: memoryview = field(default_factory=lambda: memoryview(b""), repr=False)
    staged_flags: int = 0
    # -- shutdown ------------------------------------------------------------------------
    guest_shutdown: int = 0
    far_eof: bool = False
    far_write_closed: bool = False
    # -- what the device owes the guest (sent on rx, in this order) --------------------
    want_request: bool = False
    want_response: bool = False
    want_credit_update: bool = False
    want_credit_request: bool = False
    want_shutdown: int = 0
    want_rst: bool = False
    # -- I/O bookkeeping -----------------------------------------------------------------
    readable: bool = False
    watching: bool = False
    waiting_writable: bool = False
    awaiting_ok: bool = False
    handshake: bytearray = field(default_factory=bytearray, repr=False)
    # -- per-connection counters (``pyvirtio vsock``) --------------------------------------
    bytes_to_guest: int = 0
    bytes_from_guest: int = 0
    packets_to_guest: int = 0
    packets_from_guest: int = 0
    #: Its counters' names in ``pyvirtio stats`` (they name the state too).

    @property
    def key(self) -> ConnKey:
        return (self.guest_port, self.far_cid, self.far_port)

    @property
    def seqpacket(self) -> bool:
        return self.type == VsockType.SEQPACKET

    # -- credit ----------------------------------------------------------------------------

    def peer_free(self) -> int:
        """Bytes the guest can still take (§5.10.6.3: ``buf_alloc - (tx_cnt - fwd_cnt)``)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight)

    def held(self) -> int:
        """Bytes taken from the guest and not yet given to the far socket."""
        return (self.rx_cnt - self.fwd_cnt) & _U32

    def update_peer_credit(self, buf_alloc: int, fwd_cnt: int) -> None:
        """Every packet from the guest carries its credit (§5.10.6.3)."""
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    def accepts(self, length: int) -> bool:
        """Whether ``length`` more bytes from the guest fit the credit we published."""
        return self.held() + length <= self.buf_alloc

    def forwarded(self, count: int) -> None:
        """``count`` bytes reached the far socket: free them; publish when it matters.

        An update goes out once a quarter of the buffer has been freed since the
        guest last heard our ``fwd_cnt``, so the guest never waits on us while the
        far side keeps up, and does not get one update per packet."""
        self.fwd_cnt = (self.fwd_cnt + count) & _U32
        if (self.fwd_cnt - self.sent_fwd_cnt) & _U32 >= max(1, self.buf_alloc // 4):
            self.want_credit_update = True

    # -- what to send the guest --------------------------------------------------------------

    def wants_input(self) -> bool:
        """Whether far-side bytes should flow to the guest now."""
        return (self.state is State.ESTABLISHED and not self.far_eof and not self.want_rst
                and not self.guest_shutdown & _RCV and self.peer_free() > 0)

    def has_data(self) -> bool:
        return self.wants_input() and (bool(self.staged) or self.readable)

    def next_control(self) -> tuple[int, int] | None:
        """The next control packet owed to the guest, as (op, flags), without data."""
        if self.want_rst:
            return (VsockOp.RST, 0)
        if self.want_request:
            return (VsockOp.REQUEST, 0)
        if self.want_response:
            return (VsockOp.RESPONSE, 0)
        if self.want_credit_request:
            return (VsockOp.CREDIT_REQUEST, 0)
        if self.want_credit_update:
            return (VsockOp.CREDIT_UPDATE, 0)
        return None

    def has_output(self) -> bool:
        """Whether the device has anything for the guest on this connection."""
        return (self.next_control() is not None or self.has_data()
                or bool(self.want_shutdown and not self.staged))

    def output_flushed(self) -> bool:
        return not self.pending and not self.messages

    def describe(self, guest_cid: int) -> dict[str, object]:
        """A row of the connection table."""
        return {
            "guest": f"{guest_cid}:{self.guest_port}",
            "peer": f"{self.far_cid}:{self.far_port}",
            "type": "seqpacket" if self.seqpacket else "stream",
            "initiator": self.initiator.value,
            "state": self.state.value,
            "seconds": round(time.monotonic() - self.created, 3),
            "bytes_to_guest": self.bytes_to_guest,
            "bytes_from_guest": self.bytes_from_guest,
            "packets_to_guest": self.packets_to_guest,
            "packets_from_guest": self.packets_from_guest,
            "held_bytes": self.held(),
            "guest_credit": self.peer_free(),
            "guest_shutdown": int(self.guest_shutdown),
            "far_eof": self.far_eof,
        }
