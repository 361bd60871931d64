"""virtio-rng through the vhost-user back-end (VIRTIO 1.4 §5.4 Entropy Device)."""

from __future__ import annotations

import logging

import pytest

from pyvirtio.devices.rng import MAX_FILL, RngDevice
from pyvirtio.testing import Frontend, FrontendFactory
from pyvirtio.vhost_user.protocol import Request, encode_config

SENTINEL = 0xAA


@pytest.fixture
def rng(make_frontend: FrontendFactory) -> Frontend:
    fe = make_frontend(RngDevice())
    fe.start()
    return fe


def post(fe: Frontend, *lengths: int) -> tuple[int, list[int]]:
    """Post one chain of device-writable buffers pre-filled with a sentinel."""
    gpas = []
    for n in lengths:
        gpa = fe.alloc(n)
        fe.memory.write(gpa, bytes([SENTINEL]) * n)
        gpas.append(gpa)
    head = fe.drivers[0].add(writable=list(zip(gpas, lengths, strict=True)))
    return head, gpas


def test_rng_fills_every_writable_buffer_with_random_bytes(rng: Frontend) -> None:
    head, (a, b) = post(rng, 64, 100)
    assert rng.kick() == [(head, 164)]
    first, second = rng.memory.read(a, 64), rng.memory.read(b, 100)
    # 64 bytes from a CSPRNG: never all one value, and never equal to another draw.
    assert len(set(first)) > 1
    assert len(set(second)) > 1
    assert first != second[:64]
    assert rng.backend.device.stats[0].bytes_in == 164


def test_rng_answers_each_request_with_fresh_bytes(rng: Frontend) -> None:
    head1, (a,) = post(rng, 32)
    head2, (b,) = post(rng, 32)
    assert rng.kick() == [(head1, 32), (head2, 32)]
    assert rng.memory.read(a, 32) != rng.memory.read(b, 32)


def test_rng_caps_one_request_at_max_fill(rng: Frontend) -> None:
    """§5.4.6.2 lets the device fill less than offered; the used length says how much."""
    head, (a, b) = post(rng, MAX_FILL - 100, 4196)
    assert rng.kick() == [(head, MAX_FILL)]
    tail = rng.memory.read(b, 4196)
    assert len(set(tail[:100])) > 1  # the first 100 bytes of the second buffer are filled
    assert tail[100:] == bytes([SENTINEL]) * 4096  # the rest is untouched
    assert len(set(rng.memory.read(a, MAX_FILL - 100))) > 1


def test_rng_zero_length_request_gets_zero_bytes(rng: Frontend) -> None:
    head, _ = post(rng, 0)
    assert rng.kick() == [(head, 0)]


def test_rng_counts_readable_buffers_as_a_violation_but_still_fills(
    rng: Frontend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pyvirtio")
    readable = rng.put(b"not for an rng")
    out = rng.alloc(16)
    head = rng.drivers[0].add(readable=[(readable, 14)], writable=[(out, 16)])
    assert rng.kick() == [(head, 16)]
    assert rng.memory.read(readable, 14) == b"not for an rng"  # never written
    assert rng.backend.device.stats[0].violations == 1
    assert "§5.4.6.1" in caplog.text


def test_rng_has_no_config_space_and_one_queue(rng: Frontend) -> None:
    device = rng.backend.device
    assert device.num_queues == 1
    assert device.config_space() == b""
    assert device.device_features() == 0
    reply = rng.call(Request.GET_CONFIG, encode_config(0, 8, 0, bytes(8)))
    assert reply[12:] == bytes(8)
