"""virtio-vsock through the real back-end and engine (VIRTIO 1.4 §5.10), with host Unix sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.devices.vsock.connection import State
from pyvirtio.devices.vsock.device import VsockConfig, VsockDevice
from pyvirtio.devices.vsock.entry import render_table
from pyvirtio.devices.vsock.packet import Header, encode_header
from pyvirtio.spec.vsock import (
    HEADER,
    RXQ,
    TXQ,
    SeqFlag,
    ShutdownFlag,
    VsockFeature,
    VsockOp,
    VsockType,
)
from pyvirtio.testing import DeviceHarness
from pyvirtio.testing.harness import Used

GUEST = 3
RX_BUF = HEADER.size + 4096


class Driver:
    """The guest's side of the protocol, on a harness."""

    def __init__(self, harness: DeviceHarness, buf_alloc: int = 65536) -> None:
        self.h = harness
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0
        self.collected: list[Used] = []

    def send(self, op: int, src_port: int = 1000, dst_port: int = 80, payload: bytes = b"",
             *, dst_cid: int = 2, type_: int = VsockType.STREAM, flags: int = 0,
             src_cid: int = GUEST, length: int | None = None) -> None:
        header = Header(src_cid, dst_cid, src_port, dst_port,
                        len(payload) if length is None else length, type_, op, flags,
                        self.buf_alloc, self.fwd_cnt)
        used = self.h.request(queue=TXQ, readable=encode_header(header) + payload)
        assert used.length == 0

    def give_rx(self, count: int = 8, size: int = RX_BUF) -> None:
        for _ in range(count):
            self.h.post(queue=RXQ, writable=size)
        self.collected += self.h.kick(RXQ)

    def packets(self) -> list[tuple[Header, bytes]]:
        self.h.advance(0)
        out = []
        self.collected, collected = [], [*self.collected, *self.h.used(RXQ)]
        for used in collected:
            header = Header._make(HEADER.unpack_from(used.data))
            payload = used.data[HEADER.size:HEADER.size + header.len]
            assert len(used.data) == HEADER.size + header.len
            out.append((header, payload))
        return out


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "v.uds"


@pytest.fixture
def harness(uds: Path) -> Iterator[DeviceHarness]:
    device = VsockDevice(VsockConfig(GUEST, uds, tx_buffer_size=8192))
    with DeviceHarness(device, queue_size=64) as h:
        yield h
    device.close()


def _listen(path: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(path)
    sock.listen(4)
    sock.settimeout(5)
    return sock


def _ops(packets: list[tuple[Header, bytes]]) -> list[str]:
    return [VsockOp(h.op).name for h, _ in packets]


def _connect(driver: Driver, uds: Path, port: int = 80,
             kind: int = socket.SOCK_STREAM) -> socket.socket:
    """The guest's REQUEST to host port ``port``: the host's accepted socket."""
    listener = _listen(f"{uds}_{port}", kind)
    with listener:
        driver.give_rx()
        type_ = VsockType.SEQPACKET if kind == socket.SOCK_SEQPACKET else VsockType.STREAM
        driver.send(VsockOp.REQUEST, dst_port=port, type_=type_)
        (header, _), = driver.packets()
        assert (header.op, header.src_cid, header.dst_cid, header.dst_port) == (
            VsockOp.RESPONSE, 2, GUEST, 1000)
        conn, _ = listener.accept()
    conn.settimeout(5)
    return conn


def test_config_space_and_features(harness: DeviceHarness) -> None:
    """§5.10.4: guest_cid; §5.10.3: STREAM and SEQPACKET offered."""
    assert harness.read_config(0, 8) == GUEST.to_bytes(8, "little")
    device = dev(harness)
    assert device.has_feature(VsockFeature.STREAM) and device.has_feature(VsockFeature.SEQPACKET)


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFFFFFF, 1 << 32])
def test_reserved_cids_are_refused(uds: Path, cid: int) -> None:
    with pytest.raises(ValueError, match="reserved"):
        VsockConfig(cid, uds)


