"""The runtime: a real Unix-socket server in a background thread, real clients.

A front-end that breaks the protocol gets a clear error in the log and its
connection dropped; the next front-end is served as if nothing happened.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.client import control_path, send_control
from pyvirtio.devices.base import ControlCommand, ControlReply
from pyvirtio.devices.rng import RngDevice
from pyvirtio.memory import RegionSpec
from pyvirtio.runtime import Server, prepare_socket_path
from pyvirtio.spec.common import Feature
from pyvirtio.testing import (
    FRONTEND_GPA,
    FRONTEND_RAM,
    NOT_SPLIT_FEATURES,
    GuestFactory,
    ring_addresses,
)
from pyvirtio.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    U64,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
    VringAddr,
    encode_mem_table,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from pyvirtio.virtqueue.driver_split import DriverSplitQueue

TIMEOUT = 5.0


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (sun_path is limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Running:
    server: Server
    path: Path
    thread: threading.Thread

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "server did not stop"


def start_server(path: Path) -> Running:
    server = Server(path, RngDevice())
    server.listen()
    thread = threading.Thread(target=server.serve_forever, name="pyvirtio-server", daemon=True)
    thread.start()
    return Running(server, path, thread)


@pytest.fixture
def running(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Running]:
    caplog.set_level(logging.INFO, logger="pyvirtio")
    run = start_server(sock_dir / "rng.sock")
    yield run
    if run.thread.is_alive():
        run.stop()


class Client:
    """A minimal front-end speaking raw vhost-user over the socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Connect blocking: with a timeout, a Unix socket whose (one-entry) backlog
        # is momentarily full fails with EAGAIN instead of waiting.
        self.sock.connect(str(path))
        self.sock.settimeout(TIMEOUT)

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        need_reply: bool = False,
        size: int | None = None,
    ) -> None:
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        data = HEADER.pack(request, flags, len(payload) if size is None else size) + payload
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "server closed the connection instead of replying"
            buf += chunk
        return buf

    def reply(self, request: int) -> bytes:
        code, flags, size = HEADER.unpack(self._recv_exact(HEADER.size))
        assert code == request
        assert flags & FLAG_REPLY
        return self._recv_exact(size)

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        self.send(request, payload, fds)
        return self.reply(request)

    def u64(self, request: int) -> int:
        value: int = U64.unpack(self.call(request))[0]
        return value

    def ack(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        self.send(request, payload, fds, need_reply=True)
        value: int = U64.unpack(self.reply(request))[0]
        return value

    def closed_by_server(self) -> bool:
        """Wait for the server to close its end (EOF); False on timeout."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True  # closed with our unread bytes in its buffer
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def served_normally(path: Path) -> None:
    """A new connection is answered: GET_FEATURES gets its reply."""
    client = Client(path)
    try:
        features = client.u64(Request.GET_FEATURES)
        assert features & VHOST_USER_F_PROTOCOL_FEATURES
        assert features & (1 << Feature.VERSION_1)
    finally:
        client.close()


def error_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- malformed front-ends ---------------------------------------------------------------------


def test_truncated_header_then_close_is_logged_and_the_next_front_end_served(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(running.path)
    client.sock.sendall(HEADER.pack(Request.GET_FEATURES, VERSION, 0)[:5])
    client.sock.shutdown(socket.SHUT_WR)
    assert client.closed_by_server()
    client.close()
    assert any(
        "protocol error" in m and "connection closed 5 bytes into a message" in m
        for m in error_records(caplog)
    ), caplog.text
    served_normally(running.path)


def test_wrong_size_field_is_logged_and_the_connection_dropped(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(running.path)
    client.send(Request.SET_FEATURES, b"\0" * 4)  # a u64 request with 4 bytes
    assert client.closed_by_server()
    client.close()
    assert any(
        "SET_FEATURES: payload is 4 bytes, expected 8" in m for m in error_records(caplog)
    ), caplog.text
    served_normally(running.path)


def test_size_field_beyond_the_limit_is_refused_without_reading_on(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(running.path)
    client.send(Request.SET_CONFIG, b"", size=1 << 30)
    assert client.closed_by_server()
    client.close()
    assert any("exceeds 4096" in m for m in error_records(caplog)), caplog.text
    served_normally(running.path)


def test_unknown_request_is_logged_and_the_connection_dropped(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(running.path)
    client.send(999, b"whatever")
    assert client.closed_by_server()
    client.close()
    assert any("unknown request code 999" in m for m in error_records(caplog)), caplog.text
    served_normally(running.path)


def test_mem_table_without_fds_is_nacked_logged_and_dropped(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(running.path)
    client.send(Request.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.REPLY_ACK))
    payload = encode_mem_table([RegionSpec(0, 0x1000, 0x7F00_0000_0000, 0)])
    status = client.ack(Request.SET_MEM_TABLE, payload)
    assert status == 1  # REPLY_ACK failure before the drop
    assert client.closed_by_server()
    client.close()
    assert any("SET_MEM_TABLE" in m and "needs 1 fds, got 0" in m for m in error_records(caplog)), (
        caplog.text
    )
    served_normally(running.path)


def test_clean_hang_up_resets_the_back_end_for_the_next_front_end(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(running.path)
    client.send(Request.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.REPLY_ACK))
    assert client.ack(Request.SET_OWNER) == 0
    client.sock.shutdown(socket.SHUT_WR)
    assert client.closed_by_server()
    client.close()
    assert "front-end disconnected; waiting for the next front-end" in caplog.text
    assert error_records(caplog) == []
    # The next front-end starts from scratch: no REPLY_ACK unless it negotiates it.
    client = Client(running.path)
    try:
        client.send(Request.SET_OWNER, need_reply=True)
        assert client.u64(Request.GET_QUEUE_NUM) == 1  # the first reply is this one
    finally:
        client.close()
    assert running.server.connections == 2


# -- a whole session over the socket ----------------------------------------------------------


def test_session_over_the_socket_serves_kicks_and_signals_calls(
    running: Running, make_guest: GuestFactory
) -> None:
    """Memory and eventfds travel as SCM_RIGHTS; the server polls the kick fd itself."""
    guest = make_guest(((FRONTEND_GPA, FRONTEND_RAM),))
    client = Client(running.path)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        offered = client.u64(Request.GET_FEATURES)
        client.send(Request.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.REPLY_ACK))
        features = offered & ~NOT_SPLIT_FEATURES
        assert client.ack(Request.SET_FEATURES, encode_u64(features)) == 0
        assert client.ack(Request.SET_MEM_TABLE, encode_mem_table(guest.specs), guest.fds) == 0

        addrs = ring_addresses(FRONTEND_GPA + 0x1000, 8)
        driver = DriverSplitQueue(guest.memory, 8, addrs, event_idx=True)
        vring_addr = VringAddr(
            index=0,
            flags=0,
            desc_user_addr=guest.user_addr(addrs.desc),
            used_user_addr=guest.user_addr(addrs.used),
            avail_user_addr=guest.user_addr(addrs.avail),
            log_guest_addr=0,
        )
        assert client.ack(Request.SET_VRING_NUM, encode_vring_state(0, 8)) == 0
        assert client.ack(Request.SET_VRING_ADDR, encode_vring_addr(vring_addr)) == 0
        assert client.ack(Request.SET_VRING_CALL, encode_u64(0), [call]) == 0
        assert client.ack(Request.SET_VRING_KICK, encode_u64(0), [kick]) == 0
        assert client.ack(Request.SET_VRING_ENABLE, encode_vring_state(0, 1)) == 0

        buf = FRONTEND_GPA + 0x40000
        guest.memory.write(buf, b"\xaa" * 32)
        head = driver.add(writable=[(buf, 32)])
        assert driver.should_kick()
        os.eventfd_write(kick, 1)
        readable, _, _ = select.select([call], [], [], TIMEOUT)
        assert readable == [call], "no used-buffer notification"
        assert os.eventfd_read(call) == 1
        assert driver.get_used() == [(head, 32)]
        assert guest.memory.read(buf, 32) != b"\xaa" * 32

        state = client.call(Request.GET_VRING_BASE, encode_vring_state(0, 0))
        assert state == encode_vring_state(0, 1)
    finally:
        client.close()
        os.close(kick)
        os.close(call)


# -- the socket file --------------------------------------------------------------------------


def test_socket_file_is_removed_after_stop(running: Running) -> None:
    assert running.path.exists()
    served_normally(running.path)
    running.stop()
    assert not running.path.exists()


def test_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a killed daemon leaves its socket file behind
    assert path.exists()
    run = start_server(path)
    try:
        served_normally(path)
    finally:
        run.stop()
    assert not path.exists()


def test_live_socket_is_not_stolen(running: Running) -> None:
    with pytest.raises(FileExistsError, match="another server is listening"):
        prepare_socket_path(running.path)
    second = Server(running.path, RngDevice())
    try:
        with pytest.raises(FileExistsError):
            second.listen()
    finally:
        second.close()
    assert running.path.exists()
    served_normally(running.path)


def test_path_that_is_not_a_socket_is_refused_and_left_alone(sock_dir: Path) -> None:
    path = sock_dir / "precious.txt"
    path.write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a socket"):
        prepare_socket_path(path)
    assert path.read_text() == "do not delete"


def test_missing_socket_path_is_fine(sock_dir: Path) -> None:
    prepare_socket_path(sock_dir / "new.sock")  # nothing to remove, no error
    assert not (sock_dir / "new.sock").exists()


def test_second_front_end_waits_until_the_first_leaves(running: Running) -> None:
    """One front-end at a time: a second connection is answered only after the first hangs up."""
    first = Client(running.path)
    try:
        assert first.u64(Request.GET_QUEUE_NUM) == 1
        second = Client(running.path)
        try:
            second.send(Request.GET_QUEUE_NUM)
            second.sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                second.sock.recv(1)
            second.sock.settimeout(TIMEOUT)
            first.close()
            assert second.reply(Request.GET_QUEUE_NUM) == encode_u64(1)
        finally:
            second.close()
    finally:
        first.close()
    assert running.server.connections == 2


class Writer(RngDevice):
    """Fills a socket until it is full, then waits for room with ``when_writable``
    (control command ``fill``); ``status`` tells how far it got."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.room_calls = 0
        self.sent = 0

    def control_commands(self) -> dict[str, ControlCommand]:
        return {"fill": self._fill, "status": self._status}

    def _fill(self, args: list[str], reply: ControlReply) -> None:
        self._write_until_full()
        assert self.host is not None
        self.host.when_writable(self.sock.fileno(), self._room)
        reply({"ok": True, "sent": self.sent})

    def _write_until_full(self) -> None:
        while True:
            try:
                self.sent += self.sock.send(bytes(4096))
            except BlockingIOError:
                return

    def _room(self) -> None:
        self.room_calls += 1

    def _status(self, args: list[str], reply: ControlReply) -> None:
        reply({"ok": True, "room_calls": self.room_calls, "sent": self.sent})


def test_a_device_waiting_for_room_is_called_once_when_its_socket_drains(
    sock_dir: Path,
) -> None:
    """DeviceHost.when_writable: one call from the loop once the peer reads, none before."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    server = Server(sock_dir / "w.sock", Writer(ours), control_path=control_path(
        sock_dir / "w.sock"))
    server.listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ctl = control_path(sock_dir / "w.sock")
    try:
        filled = json.loads(send_control(ctl, "fill"))
        assert filled["ok"] and filled["sent"] > 0
        assert json.loads(send_control(ctl, "status"))["room_calls"] == 0  # still full
        theirs.setblocking(False)
        drained = 0
        while drained < filled["sent"]:
            try:
                drained += len(theirs.recv(1 << 20))
            except BlockingIOError:
                select.select([theirs], [], [], TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while json.loads(send_control(ctl, "status"))["room_calls"] == 0:
            assert time.monotonic() < deadline, "no call when the socket had room"
            time.sleep(0.01)
        time.sleep(0.05)
        assert json.loads(send_control(ctl, "status"))["room_calls"] == 1  # once
    finally:
        server.stop()
        thread.join(TIMEOUT)
        ours.close()
        theirs.close()
