"""The vhost-user-gpu side protocol (QEMU's docs/interop/vhost-user-gpu.rst) from QEMU's
side of the socket that VHOST_USER_GPU_SET_SOCKET (33) hands the back-end: the
handshake, SCANOUT then UPDATE with the right pixels, coalesced updates when QEMU reads
slowly, cursor messages, and a QEMU that breaks the protocol."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest

from pyvirtio.errors import VhostUserError
from pyvirtio.spec.gpu import (
    CTRL_HDR,
    CURSORQ,
    DISPLAY_ONE,
    MAX_SCANOUTS,
    UPDATE_CURSOR,
    VU_FLAG_REPLY,
    VU_HEADER,
    VU_UPDATE,
    CtrlType,
    GpuFormat,
    VuGpuRequest,
)
from pyvirtio.vhost_user.protocol import Request

from .test_gpu_device import OK, Driver, harness, rgb_of_bgrx

Msg = tuple[int, bytes]


class Qemu:
    """QEMU's end of the display socket."""

    def __init__(self, gpu: Driver) -> None:
        self.gpu = gpu
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        gpu.h.frontend.send(Request.GPU_SET_SOCKET, b"", [theirs.detach()])
        self.buffer = b""

    def messages(self) -> list[Msg]:
        """Everything the back-end sent so far (running its loop until it is done)."""
        out: list[Msg] = []
        self.sock.setblocking(False)
        while True:
            self.gpu.h.host.flush()  # the waits for room (when_writable)
            self.gpu.h.flush()
            try:
                data = self.sock.recv(1 << 22)
            except BlockingIOError:
                if self.gpu.device.link is None or not self.gpu.h.host.writable:
                    break
                continue
            self.buffer += data
        while len(self.buffer) >= 12:
            request, _, size = VU_HEADER.unpack_from(self.buffer)
            if len(self.buffer) < 12 + size:
                break
            out.append((request, self.buffer[12:12 + size]))
            self.buffer = self.buffer[12 + size:]
        return out

    def reply(self, request: int, payload: bytes) -> None:
        self.sock.sendall(VU_HEADER.pack(request, VU_FLAG_REPLY, len(payload)) + payload)
        assert self.gpu.device.link is not None
        self.gpu.h.fd_readable(self.gpu.device.link.sock.fileno())


@pytest.fixture
def gpu() -> Iterator[Driver]:
    with harness() as h:
        yield Driver(h)


def test_handshake_asks_features_and_display_info_and_takes_no_feature(gpu: Driver) -> None:
    qemu = Qemu(gpu)
    assert qemu.messages() == [(VuGpuRequest.GET_PROTOCOL_FEATURES, b""),
                               (VuGpuRequest.GET_DISPLAY_INFO, b"")]
    qemu.reply(VuGpuRequest.GET_PROTOCOL_FEATURES, struct.pack("=Q", 3))
    assert qemu.messages() == [(VuGpuRequest.SET_PROTOCOL_FEATURES, bytes(8))]
    info = CTRL_HDR.pack(CtrlType.RESP_OK_DISPLAY_INFO, 0, 0, 0, 0) + DISPLAY_ONE.pack(
        0, 0, 800, 600, 1, 0) + bytes(DISPLAY_ONE.size * (MAX_SCANOUTS - 1))
    qemu.reply(VuGpuRequest.GET_DISPLAY_INFO, info)
    link = gpu.device.link
    assert link is not None and link.qemu_protocol_features == 3
    assert link.qemu_display_info is not None
    assert (link.qemu_display_info[0].width, link.qemu_display_info[0].height) == (800, 600)


def test_scanout_then_update_carry_the_guest_pixels(gpu: Driver) -> None:
    qemu = Qemu(gpu)
    qemu.messages()
    _, pixels = gpu.framebuffer(1, 32, 20)
    messages = qemu.messages()
    assert messages[0] == (VuGpuRequest.SCANOUT, struct.pack("=III", 0, 32, 20))
    updates = [payload for request, payload in messages if request == VuGpuRequest.UPDATE]
    assert len(updates) == 2  # SET_SCANOUT's, then the flush's (the socket had room)
    for update in updates:
        assert VU_UPDATE.unpack_from(update) == (0, 0, 0, 32, 20)
        assert update[VU_UPDATE.size:] == pixels
    # a partial flush sends only its rectangle
    assert gpu.flush(1, 4, 3, 5, 2) == OK
    ((request, payload),) = qemu.messages()
    assert request == VuGpuRequest.UPDATE and VU_UPDATE.unpack_from(payload) == (0, 4, 3, 5, 2)
    rows = [pixels[(3 + y) * 128 + 16:(3 + y) * 128 + 36] for y in range(2)]
    assert payload[VU_UPDATE.size:] == b"".join(rows)


