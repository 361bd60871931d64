"""The virtio-vsock device model (VIRTIO 1.4 §5.10 Socket Device), hybrid vsock over Unix sockets.

Every guest socket the device carries is bridged to a Unix socket (see
:mod:`pyvirtio.devices.vsock.bridge` for the conventions): a host program's (CID
2) or a sibling daemon's (another guest of the same ``--group``).  The protocol
of §5.10.6 runs between the guest and the device: REQUEST/RESPONSE/RST/SHUTDOWN
in both directions, RW, CREDIT_UPDATE and CREDIT_REQUEST (always answered).

**Bounded buffering, back-pressure both ways** (§5.10.6.1, §5.10.6.3):

- guest to far side: an RW payload goes straight from guest memory to the far
  socket; what the socket does not take is held, and counts against the credit
  the device publishes (``buf_alloc`` = ``--tx-buffer-size``).  ``fwd_cnt``
  advances only as the socket takes bytes, so a far side that stops reading
  stops the guest's writer, and the device never holds more than ``buf_alloc``
  per connection.  A guest that sends beyond its credit is reset (counted).
- far side to guest: the far socket is read only into an rx buffer the guest
  gave, and only as much as the guest's credit allows.  While a guest does not
  read, its credit runs out, the device stops reading the socket (not watched,
  not polled) and the far side's writes block.
- control packets owed to the guest are flags on their connection (at most one
  of each kind pending), and RSTs for unknown flows wait in a bounded queue; so
  a guest that never gives rx buffers cannot make the device grow.

The guest is untrusted: every header is checked (:func:`decode_header`), and a
bad one is dropped and counted by reason in the tx queue's ``kinds``
(``dropped_bad_len``, ``dropped_bad_cid``...).
"""

from __future__ import annotations

import logging
import os
import socket
from functools import partial

from pyvirtio.devices.base import ControlCommand, ControlReply, DeviceHost
from pyvirtio.devices.vsock.bridge import connect_unix, fit_messages, port_path, rendezvous
from pyvirtio.devices.vsock.connection import Connection, Initiator, State
from pyvirtio.devices.vsock.farside import (
    DEFAULT_TX_BUFFER,
    SEND_FLAGS,
    FarSide,
    VsockConfig,
)
from pyvirtio.devices.vsock.packet import (
    MAX_PAYLOAD,
    Header,
    HeaderProblem,
    decode_header,
    encode_header,
)
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.vsock import (
    CONFIG,
    HEADER,
    HOST_CID,
    RXQ,
    TXQ,
    SeqFlag,
    ShutdownFlag,
    VsockFeature,
    VsockOp,
    VsockType,
)
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["DEFAULT_TX_BUFFER", "VsockConfig", "VsockDevice"]

log = logging.getLogger(__name__)

#: The largest seqpacket message taken from a far socket (bytes held per connection).
MAX_MESSAGE = 1 << 20
#: RSTs for flows the device does not know, waiting for rx buffers; more are dropped.
MAX_ORPHAN_RSTS = 256
#: Plain ints for the flags tested per packet (``IntFlag`` arithmetic is slow).
_MESSAGE_END = int(SeqFlag.EOM | SeqFlag.EOR)
_SEND = int(ShutdownFlag.SEND)
_SHUTDOWN_BITS = int(ShutdownFlag.RCV | ShutdownFlag.SEND)
#: Counter names of the ops (a dict: cheaper than the enum per packet).
_OP_NAMES = {int(op): op.name for op in VsockOp}
#: Dropped headers logged at WARNING; the rest at DEBUG (all counted).
_LOUD_DROPS = 20