def test_guest_to_host_stream_both_ways(harness: DeviceHarness, uds: Path) -> None:
    driver = Driver(harness)
    host = _connect(driver, uds)
    with host:
        driver.send(VsockOp.RW, payload=b"hello")
        assert host.recv(100) == b"hello"
        host.sendall(b"world")
        harness.fd_readable(host_fd(harness))
        (header, payload), = driver.packets()
        assert (header.op, payload, header.src_port, header.dst_port) == (
            VsockOp.RW, b"world", 80, 1000)
    conn = dev(harness).conns[(1000, 2, 80)]
    assert (conn.bytes_from_guest, conn.bytes_to_guest) == (5, 5)
    details: dict[str, Any] = dev(harness).stats_details()
    (row,) = details["connections"]  # in ``pyvirtio stats``
    assert (row["guest"], row["peer"], row["state"]) == ("3:1000", "2:80", "established")
    assert (row["bytes_from_guest"], row["bytes_to_guest"]) == (5, 5)
    driver.send(VsockOp.RST)
    assert dev(harness).stats_details()["connections"] == []
    assert dev(harness).connections_closed == 1


def dev(harness: DeviceHarness) -> VsockDevice:
    device = harness.device
    assert isinstance(device, VsockDevice)
    return device


def host_fd(harness: DeviceHarness, key: tuple[int, int, int] = (1000, 2, 80)) -> int:
    return dev(harness).conns[key].sock.fileno()


def test_closed_host_port_gets_rst(harness: DeviceHarness) -> None:
    """§5.10.6.4: RST when no one listens on the destination."""
    driver = Driver(harness)
    driver.give_rx()
    driver.send(VsockOp.REQUEST, dst_port=9)
    (header, _), = driver.packets()
    assert (header.op, header.src_port, header.dst_port) == (VsockOp.RST, 9, 1000)
    assert not dev(harness).conns


def test_host_program_connects_to_a_guest_listener(harness: DeviceHarness, uds: Path) -> None:
    """``CONNECT 5000``: a REQUEST to the guest; its RESPONSE gives ``OK <port>``."""
    driver = Driver(harness)
    driver.give_rx()
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5)
    with host:
        host.connect(str(uds))
        harness.fd_readable(dev(harness)._listeners[0][0].fileno())
        host.sendall(b"CONNECT 5000\nearly")
        greeter_fd = next(iter(dev(harness)._greeters))
        harness.fd_readable(greeter_fd)
        (header, _), = driver.packets()
        assert (header.op, header.src_cid, header.dst_port) == (VsockOp.REQUEST, 2, 5000)
        port = header.src_port
        driver.send(VsockOp.RESPONSE, src_port=5000, dst_port=port)
        assert host.recv(100) == f"OK {port}\n".encode()
        (header, payload), = driver.packets()  # what came after the line, first
        assert (header.op, payload) == (VsockOp.RW, b"early")
        driver.send(VsockOp.RW, src_port=5000, dst_port=port, payload=b"from guest")
        assert host.recv(100) == b"from guest"
    table = dev(harness).conns[(5000, 2, port)].describe(GUEST)
    assert table["initiator"] == "host" and table["state"] == "established"


def test_guest_refusing_a_host_connection_closes_it(harness: DeviceHarness, uds: Path) -> None:
    driver = Driver(harness)
    driver.give_rx()
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5)
    with host:
        host.connect(str(uds))
        harness.fd_readable(dev(harness)._listeners[0][0].fileno())
        host.sendall(b"CONNECT 7\n")
        harness.fd_readable(next(iter(dev(harness)._greeters)))
        (header, _), = driver.packets()
        driver.send(VsockOp.RST, src_port=7, dst_port=header.src_port)
        assert host.recv(100) == b""
    assert not dev(harness).conns