def test_a_socket_set_later_gets_the_current_screen(gpu: Driver) -> None:
    _, pixels = gpu.framebuffer(1, 16, 16)
    qemu = Qemu(gpu)
    messages = qemu.messages()
    assert [r for r, _ in messages] == [VuGpuRequest.GET_PROTOCOL_FEATURES,
                                        VuGpuRequest.GET_DISPLAY_INFO, VuGpuRequest.SCANOUT,
                                        VuGpuRequest.UPDATE]
    assert messages[-1][1][VU_UPDATE.size:] == pixels


def test_updates_coalesce_while_qemu_does_not_read(gpu: Driver) -> None:
    qemu = Qemu(gpu)
    qemu.messages()
    assert gpu.device.link is not None
    gpu.device.link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    gpu.framebuffer(1, 256, 256)  # 256 KiB: the socket fills
    for _ in range(50):
        assert gpu.flush(1, 0, 0, 256, 256) == OK
        assert gpu.flush(1, 10, 10, 1, 1) == OK
    link = gpu.device.link
    assert link is not None and link.updates == 1  # the rest wait as one pending update
    updates = [p for r, p in qemu.messages() if r == VuGpuRequest.UPDATE]
    assert len(updates) == 2
    assert VU_UPDATE.unpack_from(updates[1]) == (0, 0, 0, 256, 256)


def test_update_after_a_resize_follows_the_new_scanout(gpu: Driver) -> None:
    qemu = Qemu(gpu)
    gpu.framebuffer(1, 64, 32)
    qemu.messages()
    assert gpu.scanout(0, 1, 0, 0, 32, 16) == OK
    messages = qemu.messages()
    assert messages[0] == (VuGpuRequest.SCANOUT, struct.pack("=III", 0, 32, 16))
    assert VU_UPDATE.unpack_from(messages[1][1]) == (0, 0, 0, 32, 16)
    assert gpu.unref(1) == OK
    assert qemu.messages() == [(VuGpuRequest.SCANOUT, struct.pack("=III", 0, 0, 0))]


def test_cursor_update_move_and_hide(gpu: Driver) -> None:
    qemu = Qemu(gpu)
    qemu.messages()
    gpa = gpu.pages(64 * 64 * 4)
    image = bytes(range(256)) * 64
    gpu.memory.write(gpa, image)
    assert gpu.create(9, 64, 64, GpuFormat.B8G8R8A8_UNORM) == OK
    assert gpu.attach(9, [(gpa, len(image))]) == OK
    assert gpu.transfer(9, 0, 0, 64, 64) == OK
    for ctype, resource in ((CtrlType.CMD_UPDATE_CURSOR, 9), (CtrlType.CMD_MOVE_CURSOR, 9),
                            (CtrlType.CMD_UPDATE_CURSOR, 0)):
        assert gpu.status(ctype, UPDATE_CURSOR.pack(0, 100, 50, resource, 3, 4),
                          queue=CURSORQ) == OK
    messages = qemu.messages()
    assert messages == [
        (VuGpuRequest.CURSOR_UPDATE, struct.pack("=IIIII", 0, 100, 50, 3, 4) + image),
        (VuGpuRequest.CURSOR_POS, struct.pack("=III", 0, 100, 50)),
        (VuGpuRequest.CURSOR_POS_HIDE, struct.pack("=III", 0, 100, 50)),
    ]


def test_qemu_closing_the_socket_ends_the_link_and_the_device_goes_on(gpu: Driver) -> None:
    qemu = Qemu(gpu)
    qemu.messages()
    link = gpu.device.link
    assert link is not None
    qemu.sock.close()
    gpu.h.fd_readable(link.sock.fileno())
    assert gpu.device.link is None and link.closed
    _, pixels = gpu.framebuffer(1, 16, 16)
    assert rgb_of_bgrx(pixels) == rgb_of_bgrx(bytes(gpu.device.resources.get(1).pixels))


def test_an_oversized_reply_from_qemu_ends_the_link(gpu: Driver) -> None:
    qemu = Qemu(gpu)
    qemu.messages()
    qemu.sock.sendall(VU_HEADER.pack(VuGpuRequest.GET_DISPLAY_INFO, VU_FLAG_REPLY, 1 << 20))
    link = gpu.device.link
    assert link is not None
    gpu.h.fd_readable(link.sock.fileno())
    assert gpu.device.link is None


def test_set_socket_without_a_socket_fd_breaks_the_protocol(gpu: Driver) -> None:
    with pytest.raises(VhostUserError, match="fds"):
        gpu.h.frontend.send(Request.GPU_SET_SOCKET, b"")
    read, write = os.pipe()
    os.close(write)
    with pytest.raises(VhostUserError, match="not a socket"):
        gpu.h.frontend.send(Request.GPU_SET_SOCKET, b"", [read])
