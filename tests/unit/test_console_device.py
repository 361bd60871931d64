"""virtio-console (VIRTIO 1.4 §5.3) served in-process: the MULTIPORT handshake, data
both ways through real Unix sockets, back-pressure, resize and malformed control
messages."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.console import ConsoleConfig, ConsoleDevice, PortSpec
from pyvirtio.devices.console.entry import CONSOLE_TYPE
from pyvirtio.spec.console import (
    CONFIG,
    CONTROL,
    RESIZE,
    ConsoleFeature,
    ControlEvent,
    port_queues,
    queue_count,
)
from pyvirtio.testing import DeviceHarness

CTRL_RX, CTRL_TX = 2, 3


@pytest.fixture
def device(tmp_path: Path) -> Iterator[ConsoleDevice]:
    config = ConsoleConfig(console_socket=tmp_path / "con.sock",
                           ports=(PortSpec("org.pyvirtio.data", tmp_path / "data.sock"),),
                           cols=100, rows=40)
    made = ConsoleDevice(config)
    yield made
    made.close()


def control(port: int, event: ControlEvent, value: int = 0) -> bytes:
    return CONTROL.pack(port, event, value)


def messages(harness: DeviceHarness) -> list[tuple[int, str, int, bytes]]:
    out = []
    for used in harness.used(CTRL_RX):
        ident, event, value = CONTROL.unpack_from(used.data)
        out.append((ident, ControlEvent(event).name, value, used.data[CONTROL.size:]))
    return out


def handshake(harness: DeviceHarness, buffers: int = 12) -> list[tuple[int, str, int, bytes]]:
    """What Linux's virtio_console does at probe: DEVICE_READY, then PORT_READY per port."""
    for _ in range(buffers):
        harness.post(CTRL_RX, writable=4096)
    harness.kick(CTRL_RX)
    assert harness.request(CTRL_TX, control(0xFFFFFFFF, ControlEvent.DEVICE_READY, 1)).length == 0
    seen = messages(harness)
    for ident, _event, _value, _extra in list(seen):
        harness.request(CTRL_TX, control(ident, ControlEvent.PORT_READY, 1))
    return seen + messages(harness)


def connect(harness: DeviceHarness, device: ConsoleDevice, port: int) -> socket.socket:
    """A host client on ``port``'s socket, accepted by the device."""
    path = device.ports[port].path
    assert path is not None
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    listener = device.ports[port].listener
    assert listener is not None
    harness.fd_readable(listener.fileno())
    assert device.ports[port].client is not None
    return client


def test_config_space_has_the_size_and_max_nr_ports_and_the_features_are_offered(
    device: ConsoleDevice,
) -> None:
    """§5.3.4: cols, rows, max_nr_ports, emerg_wr; §5.3.3: SIZE, MULTIPORT, EMERG_WRITE."""
    assert device.num_queues == queue_count(2) == 6
    with DeviceHarness(device) as harness:
        assert CONFIG.unpack(harness.read_config(0, 12)) == (100, 40, 2, 0)
        for bit in ConsoleFeature:
            assert device.has_feature(bit)
    assert CONSOLE_TYPE.decode_config is not None
    assert CONSOLE_TYPE.decode_config(device.config_space()) == {
        "cols": 100, "rows": 40, "max_nr_ports": 2, "emerg_wr": 0}


def test_device_ready_adds_every_port_and_port_ready_names_and_sizes_them(
    device: ConsoleDevice,
) -> None:
    """§5.3.6.2: DEVICE_ADD per port; CONSOLE_PORT and RESIZE for port 0, PORT_NAME for
    a named port; no PORT_OPEN while no host client is connected."""
    with DeviceHarness(device) as harness:
        seen = handshake(harness)
        assert seen[:2] == [(0, "DEVICE_ADD", 0, b""), (1, "DEVICE_ADD", 0, b"")]
        assert (0, "CONSOLE_PORT", 1, b"") in seen
        assert (0, "RESIZE", 0, RESIZE.pack(100, 40)) in seen  # cols, rows (§5.3.6.2)
        assert (1, "PORT_NAME", 0, b"org.pyvirtio.data") in seen
        assert not [m for m in seen if m[1] == "PORT_OPEN"]
        connect(harness, device, 1)
        assert messages(harness) == [(1, "PORT_OPEN", 1, b"")]


def test_guest_output_reaches_the_host_socket_and_waits_while_no_client_is_there(
    device: ConsoleDevice,
) -> None:
    rx0, tx0 = port_queues(0)
    with DeviceHarness(device) as harness:
        handshake(harness)
        head = harness.post(tx0, readable=[b"hello ", b"hvc0\n"])
        assert harness.kick(tx0) == []  # no host client: the chain stays in the ring
        client = connect(harness, device, 0)
        used = harness.used(tx0)
        assert [(u.head, u.length) for u in used] == [(head, 0)]
        assert client.recv(100) == b"hello hvc0\n"
        client.sendall(b"typed\n")
        harness.post(rx0, writable=64)
        harness.kick(rx0)
        assert harness.used(rx0) == []  # not readable yet: the device was not woken
        assert device.ports[0].client is not None
        harness.fd_readable(device.ports[0].client.fileno())
        assert [u.data for u in harness.used(rx0)] == [b"typed\n"]
        client.close()