@pytest.mark.parametrize(("fields", "kind"), [
    ({"src_cid": 9}, "dropped_bad_cid"),
    ({"dst_cid": GUEST}, "dropped_bad_cid"),
    ({"length": 1 << 30}, "dropped_bad_len"),
    ({"length": 100}, "dropped_bad_len"),
    ({"op": 99}, "dropped_bad_op"),
    ({"op": 0}, "dropped_bad_op"),
])
def test_hostile_headers_are_dropped_and_counted(
    harness: DeviceHarness, uds: Path, fields: dict[str, int], kind: str
) -> None:
    driver = Driver(harness)
    op = fields.pop("op", VsockOp.REQUEST)
    driver.send(op, src_cid=fields.get("src_cid", GUEST), dst_cid=fields.get("dst_cid", 2),
                length=fields.get("length"))
    stats = dev(harness).stats[TXQ]
    assert stats.kinds[kind] == 1 and stats.errors == 1
    assert not dev(harness).conns
    host = _connect(driver, uds)  # still serving
    host.close()


def test_short_header_and_unknown_type(harness: DeviceHarness) -> None:
    driver = Driver(harness)
    driver.give_rx()
    assert harness.request(queue=TXQ, readable=b"\x03" * 20).length == 0
    assert dev(harness).stats[TXQ].kinds["dropped_short_header"] == 1
    driver.send(VsockOp.REQUEST, type_=3)  # DGRAM: not offered -> RST (§5.10.6.3)
    (header, _), = driver.packets()
    assert header.op == VsockOp.RST
    assert dev(harness).stats[TXQ].kinds["dropped_bad_type"] == 1


def test_rx_buffer_smaller_than_a_header_is_a_violation(harness: DeviceHarness) -> None:
    driver = Driver(harness)
    driver.give_rx(1, size=20)
    driver.send(VsockOp.REQUEST, dst_port=9)
    harness.advance(0)
    assert [u.length for u in harness.used(RXQ)] == [0]
    assert dev(harness).stats[RXQ].violations == 1


def test_credit_request_is_answered(harness: DeviceHarness, uds: Path) -> None:
    """§5.10.6.3: CREDIT_REQUEST gets a CREDIT_UPDATE with our buf_alloc and fwd_cnt."""
    driver = Driver(harness)
    host = _connect(driver, uds)
    with host:
        driver.send(VsockOp.RW, payload=b"x" * 100)
        driver.send(VsockOp.CREDIT_REQUEST)
        (header, _), = driver.packets()
        assert (header.op, header.buf_alloc, header.fwd_cnt) == (VsockOp.CREDIT_UPDATE, 8192, 100)


def test_guest_beyond_its_credit_is_reset(harness: DeviceHarness, uds: Path) -> None:
    driver = Driver(harness)
    host = _connect(driver, uds)
    with host:
        host_conn = dev(harness).conns[(1000, 2, 80)]
        host_conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = 0
        while sent < 8192:  # the far side does not read: the device holds up to 8192
            driver.send(VsockOp.RW, payload=b"y" * 4096)
            sent += 4096
        assert host_conn.held() <= 8192
        driver.send(VsockOp.RW, payload=b"z" * 65536)  # beyond what was published
        assert dev(harness).stats[TXQ].kinds["dropped_credit"] == 1
        ops = _ops(driver.packets())
        assert ops[-1] == "RST"
        assert not dev(harness).conns


def test_far_side_slow_reader_back_pressure(harness: DeviceHarness, uds: Path) -> None:
    """Bytes the far socket does not take are held within the credit and flushed when
    it has room; the guest then hears the freed credit."""
    driver = Driver(harness)
    host = _connect(driver, uds)
    with host:
        conn = dev(harness).conns[(1000, 2, 80)]
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = os.urandom(8192)
        got = b""
        for i in range(0, len(data), 2048):
            driver.send(VsockOp.RW, payload=data[i:i + 2048])
        assert conn.held() > 0 and conn.waiting_writable
        while len(got) < len(data):
            got += host.recv(65536)
            harness.advance(0)  # the loop's round: the socket has room again
        assert got == data and conn.held() == 0
        ops = _ops(driver.packets())
        assert "CREDIT_UPDATE" in ops


