"""Device state for migration: SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE (vhost-user.rst
"Migrating back-end state") between two back-ends, over real pipes."""

from __future__ import annotations

import os
import threading

import pytest

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.rng import RngDevice
from pyvirtio.errors import UnknownRequest, VhostUserError
from pyvirtio.testing import Frontend, FrontendFactory
from pyvirtio.vhost_user.backend import INVALID_FD_FLAG, VhostUserBackend
from pyvirtio.vhost_user.protocol import (
    U64,
    VRING_STATE,
    ProtocolFeature,
    Request,
    TransferDirection,
)
from pyvirtio.virtqueue.chain import DescriptorChain


class Counter(VirtioDevice):
    """Counts the requests it answers; the count is its state (a pickle-free format)."""

    device_id = 0x3FFE
    supports_state = True

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        #: Whatever the test wants carried along (a large state).
        self.note = b""

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        self.count += 1
        return 0

    def save_state(self) -> bytes:
        return b"count=%d\n" % self.count + self.note

    def load_state(self, data: bytes) -> None:
        line, _, note = data.partition(b"\n")
        key, _, value = line.partition(b"=")
        if key != b"count" or not value.isdigit():
            raise ValueError(f"not a counter state: {data[:40]!r}")
        self.count, self.note = int(value), note


def _negotiated(make_frontend: FrontendFactory, device: VirtioDevice) -> Frontend:
    fe = make_frontend(device)
    fe.negotiate()
    return fe


def _transfer(fe: Frontend, direction: TransferDirection, fd: int) -> int:
    reply = fe.call(Request.SET_DEVICE_STATE_FD, VRING_STATE.pack(direction, 0), [fd])
    value: int = U64.unpack(reply)[0]
    return value


def _check(fe: Frontend) -> int:
    value: int = U64.unpack(fe.call(Request.CHECK_DEVICE_STATE))[0]
    return value


def test_device_state_is_offered_only_by_devices_that_have_one() -> None:
    for device, offered in ((Counter(), 1), (RngDevice(), 0)):
        backend = VhostUserBackend(device)
        try:
            assert backend.protocol_features_offered >> ProtocolFeature.DEVICE_STATE & 1 == offered
        finally:
            backend.close()


def test_state_saved_on_the_source_is_loaded_by_the_destination(
    make_frontend: FrontendFactory,
) -> None:
    source_device = Counter()
    source_device.count = 41
    source = _negotiated(make_frontend, source_device)
    r, w = os.pipe2(os.O_CLOEXEC)
    # Saving: the back-end writes into the front-end's pipe; the front-end reads to EOF.
    assert _transfer(source, TransferDirection.SAVE, w) == INVALID_FD_FLAG
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    assert _check(source) == 0
    assert data == b"count=41\n"

    destination_device = Counter()
    destination = _negotiated(make_frontend, destination_device)
    r, w = os.pipe2(os.O_CLOEXEC)
    assert _transfer(destination, TransferDirection.LOAD, r) == INVALID_FD_FLAG
    os.write(w, data)
    os.close(w)
    assert _check(destination) == 0
    assert destination_device.count == 41


def test_a_state_larger_than_a_pipe_buffer_does_not_block_the_back_end(
    make_frontend: FrontendFactory,
) -> None:
    device = Counter()
    device.note = bytes(200_000)  # more than a pipe holds (64 KiB)
    fe = _negotiated(make_frontend, device)
    r, w = os.pipe2(os.O_CLOEXEC)
    assert _transfer(fe, TransferDirection.SAVE, w) == INVALID_FD_FLAG  # returns at once
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(_read_all(r)))
    reader.start()
    assert _check(fe) == 0
    reader.join(10)
    assert received[0] == b"count=0\n" + bytes(200_000)


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return data


def test_a_state_the_device_refuses_fails_the_check(make_frontend: FrontendFactory) -> None:
    device = Counter()
    fe = _negotiated(make_frontend, device)
    r, w = os.pipe2(os.O_CLOEXEC)
    _transfer(fe, TransferDirection.LOAD, r)
    os.write(w, b"garbage from a front-end")
    os.close(w)
    assert _check(fe) == 1
    assert device.count == 0


def test_check_without_a_transfer_fails(make_frontend: FrontendFactory) -> None:
    fe = _negotiated(make_frontend, Counter())
    assert _check(fe) == 1


@pytest.mark.parametrize(
    ("direction", "phase", "match"),
    [(2, 0, "unknown transfer direction 2"), (0, 1, "unknown migration phase 1")],
)
def test_transfer_parameters_the_protocol_does_not_define_are_refused_and_the_fd_closed(
    make_frontend: FrontendFactory, direction: int, phase: int, match: str
) -> None:
    fe = _negotiated(make_frontend, Counter())
    r, w = os.pipe2(os.O_CLOEXEC)
    with pytest.raises(VhostUserError, match=match):
        fe.send(Request.SET_DEVICE_STATE_FD, VRING_STATE.pack(direction, phase), [w])
    with pytest.raises(OSError):
        os.fstat(w)  # the back-end owned it and closed it
    os.close(r)


def test_device_state_requests_without_the_protocol_feature_are_refused(
    make_frontend: FrontendFactory,
) -> None:
    fe = make_frontend(Counter())
    offered = fe.backend.protocol_features_offered & ~(1 << ProtocolFeature.DEVICE_STATE)
    fe.negotiate(protocol_features=offered)
    r, w = os.pipe2(os.O_CLOEXEC)
    with pytest.raises(UnknownRequest, match="without DEVICE_STATE negotiated"):
        fe.send(Request.SET_DEVICE_STATE_FD, VRING_STATE.pack(0, 0), [w])
    os.close(r)
    with pytest.raises(UnknownRequest, match="without DEVICE_STATE negotiated"):
        fe.send(Request.CHECK_DEVICE_STATE)