def test_named_port_input_waits_until_the_guest_opens_the_port(device: ConsoleDevice) -> None:
    """Linux discards data reaching a port the guest has closed: it waits in the socket."""
    rx1, _tx1 = port_queues(1)
    with DeviceHarness(device) as harness:
        handshake(harness)
        client = connect(harness, device, 1)
        client.sendall(b"early")
        harness.post(rx1, writable=16)
        assert device.ports[1].client is not None
        harness.fd_readable(device.ports[1].client.fileno())
        assert harness.used(rx1) == []
        harness.request(CTRL_TX, control(1, ControlEvent.PORT_OPEN, 1))
        assert [u.data for u in harness.used(rx1)] == [b"early"]
        client.close()


def test_a_slow_host_client_holds_output_back_without_losing_any(device: ConsoleDevice) -> None:
    """Back-pressure: a chain the socket takes in part is held, the next ones wait."""
    _rx1, tx1 = port_queues(1)
    with DeviceHarness(device, queue_size=64) as harness:
        handshake(harness)
        client = connect(harness, device, 1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        chunks = [bytes([i]) * 16384 for i in range(40)]
        heads = [harness.post(tx1, readable=chunk) for chunk in chunks]
        used = [u.head for u in harness.kick(tx1)]
        assert len(used) < len(heads)  # the socket is full: output held back
        received = bytearray()
        for _ in range(10000):
            used += [u.head for u in harness.used(tx1)]
            try:
                received += client.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                harness.advance(0.01)
            if len(received) == sum(map(len, chunks)):
                break
        harness.advance(0.01)
        used += [u.head for u in harness.used(tx1)]
        assert bytes(received) == b"".join(chunks)
        assert device.ports[1].pending is None
        assert sorted(used) == sorted(heads)
        client.close()


def test_resize_changes_the_config_space_and_sends_a_resize_message(
    device: ConsoleDevice,
) -> None:
    with DeviceHarness(device) as harness:
        handshake(harness)
        answers: list[dict[str, object]] = []
        device.control_commands()["console-size"](["132", "43"], answers.append)
        assert answers[0]["ok"] and (answers[0]["cols"], answers[0]["rows"]) == (132, 43)
        assert messages(harness) == [(0, "RESIZE", 0, RESIZE.pack(132, 43))]
        assert CONFIG.unpack(harness.read_config(0, 12))[:2] == (132, 43)
        device.control_commands()["console-size"](["x"], answers.append)
        assert not answers[1]["ok"]
        device.control_commands()["console"]([], answers.append)
        assert answers[2]["path"] == str(device.ports[0].path)


@pytest.mark.parametrize("bad", [
    b"\x01",
    b"\x00" * 7,
    control(0, ControlEvent.DEVICE_ADD),  # a device-to-driver event
    control(0, ControlEvent.PORT_OPEN, 7),  # value neither 0 nor 1
    control(9, ControlEvent.PORT_READY, 1),  # no such port
    CONTROL.pack(0, 99, 0),  # no such event
])
def test_a_malformed_control_message_is_counted_and_the_device_keeps_serving(
    device: ConsoleDevice, bad: bytes
) -> None:
    with DeviceHarness(device) as harness:
        handshake(harness)
        assert harness.request(CTRL_TX, bad).length == 0
        assert device.stats[CTRL_TX].kinds["malformed"] == 1
        assert device.stats[CTRL_TX].errors == 1
        client = connect(harness, device, 1)  # still serving: PORT_OPEN goes out
        assert messages(harness) == [(1, "PORT_OPEN", 1, b"")]
        client.close()


def test_emergency_write_puts_a_character_out_on_port_0(device: ConsoleDevice) -> None:
    """§5.3.5: a write to emerg_wr (offset 8) is a character for port 0."""
    with DeviceHarness(device) as harness:
        client = connect(harness, device, 0)
        assert harness.write_config(8, b"!\0\0\0")
        assert not harness.write_config(0, b"\x01\x00")
        assert client.recv(10) == b"!"
        client.close()


def test_the_host_client_going_away_closes_the_port_and_output_waits_again(
    device: ConsoleDevice,
) -> None:
    rx1, tx1 = port_queues(1)
    with DeviceHarness(device) as harness:
        handshake(harness)
        client = connect(harness, device, 1)
        messages(harness)
        client.close()
        harness.post(rx1, writable=16)
        harness.request(CTRL_TX, control(1, ControlEvent.PORT_OPEN, 1))
        assert device.ports[1].client is not None
        harness.fd_readable(device.ports[1].client.fileno())
        harness.advance(0)
        assert device.ports[1].client is None
        assert messages(harness) == [(1, "PORT_OPEN", 0, b"")]
        harness.post(tx1, readable=b"later")
        assert harness.kick(tx1) == []
        again = connect(harness, device, 1)
        assert [u.length for u in harness.used(tx1)] == [0]
        assert again.recv(10) == b"later"
        again.close()