def test_guest_that_never_reads_stops_the_far_socket(harness: DeviceHarness, uds: Path) -> None:
    """The guest's credit bounds what the device reads: then the socket is not watched,
    the host's writes block, and a CREDIT_REQUEST asks for news."""
    driver = Driver(harness, buf_alloc=10000)
    host = _connect(driver, uds)
    with host:
        host.setblocking(False)
        pushed = 0
        try:
            while True:
                pushed += host.send(b"d" * 65536)
        except BlockingIOError:
            pass
        fd = host_fd(harness)
        harness.fd_readable(fd)
        driver.give_rx(16)
        packets = driver.packets()
        data = sum(len(p) for h, p in packets if h.op == VsockOp.RW)
        assert data == 10000 and "CREDIT_REQUEST" in _ops(packets)
        assert fd not in harness.host.watched  # not read, not polled
        assert pushed > 10000
        driver.fwd_cnt = 10000  # the guest read it all
        driver.send(VsockOp.CREDIT_UPDATE)
        packets = driver.packets()
        assert sum(len(p) for h, p in packets if h.op == VsockOp.RW) == 10000


def test_shutdown_half_close_then_clean_close(harness: DeviceHarness, uds: Path) -> None:
    """§5.10.6.5: SHUTDOWN SEND reaches the host as EOF (it can still answer); the host's
    close reaches the guest as SHUTDOWN SEND; the guest's full shutdown gets an RST."""
    driver = Driver(harness)
    host = _connect(driver, uds)
    with host:
        driver.send(VsockOp.RW, payload=b"question")
        driver.send(VsockOp.SHUTDOWN, flags=ShutdownFlag.SEND)
        assert host.recv(100) == b"question"
        assert host.recv(100) == b""  # EOF: the guest's half-close
        host.sendall(b"answer")
        host.shutdown(socket.SHUT_WR)
        harness.fd_readable(host_fd(harness))
        packets = driver.packets()
        harness.fd_readable(host_fd(harness))  # the EOF, as epoll reports it next
        packets += driver.packets()
        assert [(VsockOp(h.op).name, p, h.flags) for h, p in packets] == [
            ("RW", b"answer", 0), ("SHUTDOWN", b"", ShutdownFlag.SEND)]
        driver.send(VsockOp.SHUTDOWN, flags=ShutdownFlag.SEND | ShutdownFlag.RCV)
        assert _ops(driver.packets()) == ["RST"]
        assert not dev(harness).conns


def test_guest_rst_drops_the_connection(harness: DeviceHarness, uds: Path) -> None:
    driver = Driver(harness)
    host = _connect(driver, uds)
    with host:
        driver.send(VsockOp.RST)
        assert host.recv(10) == b""
    assert not dev(harness).conns


def test_packets_for_unknown_flows_get_rst(harness: DeviceHarness) -> None:
    driver = Driver(harness)
    driver.give_rx()
    driver.send(VsockOp.RW, payload=b"lost")
    driver.send(VsockOp.RST)  # never answered
    assert _ops(driver.packets()) == ["RST"]
    assert dev(harness).stats[TXQ].kinds["no_connection"] == 1