class VsockDevice(FarSide):
    """virtio-vsock (§5.10): rx 0, tx 1, event 2 (QEMU keeps the event queue).

    Raises (at construction):
        OSError: ``--uds-path`` or a group's rendezvous socket cannot be bound.
    """

    device_id = DeviceId.VSOCK
    num_queues = 3

    def __init__(self, config: VsockConfig) -> None:
        super().__init__(config)
        self._drops = 0

    # -- features, config space, life cycle (§5.10.3, §5.10.4) -----------------------------

    def device_features(self) -> int:
        """STREAM and SEQPACKET (§5.10.3)."""
        return (1 << VsockFeature.STREAM) | (1 << VsockFeature.SEQPACKET)

    def config_space(self) -> bytes:
        """``struct virtio_vsock_config`` (§5.10.4): the guest's CID."""
        return CONFIG.pack(self.guest_cid)

    def attach(self, host: DeviceHost) -> None:
        super().attach(host)
        for sock, sibling, seqpacket in self._listeners:
            host.watch_fd(sock.fileno(), partial(self._accept, sock, sibling, seqpacket))

    def start(self) -> None:
        """A new front-end: the old driver's connections are gone (reset, sockets closed)."""
        super().start()
        for conn in list(self.conns.values()):
            self._remove(conn)
        self._orphans.clear()
        self._ready.clear()

    def close(self) -> None:
        self._stopping = True
        for conn in list(self.conns.values()):
            self._remove(conn)
        for greeter in list(self._greeters.values()):
            self._drop_greeter(greeter)
        self._close_listeners()

    def control_commands(self) -> dict[str, ControlCommand]:
        """``connections``: the connection table (``pyvirtio vsock``)."""
        return {"connections": self._connections_command}

    def _connections_command(self, words: list[str], reply: ControlReply) -> None:
        reply({"ok": True, "guest_cid": self.guest_cid, "uds_path": str(self.config.uds_path),
               "groups": list(self.config.groups), **self.stats_details()})

    def stats_details(self) -> dict[str, object]:
        """The connection table with each connection's counters (``pyvirtio stats``,
        ``pyvirtio vsock``)."""
        return {"connections": [c.describe(self.guest_cid) for c in self.conns.values()],
                "connections_closed": self.connections_closed,
                "handshaking": len(self._greeters), "orphan_rsts": len(self._orphans)}

    # -- the engine's questions ------------------------------------------------------------

    def has_work(self, queue: int) -> bool:
        if queue == TXQ:
            return True
        if queue != RXQ:
            return False
        if self._orphans:
            return True
        while self._ready:
            key = next(iter(self._ready))
            conn = self.conns.get(key)
            if conn is not None and conn.has_output():
                return True
            del self._ready[key]
        return False

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        if queue == TXQ:
            self._take_tx(chain)
            return 0
        if queue == RXQ:
            return self._fill_rx(chain)
        return 0  # the event queue: never taken (has_work), nothing to report

    # -- tx: packets from the guest (§5.10.6) ------------------------------------------------

    def _take_tx(self, chain: DescriptorChain) -> None:
        stats = self.stats[TXQ]
        if chain.writable_len:
            stats.violations += 1
        reader = chain.reader()
        raw = reader.read(min(HEADER.size, reader.remaining))
        result = decode_header(raw, reader.remaining, guest_cid=self.guest_cid,
                               seqpacket=self.seqpacket)
        if isinstance(result, HeaderProblem):
            self._dropped(result)
            if result.kind == "bad_type" and result.header is not None:
                self._orphan_rst(result.header)  # §5.10.6.3: RST for an unknown type
            return
        hdr = result
        stats.kinds[_OP_NAMES[hdr.op]] += 1
        key = (hdr.src_port, hdr.dst_cid, hdr.dst_port)
        conn = self.conns.get(key)
        if hdr.op == VsockOp.REQUEST:
            if conn is not None:
                self._dropped(HeaderProblem("duplicate_request", f"flow {key} exists", hdr))
            else:
                self._guest_connect(hdr)
            return
        if conn is None or conn.type != hdr.type:
            if hdr.op != VsockOp.RST:
                stats.kinds["no_connection"] += 1
                self._orphan_rst(hdr)
            return
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt)
        conn.packets_from_guest += 1
        op = hdr.op
        if op == VsockOp.RW:
            stats.bytes_out += hdr.len
            self._guest_data(conn, hdr, reader.take(hdr.len))
        elif op == VsockOp.RST:
            self._remove(conn)
            return
        elif op == VsockOp.RESPONSE:
            self._guest_accepted(conn)
        elif op == VsockOp.SHUTDOWN:
            conn.guest_shutdown |= hdr.flags & _SHUTDOWN_BITS
            self._flush(conn)
            return
        elif op == VsockOp.CREDIT_REQUEST:
            conn.want_credit_update = True  # always answered (§5.10.6.3)
        self._refresh(conn)

    def _dropped(self, problem: HeaderProblem) -> None:
        stats = self.stats[TXQ]
        stats.errors += 1
        stats.kinds[f"dropped_{problem.kind}"] += 1
        self._drops += 1
        level = logging.WARNING if self._drops <= _LOUD_DROPS else logging.DEBUG
        log.log(level, "vsock: tx packet dropped (%s): %s", problem.kind, problem.detail)

    def _orphan_rst(self, hdr: Header) -> None:
        """RST for a flow the device does not know (§5.10.6.4), bounded."""
        if len(self._orphans) >= MAX_ORPHAN_RSTS:
            self.stats[RXQ].kinds["rst_dropped"] += 1
            return
        self._orphans.append(encode_header(Header(
            hdr.dst_cid, self.guest_cid, hdr.dst_port, hdr.src_port, 0, hdr.type,
            VsockOp.RST, 0, 0, 0)))
        self._kick_rx()

    def _guest_connect(self, hdr: Header) -> None:
        """REQUEST from the guest: to a host program (CID 2) or a sibling's guest."""
        seqpacket = hdr.type == VsockType.SEQPACKET
        if len(self.conns) >= self.config.max_connections:
            self.stats[TXQ].kinds["refused_too_many"] += 1
            self._orphan_rst(hdr)
            return
        if hdr.dst_cid == HOST_CID:
            addresses: list[str | bytes] = [port_path(self.config.uds_path, hdr.dst_port)]
            initiator = Initiator.GUEST
        else:
            addresses = [rendezvous(g, hdr.dst_cid, seqpacket) for g in self.config.groups]
            initiator = Initiator.SIBLING
        sock = None
        for address in addresses:
            try:
                sock = connect_unix(address, seqpacket)
                break
            except OSError as exc:
                log.debug("vsock: guest port %d -> %d:%d: %s", hdr.src_port, hdr.dst_cid,
                          hdr.dst_port, exc)
        if sock is None:
            self.stats[TXQ].kinds["refused"] += 1
            self._orphan_rst(hdr)
            return
        if seqpacket:
            fit_messages(sock, self.config.tx_buffer_size)
        conn = Connection(hdr.src_port, hdr.dst_cid, hdr.dst_port, hdr.type, sock,
                          Initiator.GUEST, self.config.tx_buffer_size)
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt)
        self.conns[conn.key] = conn
        if initiator is Initiator.SIBLING:
            line = f"CONNECT {hdr.dst_port} {self.guest_cid} {hdr.src_port}\n".encode()
            if not self._send_line(conn, line):
                return
            conn.awaiting_ok = True
            self._watch(conn)
            self._expect_answer(conn)
            return
        conn.state = State.ESTABLISHED
        conn.want_response = True
        self._refresh(conn)

    def _guest_accepted(self, conn: Connection) -> None:
        """RESPONSE: the guest's listener accepted a host's or a sibling's connection."""
        if conn.state is not State.CONNECTING or conn.initiator is Initiator.GUEST:
            self.stats[TXQ].kinds["unexpected_response"] += 1
            self._reset(conn)
            return
        conn.state = State.ESTABLISHED
        line = f"OK {conn.far_port}\n".encode() if conn.initiator is Initiator.HOST else b"OK\n"
        self._send_line(conn, line)

    def _guest_data(self, conn: Connection, hdr: Header, views: list[memoryview]) -> None:
        """RW: the payload goes to the far socket; what it does not take is held."""
        if conn.state is not State.ESTABLISHED or conn.guest_shutdown & _SEND:
            self.stats[TXQ].kinds["rw_not_established"] += 1
            self._reset(conn)
            return
        if not conn.accepts(hdr.len):
            self._dropped(HeaderProblem("credit", f"{hdr.len} bytes with {conn.held()} held "
                                        f"of {conn.buf_alloc} (VIRTIO 1.4 §5.10.6.3)", hdr))
            self._reset(conn)
            return
        conn.rx_cnt = (conn.rx_cnt + hdr.len) & 0xFFFFFFFF
        conn.bytes_from_guest += hdr.len
        if conn.seqpacket:
            for view in views:
                conn.partial += view
            if hdr.flags & _MESSAGE_END:
                conn.messages.append(bytes(conn.partial))
                conn.partial.clear()
            self._flush(conn)
            return
        if conn.pending or not hdr.len:
            for view in views:
                conn.pending += view
            self._flush(conn)
            return
        try:
            sent = conn.sock.sendmsg(views, [], SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._far_failed(conn, exc)
            return
        conn.forwarded(sent)
        if sent < hdr.len:
            skip = sent
            for view in views:
                if skip >= len(view):
                    skip -= len(view)
                    continue
                conn.pending += view[skip:]
                skip = 0
            self._flush(conn)

    # -- rx: packets to the guest --------------------------------------------------------------

    def _fill_rx(self, chain: DescriptorChain) -> int:
        stats = self.stats[RXQ]
        writer = chain.writer()
        if chain.readable_len:
            stats.violations += 1
        if writer.remaining < HEADER.size:
            stats.violations += 1
            return 0
        if self._orphans:
            writer.write(self._orphans.popleft())
            stats.kinds["RST"] += 1
            return writer.written
        while self._ready:
            key = next(iter(self._ready))
            del self._ready[key]
            conn = self.conns.get(key)
            if conn is None or not conn.has_output():
                continue
            written = self._emit(conn, chain)
            if conn.key in self.conns and conn.has_output():
                self._ready[key] = None
            return written
        stats.errors += 1
        return 0

    def _header(self, conn: Connection, op: int, length: int = 0, flags: int = 0) -> bytes:
        conn.sent_fwd_cnt = conn.fwd_cnt
        conn.want_credit_update = False  # every header carries the credit
        conn.packets_to_guest += 1
        self.stats[RXQ].kinds[_OP_NAMES[op]] += 1
        return encode_header(Header(conn.far_cid, self.guest_cid, conn.far_port,
                                    conn.guest_port, length, conn.type, op, flags,
                                    conn.buf_alloc, conn.fwd_cnt))

    def _emit(self, conn: Connection, chain: DescriptorChain) -> int:
        """One packet of ``conn`` into an rx buffer: control first, then data, then SHUTDOWN."""
        control = conn.next_control()
        if control is not None:
            op, flags = control
            if op == VsockOp.RST:
                self._remove(conn)
            elif op == VsockOp.REQUEST:
                conn.want_request = False
            elif op == VsockOp.RESPONSE:
                conn.want_response = False
            elif op == VsockOp.CREDIT_REQUEST:
                conn.want_credit_request = False
            chain.writer().write(self._header(conn, op, 0, flags))
            self._refresh(conn)
            return HEADER.size
        if conn.has_data():
            return self._emit_data(conn, chain)
        flags, conn.want_shutdown = conn.want_shutdown, 0
        chain.writer().write(self._header(conn, VsockOp.SHUTDOWN, 0, flags))
        return HEADER.size

    def _emit_data(self, conn: Connection, chain: DescriptorChain) -> int:
        writer = chain.writer()
        space = min(writer.remaining - HEADER.size, conn.peer_free(), MAX_PAYLOAD)
        if space <= 0:
            writer.write(self._header(conn, VsockOp.CREDIT_UPDATE))
            return HEADER.size
        writer.skip(HEADER.size)
        flags = 0
        if not conn.staged and conn.seqpacket:
            self._stage_message(conn)
            if conn.want_rst:
                return self._emit(conn, chain)  # the message was too big: RST
        if conn.staged:
            piece = conn.staged[:space]
            writer.write(piece)
            count = len(piece)
            conn.staged = conn.staged[count:]
            if conn.seqpacket and not conn.staged:
                flags = conn.staged_flags
        elif conn.far_eof:
            count = 0
        elif conn.seqpacket:
            count = -1  # no message after all
        else:
            try:
                count = os.readv(conn.sock.fileno(), writer.take(space))
            except BlockingIOError:
                count = -1
            except OSError as exc:
                log.debug("vsock: %s: read failed: %s", conn.key, exc)
                count = 0
            if count < space:
                conn.readable = False
            if count == 0:
                conn.far_eof = True
        if count <= 0:  # nothing after all: the far side's EOF, or a harmless update
            if conn.far_eof:
                header = self._header(conn, VsockOp.SHUTDOWN, 0, ShutdownFlag.SEND)
            else:
                header = self._header(conn, VsockOp.CREDIT_UPDATE)
            chain.writer().write(header)
            self._refresh(conn)
            return HEADER.size
        conn.tx_cnt = (conn.tx_cnt + count) & 0xFFFFFFFF
        conn.bytes_to_guest += count
        self.stats[RXQ].bytes_in += count
        chain.writer().write(self._header(conn, VsockOp.RW, count, flags))
        if conn.peer_free() == 0 and not conn.want_credit_request:
            conn.want_credit_request = True  # ask rather than wait on a lost update
        self._refresh(conn)
        return HEADER.size + count

    def _stage_message(self, conn: Connection) -> None:
        """Seqpacket: one whole message from the far socket, sent on in pieces (EOM last).

        A message the guest could never hold whole (more than its ``buf_alloc``, or
        :data:`MAX_MESSAGE`) resets the connection: Linux delivers a seqpacket
        message only once all of it arrived, so it would wait for it forever."""
        if not conn.readable:
            return
        peek = bytearray(1)
        try:
            size = conn.sock.recv_into(peek, 1, socket.MSG_PEEK | socket.MSG_TRUNC
                                       | socket.MSG_DONTWAIT)
            if size > min(MAX_MESSAGE, conn.peer_buf_alloc):
                self.stats[RXQ].kinds["message_too_big"] += 1
                log.info("vsock: %s: a %d-byte message from the far side is more than the "
                         "guest can take; reset", conn.key, size)
                self._reset(conn)
                return
            message, _, flags, _ = conn.sock.recvmsg(max(size, 1), 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            conn.readable = False
            return
        except OSError:
            message, flags = b"", 0
        if not message:  # the far side closed (a 0-byte message reads the same)
            conn.readable = False
            conn.far_eof = True
            return
        conn.staged = memoryview(message)
        conn.staged_flags = SeqFlag.EOM | (SeqFlag.EOR if flags & socket.MSG_EOR else 0)
