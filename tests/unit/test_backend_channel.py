"""The back-end request channel and what user-mode Linux's front-end needs.

vhost-user.rst "Back-end communication" (BACKEND_REQ, SET_BACKEND_REQ_FD,
CONFIG_CHANGE_MSG, VRING_CALL), "In-band notifications" (VRING_KICK),
REPLY_ACK's ack flags, and SET_MEM_TABLE with more region slots than regions
(UML always sends two).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.client import control_path, send_control
from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.rng import RngDevice
from pyvirtio.errors import (
    BackendChannelError,
    BadPayloadSize,
    BadRingState,
    MissingFds,
    NoBackendChannel,
    UnknownRequest,
    VhostUserError,
)
from pyvirtio.memory import RegionSpec
from pyvirtio.runtime import Server
from pyvirtio.spec.virtqueue import PACKED_DESC, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
from pyvirtio.testing import (
    FRONTEND_GPA,
    FRONTEND_RAM,
    Frontend,
    FrontendFactory,
    GuestFactory,
    ring_addresses,
)
from pyvirtio.vhost_user.backend import VhostUserBackend
from pyvirtio.vhost_user.channel import ACK_FLAGS, BackendChannel
from pyvirtio.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    HEADER,
    MEM_TABLE_HEADER,
    REGION,
    U64,
    VERSION,
    VRING_NOFD_MASK,
    BackendRequest,
    Message,
    ProtocolFeature,
    Request,
    decode_mem_table,
    encode,
    encode_config,
    encode_mem_table,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.packed import encode_vring_base

from .test_packed_backend import BASE_FEATURES, PACKED, Front

TIMEOUT = 5.0
UML_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.BACKEND_REQ)
    | (1 << ProtocolFeature.CONFIG)
)
INBAND = 1 << ProtocolFeature.INBAND_NOTIFICATIONS


def uml_mem_table(regions: list[RegionSpec], slots: int = 2) -> bytes:
    """SET_MEM_TABLE as user-mode Linux sends it: always ``slots`` region slots."""
    payload = encode_mem_table(regions)
    return payload + bytes(REGION.size * (slots - len(regions)))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- SET_MEM_TABLE with spare slots ----------------------------------------------------------


def test_mem_table_with_a_spare_slot_as_uml_sends_it_decodes_the_used_region() -> None:
    region = RegionSpec(0x3BFAE000, 0xF579000, 0x3BFAE000, 0xA87000)
    payload = uml_mem_table([region])
    assert len(payload) == 72  # what virtio_uml always sends
    assert decode_mem_table(Message(Request.SET_MEM_TABLE, VERSION, payload)) == [region]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (MEM_TABLE_HEADER.pack(2, 0) + bytes(REGION.size), "2 regions, but the payload"),
        (MEM_TABLE_HEADER.pack(1, 0) + bytes(REGION.size * 9), "9 region slots, at most 8"),
        (MEM_TABLE_HEADER.pack(1, 0) + bytes(REGION.size + 8), "not a header of 8 and whole"),
        (MEM_TABLE_HEADER.pack(0, 0)[:6], "not a header"),
    ],
)
def test_mem_table_with_slots_must_still_be_well_formed(payload: bytes, match: str) -> None:
    with pytest.raises(BadPayloadSize, match=match) as info:
        decode_mem_table(Message(Request.SET_MEM_TABLE, VERSION, payload))
    assert info.value.request == "SET_MEM_TABLE"


# -- REPLY_ACK ---------------------------------------------------------------------------------


def test_ack_of_a_need_reply_message_has_flags_exactly_version_and_reply(
    make_frontend: FrontendFactory,
) -> None:
    """virtio_uml refuses an ack whose flags are not exactly 0x5 (version 1 | reply)."""
    fe = make_frontend(RngDevice())
    fe.negotiate(protocol_features=UML_PROTOCOL_FEATURES)
    reply = fe.send(Request.SET_OWNER, need_reply=True)
    assert reply is not None
    assert HEADER.unpack_from(reply) == (Request.SET_OWNER, 0x5, 8)
    assert U64.unpack_from(reply, HEADER.size) == (0,)


def test_uml_handshake_with_two_slot_mem_table_is_acked_with_success(
    make_frontend: FrontendFactory,
) -> None:
    fe = make_frontend(RngDevice())
    fe.negotiate(protocol_features=UML_PROTOCOL_FEATURES)
    ours, theirs = socket.socketpair()
    try:
        assert fe.ack(Request.SET_BACKEND_REQ_FD, fds=[os.dup(theirs.fileno())]) == 0
        payload = uml_mem_table(fe.guest.specs)
        assert fe.ack(Request.SET_MEM_TABLE, payload, [os.dup(fd) for fd in fe.guest.fds]) == 0
        assert [r.guest_addr for r in fe.backend.memory.regions] == [FRONTEND_GPA]
    finally:
        ours.close()
        theirs.close()


# -- SET_BACKEND_REQ_FD ------------------------------------------------------------------------


def test_backend_req_is_offered_and_the_fd_becomes_the_channel(
    make_frontend: FrontendFactory,
) -> None:
    fe = make_frontend(RngDevice())
    fe.negotiate(protocol_features=UML_PROTOCOL_FEATURES)
    assert fe.backend.protocol_features_offered >> ProtocolFeature.BACKEND_REQ & 1
    assert not fe.backend.protocol_features_offered & INBAND  # not unless asked for
    fd = os.eventfd(0)
    assert fe.ack(Request.SET_BACKEND_REQ_FD, fds=[fd]) == 0
    channel = fe.backend.channel
    assert channel is not None and channel.reply_ack and not channel.inband_notifications
    assert is_open(fd)
    fe.backend.disconnect()
    assert fe.backend.channel is None
    assert channel.closed
    assert not is_open(fd)


def test_backend_req_fd_without_backend_req_negotiated_is_refused_and_its_fd_closed(
    make_frontend: FrontendFactory,
) -> None:
    fe = make_frontend(RngDevice())
    fe.negotiate(protocol_features=1 << ProtocolFeature.REPLY_ACK)
    fd = os.eventfd(0)
    with pytest.raises(UnknownRequest, match="without BACKEND_REQ negotiated"):
        fe.send(Request.SET_BACKEND_REQ_FD, fds=[fd], need_reply=True)
    assert not is_open(fd)
    assert fe.backend.channel is None


def test_backend_req_fd_without_an_fd_is_refused(make_frontend: FrontendFactory) -> None:
    fe = make_frontend(RngDevice())
    fe.negotiate(protocol_features=UML_PROTOCOL_FEATURES)
    with pytest.raises(MissingFds):
        fe.send(Request.SET_BACKEND_REQ_FD)


def test_config_change_without_a_channel_is_a_clear_error(
    make_frontend: FrontendFactory,
) -> None:
    fe = make_frontend(RngDevice())
    fe.negotiate(protocol_features=1 << ProtocolFeature.REPLY_ACK)
    with pytest.raises(NoBackendChannel, match="no back-end request channel"):
        fe.backend.config_changed()


# -- the channel on a real socketpair ----------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    theirs.settimeout(TIMEOUT)
    yield ours, theirs
    ours.close()
    theirs.close()


def channel_on(sock: socket.socket, *, reply_ack: bool = True,
               inband: bool = False) -> BackendChannel:
    return BackendChannel(reply_ack=reply_ack, inband_notifications=inband,
                          transport=sock.sendall)


def read_message(sock: socket.socket) -> tuple[int, int, bytes]:
    request, flags, size = HEADER.unpack(sock.recv(HEADER.size, socket.MSG_WAITALL))
    payload = sock.recv(size, socket.MSG_WAITALL) if size else b""
    return request, flags, payload


def answer(sock: socket.socket, request: int, status: int = 0, *, flags: int = ACK_FLAGS,
           payload: bytes | None = None) -> None:
    body = encode_u64(status) if payload is None else payload
    sock.sendall(HEADER.pack(request, flags, len(body)) + body)


def test_config_change_asks_for_an_ack_and_hands_it_to_the_callback(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = channel_on(ours)
    acks: list[int | None] = []
    assert channel.config_changed(acks.append) is True
    assert read_message(theirs) == (BackendRequest.CONFIG_CHANGE_MSG, VERSION | FLAG_NEED_REPLY,
                                    b"")
    assert channel.pending == 1
    answer(theirs, BackendRequest.CONFIG_CHANGE_MSG)
    channel.receive(ours.recv(64))
    assert acks == [0]
    assert channel.pending == 0 and channel.acked == 1


def test_config_change_without_reply_ack_asks_for_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = channel_on(ours, reply_ack=False)
    assert channel.config_changed() is False
    assert read_message(theirs) == (BackendRequest.CONFIG_CHANGE_MSG, VERSION, b"")
    assert channel.pending == 0


def test_answers_split_across_reads_are_reassembled(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = channel_on(ours)
    acks: list[int | None] = []
    channel.config_changed(acks.append)
    channel.config_changed(acks.append)
    data = (HEADER.pack(BackendRequest.CONFIG_CHANGE_MSG, ACK_FLAGS, 8) + encode_u64(0)
            + HEADER.pack(BackendRequest.CONFIG_CHANGE_MSG, ACK_FLAGS, 8) + encode_u64(3))
    for i in range(0, len(data), 7):
        channel.receive(data[i : i + 7])
    assert acks == [0, 3]
    assert [read_message(theirs)[0] for _ in range(2)] == [BackendRequest.CONFIG_CHANGE_MSG] * 2


def test_vring_call_needs_inband_notifications(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    with pytest.raises(BackendChannelError, match="INBAND_NOTIFICATIONS"):
        channel_on(ours).vring_call(0)
    channel = channel_on(ours, inband=True)
    channel.vring_call(2)
    assert read_message(theirs) == (BackendRequest.VRING_CALL, VERSION,
                                    encode_vring_state(2, 0))


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (dict(flags=VERSION), "answer flags 0x1, expected 0x5"),
        (dict(flags=ACK_FLAGS | FLAG_NEED_REPLY), "answer flags 0xd"),
        (dict(flags=ACK_FLAGS | 0x100), "answer flags 0x105"),
        (dict(payload=b"\0" * 4), "answer payload of 4 bytes"),
        (dict(payload=b"\0" * 4000), "answer payload of 4000 bytes"),
        (dict(request=BackendRequest.VRING_CALL), "answer for request 4"),
    ],
)
def test_a_malformed_answer_closes_the_channel_with_a_clean_error(
    pair: tuple[socket.socket, socket.socket], reply: dict[str, object], match: str
) -> None:
    ours, theirs = pair
    channel = channel_on(ours)
    acks: list[int | None] = []
    channel.config_changed(acks.append)
    request = reply.pop("request", BackendRequest.CONFIG_CHANGE_MSG)
    answer(theirs, request, **reply)  # type: ignore[arg-type]
    with pytest.raises(BackendChannelError, match=match):
        channel.receive(ours.recv(8192))
    assert channel.closed
    assert acks == [None]  # the awaited answer will not come
    with pytest.raises(NoBackendChannel):
        channel.config_changed()


def test_an_answer_nobody_asked_for_is_an_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    channel = channel_on(ours)
    answer(theirs, BackendRequest.CONFIG_CHANGE_MSG)
    with pytest.raises(BackendChannelError, match="no answer was awaited"):
        channel.receive(ours.recv(64))


def test_hang_up_with_an_answer_awaited_is_reported(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = pair
    channel = channel_on(ours)
    acks: list[int | None] = []
    channel.config_changed(acks.append)
    channel.receive(HEADER.pack(BackendRequest.CONFIG_CHANGE_MSG, ACK_FLAGS, 8)[:5])
    with pytest.raises(BackendChannelError, match=r"1 answer\(s\) awaited, 5 bytes into one"):
        channel.eof()
    assert acks == [None]


def test_a_send_that_fails_closes_the_channel(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.close()
    channel = channel_on(ours)
    with pytest.raises(BackendChannelError, match="cannot send"):
        channel.config_changed()
    assert channel.closed


# -- in-band notifications ---------------------------------------------------------------------


def inband_frontend(make_guest: GuestFactory) -> tuple[Frontend, socket.socket, socket.socket]:
    backend = VhostUserBackend(RngDevice(), inband_notifications=True)
    fe = Frontend(backend, make_guest(((FRONTEND_GPA, FRONTEND_RAM),)))
    fe.negotiate(protocol_features=UML_PROTOCOL_FEATURES | INBAND)
    ours, theirs = socket.socketpair()
    assert fe.ack(Request.SET_BACKEND_REQ_FD, fds=[os.dup(theirs.fileno())]) == 0
    assert backend.channel is not None
    backend.channel.transport = theirs.sendall  # as the runtime's watcher does
    fe.set_mem_table()
    return fe, ours, theirs


def test_inband_kicks_and_calls_are_messages(make_guest: GuestFactory) -> None:
    fe, ours, theirs = inband_frontend(make_guest)
    try:
        driver = fe.setup_queue(0, 16)
        # Kick and call fds: none (VHOST_USER_VRING_NOFD_MASK); the ring still starts.
        fe.send(Request.SET_VRING_CALL, encode_u64(VRING_NOFD_MASK))
        assert fe.ack(Request.SET_VRING_KICK, encode_u64(VRING_NOFD_MASK)) == 0
        assert fe.backend.queue_ready(0)
        head = driver.add(writable=[(fe.alloc(32), 32)])
        assert fe.ack(Request.VRING_KICK, encode_vring_state(0, 0)) == 0
        assert driver.get_used() == [(head, 32)]
        ours.settimeout(TIMEOUT)
        request, flags, payload = read_message(ours)
        assert (request, flags, payload) == (BackendRequest.VRING_CALL, VERSION,
                                             encode_vring_state(0, 0))
        with pytest.raises(BadRingState, match="reserved num field is 1"):
            fe.send(Request.VRING_KICK, encode_vring_state(0, 1))
    finally:
        fe.backend.disconnect()
        fe.close()
        ours.close()
        theirs.close()


def test_a_strict_violation_without_an_err_fd_is_an_inband_vring_err(
    make_guest: GuestFactory,
) -> None:
    """vhost-user.rst, SET_VRING_ERR: with in-band notifications VRING_ERR on the back-end
    channel flags a vring error; --strict sends it on the first violation."""
    fe, ours, theirs = inband_frontend(make_guest)
    try:
        fe.backend.engine.strict = True
        driver = fe.setup_queue(0, 16)
        fe.send(Request.SET_VRING_CALL, encode_u64(VRING_NOFD_MASK))
        assert fe.ack(Request.SET_VRING_KICK, encode_u64(VRING_NOFD_MASK)) == 0
        driver.set_avail_idx(100)  # §2.7.6: more than a queue ahead
        assert fe.ack(Request.VRING_KICK, encode_vring_state(0, 0)) == 0
        assert fe.backend.needs_reset
        ours.settimeout(TIMEOUT)
        assert read_message(ours) == (BackendRequest.VRING_ERR, VERSION,
                                      encode_vring_state(0, 0))
    finally:
        fe.backend.disconnect()
        fe.close()
        ours.close()
        theirs.close()


def test_the_first_inband_kick_starts_a_ring_that_got_no_set_vring_kick(
    make_guest: GuestFactory,
) -> None:
    """user-mode Linux with in-band kicks sends neither SET_VRING_KICK nor SET_VRING_CALL."""
    fe, ours, theirs = inband_frontend(make_guest)
    try:
        addrs = ring_addresses(FRONTEND_GPA + 0x1000, 16)
        driver = DriverSplitQueue(fe.memory, 16, addrs, event_idx=False)
        fe.send(Request.SET_VRING_NUM, encode_vring_state(0, 16))
        fe.send(Request.SET_VRING_BASE, encode_vring_state(0, 0))
        fe.send(Request.SET_VRING_ADDR, encode_vring_addr(fe.vring_addr(0, addrs)))
        fe.send(Request.SET_VRING_ENABLE, encode_vring_state(0, 1))
        assert not fe.backend.queue_ready(0)
        head = driver.add(writable=[(fe.alloc(8), 8)])
        assert fe.ack(Request.VRING_KICK, encode_vring_state(0, 0)) == 0
        assert fe.backend.queue_ready(0)
        assert driver.get_used() == [(head, 8)]
        ours.settimeout(TIMEOUT)
        assert read_message(ours)[0] == BackendRequest.VRING_CALL
    finally:
        fe.backend.disconnect()
        fe.close()
        ours.close()
        theirs.close()


def test_vring_kick_without_inband_notifications_is_refused(
    make_frontend: FrontendFactory,
) -> None:
    fe = make_frontend(RngDevice())
    fe.negotiate(protocol_features=UML_PROTOCOL_FEATURES)
    with pytest.raises(UnknownRequest, match="VRING_KICK without INBAND_NOTIFICATIONS"):
        fe.send(Request.VRING_KICK, encode_vring_state(0, 0))
    with pytest.raises(BadRingState, match="polling mode"):
        fe.send(Request.SET_VRING_KICK, encode_u64(VRING_NOFD_MASK))


def test_inband_notifications_without_backend_req_and_reply_ack_is_refused() -> None:
    backend = VhostUserBackend(RngDevice(), inband_notifications=True)
    msg = Message(Request.SET_PROTOCOL_FEATURES, VERSION,
                  encode_u64(INBAND | (1 << ProtocolFeature.REPLY_ACK)))
    error = backend.handle(msg).error
    assert isinstance(error, VhostUserError)
    assert "without BACKEND_REQ and REPLY_ACK" in str(error)


# -- the runtime: resize over the control socket, CONFIG_CHANGE_MSG on the channel ----------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_resize_grows_the_image_and_waits_for_the_front_ends_ack(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyvirtio")
    image = sock_dir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    path = sock_dir / "blk.sock"
    server = Server(path, BlockDevice(BlockConfig(image=image)), control_path=control_path(path))
    server.listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    conn.settimeout(TIMEOUT)
    ours, theirs = socket.socketpair()
    ours.settimeout(TIMEOUT)
    try:
        features = UML_PROTOCOL_FEATURES
        conn.sendall(encode(Request.SET_PROTOCOL_FEATURES, encode_u64(features)))
        socket.send_fds(conn, [encode(Request.SET_BACKEND_REQ_FD, flags=FLAG_NEED_REPLY)],
                        [theirs.fileno()])
        theirs.close()
        assert conn.recv(20, socket.MSG_WAITALL) == encode(
            Request.SET_BACKEND_REQ_FD, encode_u64(0), reply=True)
        answers: list[str] = []
        asker = threading.Thread(
            target=lambda: answers.append(send_control(control_path(path), "resize 2097152")))
        asker.start()
        # The front-end gets CONFIG_CHANGE_MSG asking for an answer; meanwhile the daemon
        # still answers the main socket (QEMU re-reads the config before it acks).
        assert read_message(ours) == (BackendRequest.CONFIG_CHANGE_MSG,
                                      VERSION | FLAG_NEED_REPLY, b"")
        conn.sendall(encode(Request.GET_CONFIG, encode_config(0, 8, 0, bytes(8))))
        reply = conn.recv(HEADER.size + 12 + 8, socket.MSG_WAITALL)
        assert int.from_bytes(reply[-8:], "little") == 4096  # the new capacity, in sectors
        assert not answers  # no answer before the front-end acked
        answer(ours, BackendRequest.CONFIG_CHANGE_MSG)
        asker.join(TIMEOUT)
        result = json.loads(answers[0])
        assert result["ok"] and result["notified"] == "acked"
        assert result["size"] == 2 << 20 and result["previous_size"] == 1 << 20
        assert image.stat().st_size == 2 << 20
        shrink = json.loads(send_control(control_path(path), "resize 1048576"))
        assert not shrink["ok"] and "shrinking is not supported" in shrink["error"]
    finally:
        conn.close()
        ours.close()
        server.stop()
        thread.join(TIMEOUT)


# -- packed rings started with base 0 (user-mode Linux) ----------------------------------------


def test_packed_ring_started_with_base_0_as_uml_sends_it_is_a_fresh_ring() -> None:
    """virtio_uml sends SET_VRING_BASE 0 for packed rings too; its driver starts in wrap 1."""
    front = Front(RngDevice())
    try:
        front.negotiate(BASE_FEATURES | PACKED)
        front.set_mem_table()
        driver = front.packed_ring(0, 8, base=0)
        head = driver.add(writable=[(front.alloc(16), 16)])
        front.kick()
        assert driver.get_used() == [(head, 16)]
        assert front.get_vring_base(0) == encode_vring_base(1, 1, 1, 1)
    finally:
        front.close()


def test_packed_ring_base_0_after_a_used_lap_is_kept() -> None:
    """Base 0 is also a ring whose first lap was used (descriptor 0 has USED set)."""
    front = Front(RngDevice())
    try:
        front.negotiate(BASE_FEATURES | PACKED)
        front.set_mem_table()
        addrs = front.packed_addresses(0, 8)
        front.memory.write(addrs.desc, PACKED_DESC.pack(0, 16, 0, VIRTQ_DESC_F_AVAIL
                                                       | VIRTQ_DESC_F_USED))
        front.start_ring(0, 8, (addrs.desc, addrs.driver, addrs.device), base=0)
        assert front.get_vring_base(0) == 0
    finally:
        front.close()


@given(chunks=st.lists(st.binary(max_size=40), max_size=8), pending=st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_garbage_on_the_channel_gives_only_channel_errors(
    chunks: list[bytes], pending: int
) -> None:
    """Whatever the front-end writes back, the channel raises nothing but its own error."""
    sent: list[bytes] = []
    channel = BackendChannel(reply_ack=True, transport=sent.append)
    acks: list[int | None] = []
    for _ in range(pending):
        channel.config_changed(acks.append)
    try:
        for chunk in chunks:
            channel.receive(chunk)
        channel.eof()
    except BackendChannelError:
        assert channel.closed
    assert len(acks) == pending  # every awaited answer reached its callback, or None did