def test_seqpacket_boundaries_both_ways(harness: DeviceHarness, uds: Path) -> None:
    """§5.10.6.6: RW packets up to EOM are one message on the host; a host message is
    split over rx buffers with EOM on the last."""
    driver = Driver(harness)
    host = _connect(driver, uds, kind=socket.SOCK_SEQPACKET)
    seq = VsockType.SEQPACKET
    with host:
        driver.send(VsockOp.RW, payload=b"a" * 3000, type_=seq)
        driver.send(VsockOp.RW, payload=b"b" * 3000, flags=SeqFlag.EOM, type_=seq)
        driver.send(VsockOp.RW, payload=b"c", flags=SeqFlag.EOM | SeqFlag.EOR, type_=seq)
        assert host.recv(1 << 16) == b"a" * 3000 + b"b" * 3000
        assert host.recv(1 << 16) == b"c"
        host.send(b"m" * 10000)
        host.send(b"n")
        harness.fd_readable(host_fd(harness))
        driver.give_rx(8)
        packets = [(h.flags, len(p)) for h, p in driver.packets() if h.op == VsockOp.RW]
        assert packets == [(0, 4096), (0, 4096), (SeqFlag.EOM, 1808), (SeqFlag.EOM, 1)]


def test_a_new_front_end_resets_every_connection(harness: DeviceHarness, uds: Path) -> None:
    driver = Driver(harness)
    host = _connect(driver, uds)
    with host:
        dev(harness).start()
        assert not dev(harness).conns
        assert host.recv(10) == b""


def test_connection_table_command(harness: DeviceHarness, uds: Path) -> None:
    driver = Driver(harness)
    host = _connect(driver, uds)
    answers: list[dict[str, object]] = []
    with host:
        dev(harness).control_commands()["connections"]([], answers.append)
    (answer,) = answers
    assert answer["ok"] is True and answer["guest_cid"] == GUEST
    rows = answer["connections"]
    assert isinstance(rows, list)
    (row,) = rows
    assert row["guest"] == "3:1000" and row["peer"] == "2:80"
    assert row["state"] == State.ESTABLISHED.value and row["type"] == "stream"


def test_siblings_in_one_group_connect_by_cid(tmp_path: Path) -> None:
    """Guest 3 connects to CID 4 port 6000: the other daemon's guest gets the REQUEST from
    3, its RESPONSE reaches guest 3, and bytes flow between them."""
    group = f"unit-{os.getpid()}"
    a = VsockDevice(VsockConfig(3, tmp_path / "a.uds", groups=(group,)))
    b = VsockDevice(VsockConfig(4, tmp_path / "b.uds", groups=(group,)))
    with DeviceHarness(a, queue_size=64) as ha, DeviceHarness(b, queue_size=64) as hb:
        da, db = Driver(ha), Driver(hb)
        da.give_rx()
        db.give_rx()
        da.send(VsockOp.REQUEST, src_port=1111, dst_cid=4, dst_port=6000)
        assert da.packets() == []  # waiting for the sibling's guest
        stream_listener = b._listeners[1][0]
        hb.fd_readable(stream_listener.fileno())
        hb.fd_readable(next(iter(b._greeters)))
        (request, _), = db.packets()
        assert (request.op, request.src_cid, request.src_port, request.dst_port) == (
            VsockOp.REQUEST, 3, 1111, 6000)
        db.send(VsockOp.RESPONSE, src_port=6000, dst_cid=3, dst_port=1111, src_cid=4)
        ha.fd_readable(a.conns[(1111, 4, 6000)].sock.fileno())
        (response, _), = da.packets()
        assert (response.op, response.src_cid, response.src_port) == (VsockOp.RESPONSE, 4, 6000)
        da.send(VsockOp.RW, src_port=1111, dst_cid=4, dst_port=6000, payload=b"ping")
        hb.fd_readable(b.conns[(6000, 3, 1111)].sock.fileno())
        (data, payload), = db.packets()
        assert (data.op, payload, data.src_cid) == (VsockOp.RW, b"ping", 3)
        da.send(VsockOp.REQUEST, src_port=1112, dst_cid=5, dst_port=6000)  # nobody
        assert _ops(da.packets()) == ["RST"]
    a.close()
    b.close()


def test_a_cid_is_claimed_once_per_group(tmp_path: Path) -> None:
    group = f"unit-dup-{os.getpid()}"
    a = VsockDevice(VsockConfig(3, tmp_path / "a.uds", groups=(group,)))
    try:
        with pytest.raises(OSError, match="cannot be claimed"):
            VsockDevice(VsockConfig(3, tmp_path / "b.uds", groups=(group,)))
        assert not (tmp_path / "b.uds").exists()
    finally:
        a.close()


