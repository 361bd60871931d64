"""The runtime's DeviceHost hooks with a real net device: a frame arriving on the
device's own switch socket is pushed into the receive queue by the event loop."""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.cli import main
from pyvirtio.client import send_control
from pyvirtio.devices.net import NetDevice, NetDeviceConfig
from pyvirtio.devices.net.switch import SwitchPort
from pyvirtio.devices.rng import RngDevice
from pyvirtio.runtime import Server
from pyvirtio.spec.net import HDR_SIZE, NetHeader
from pyvirtio.testing import (
    FRONTEND_GPA,
    FRONTEND_RAM,
    NOT_SPLIT_FEATURES,
    GuestFactory,
    ring_addresses,
)
from pyvirtio.vhost_user.protocol import (
    ProtocolFeature,
    Request,
    VringAddr,
    encode_mem_table,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from pyvirtio.virtqueue.driver_split import DriverSplitQueue

from .test_runtime import TIMEOUT, Client

MAC = bytes.fromhex("020000000001")


@pytest.fixture
def net_server(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[Server, Path]]:
    caplog.set_level(logging.INFO, logger="pyvirtio")
    sock_dir = Path(tempfile.mkdtemp(prefix="pv-"))  # sun_path is limited to 108 bytes
    port = SwitchPort("rt", sock_dir)
    server = Server(sock_dir / "net.sock", NetDevice(NetDeviceConfig(mac=MAC), port))
    server.listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, sock_dir
    server.stop()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert not port.path.exists()  # the device closed its switch port
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_frame_from_the_switch_fills_a_posted_receive_buffer_and_signals_the_driver(
    net_server: tuple[Server, Path], make_guest: GuestFactory
) -> None:
    server, folder = net_server
    guest = make_guest(((FRONTEND_GPA, FRONTEND_RAM),))
    client = Client(server.socket_path)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    peer = SwitchPort("rt", folder)
    try:
        offered = client.u64(Request.GET_FEATURES)
        client.send(Request.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.REPLY_ACK))
        assert client.ack(Request.SET_FEATURES, encode_u64(offered & ~NOT_SPLIT_FEATURES)) == 0
        assert client.ack(Request.SET_MEM_TABLE, encode_mem_table(guest.specs), guest.fds) == 0
        addrs = ring_addresses(FRONTEND_GPA + 0x1000, 8)
        driver = DriverSplitQueue(guest.memory, 8, addrs, event_idx=True)
        vring_addr = VringAddr(
            index=0, flags=0,
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
        head = driver.add(writable=[(buf, 1526)])
        os.eventfd_write(kick, 1)  # buffers posted, no frame yet: nothing is used
        assert select.select([call], [], [], 0.2)[0] == []
        assert driver.get_used() == []

        frame = b"\xff" * 6 + bytes.fromhex("020000000002") + b"\x08\x06" + os.urandom(46)
        peer.send(frame)  # broadcast: flooded to the device's port
        assert select.select([call], [], [], TIMEOUT)[0] == [call], "no receive notification"
        assert driver.get_used() == [(head, HDR_SIZE + len(frame))]
        assert NetHeader.unpack(guest.memory.read(buf, HDR_SIZE)).num_buffers == 1
        assert guest.memory.read(buf + HDR_SIZE, len(frame)) == frame
    finally:
        peer.close()
        client.close()
        os.close(kick)
        os.close(call)


def test_link_commands_close_and_reopen_the_vhost_user_socket(tmp_path: Path) -> None:
    """`pyvirtio link` talks to SOCKET.ctl: down removes the socket, up listens again."""
    sock = tmp_path / "net.sock"
    control = tmp_path / "net.sock.ctl"
    server = Server(sock, RngDevice(), control_path=control, link_commands=True)
    server.listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert send_control(control, "link") == "link up"
        assert send_control(control, "link down") == "link down"
        assert not sock.exists()
        assert send_control(control, "link down") == "link down"  # idempotent
        assert send_control(control, "link up") == "link up"
        assert sock.exists()
        assert send_control(control, "link sideways").startswith("error: unknown command")
        answer = json.loads(send_control(control, "reboot"))
        assert answer["ok"] is False
        assert answer["error"].startswith("reboot is not a command of this device (RngDevice")
    finally:
        server.stop()
        thread.join(10)
    assert not sock.exists() and not control.exists()


def test_stats_command_answers_every_queue_as_json_and_link_is_only_for_net(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pyvirtio stats SOCKET` reads the counters over SOCKET.ctl, for any device."""
    sock = tmp_path / "rng.sock"
    device = RngDevice()
    server = Server(sock, device, control_path=tmp_path / "rng.sock.ctl")
    server.listen()
    device.stats[0].requests = 7
    device.stats[0].kinds["short reads"] = 2
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        snapshot = json.loads(send_control(tmp_path / "rng.sock.ctl", "stats"))
        assert snapshot["connected"] is False and snapshot["connections"] == 0
        assert snapshot["queues"] == [{"queue": 0, "requests": 7, "bytes_to_guest": 0,
                                       "bytes_from_guest": 0, "errors": 0, "violations": 0,
                                       "kinds": {"short reads": 2}}]
        assert main(["stats", str(sock), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["queues"][0]["requests"] == 7
        assert main(["stats", str(sock)]) == 0
        assert "queue 0: 7 requests" in capsys.readouterr().out
        answer = send_control(tmp_path / "rng.sock.ctl", "link down")
        assert answer == "error: link commands are for net devices" and sock.exists()
    finally:
        server.stop()
        thread.join(10)
    assert main(["stats", str(sock)]) == 1  # nobody there any more