def test_seqpacket_message_bigger_than_the_guest_buffer_resets(
    harness: DeviceHarness, uds: Path
) -> None:
    """Linux hands a seqpacket message over only whole: one beyond the guest's buf_alloc
    could never be delivered, so the connection is reset (counted), not left hanging."""
    driver = Driver(harness, buf_alloc=5000)
    host = _connect(driver, uds, kind=socket.SOCK_SEQPACKET)
    with host:
        host.send(b"m" * 6000)
        harness.fd_readable(host_fd(harness))
        driver.give_rx(4)
        assert _ops(driver.packets()) == ["RST"]
        assert dev(harness).stats[RXQ].kinds["message_too_big"] == 1
        with pytest.raises(ConnectionResetError):  # closed with its message unread
            host.recv(10)


def test_a_guest_that_never_answers_a_host_connect_times_out(
    harness: DeviceHarness, uds: Path
) -> None:
    driver = Driver(harness)
    driver.give_rx()
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5)
    with host:
        host.connect(str(uds))
        harness.fd_readable(dev(harness)._listeners[0][0].fileno())
        host.sendall(b"CONNECT 5000\n")
        harness.fd_readable(next(iter(dev(harness)._greeters)))
        assert _ops(driver.packets()) == ["REQUEST"]
        harness.advance(9)
        assert dev(harness).conns
        harness.advance(2)
        assert _ops(driver.packets()) == ["RST"]
        assert host.recv(10) == b""
    assert dev(harness).stats[TXQ].kinds["connect_timeout"] == 1


def test_pyvirtio_vsock_renders_the_table(harness: DeviceHarness, uds: Path) -> None:
    driver = Driver(harness)
    host = _connect(driver, uds)
    answers: list[dict[str, object]] = []
    with host:
        driver.send(VsockOp.RW, payload=b"12345")
        host.recv(10)
        dev(harness).control_commands()["connections"]([], answers.append)
    lines = render_table(answers[0])
    assert lines[0] == f"guest CID 3, host side {uds}, 1 connection"
    assert lines[1].split() == ["GUEST", "PEER", "TYPE", "BY", "STATE", "TO", "GUEST", "FROM",
                                "GUEST", "HELD"]
    assert lines[2].split() == ["3:1000", "2:80", "stream", "guest", "established", "0", "5",
                                "0"]


def test_a_seqpacket_message_as_big_as_the_credit_reaches_the_host(uds: Path) -> None:
    """Linux refuses a Unix datagram longer than the send buffer (208 KiB by default): the
    far socket's buffer is raised so that a message of the whole credit (256K) fits."""
    device = VsockDevice(VsockConfig(GUEST, uds))  # 256K credit
    with DeviceHarness(device, queue_size=64, buffer_space=4 << 20) as harness:
        driver = Driver(harness)
        host = _connect(driver, uds, kind=socket.SOCK_SEQPACKET)
        with host:
            message = os.urandom(256 * 1024)
            for offset in range(0, len(message), 65536):
                last = offset + 65536 >= len(message)
                driver.send(VsockOp.RW, payload=message[offset:offset + 65536],
                            type_=VsockType.SEQPACKET, flags=SeqFlag.EOM if last else 0)
            assert host.recv(1 << 20) == message
    device.close()


def test_a_second_daemon_on_a_live_uds_path_is_refused(uds: Path, tmp_path: Path) -> None:
    first = VsockDevice(VsockConfig(GUEST, uds))
    try:
        with pytest.raises(OSError, match="already listens"):
            VsockDevice(VsockConfig(4, uds))
        assert uds.exists()
    finally:
        first.close()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(uds))
    stale.close()  # a socket file nobody listens on: replaced
    VsockDevice(VsockConfig(GUEST, uds)).close()
