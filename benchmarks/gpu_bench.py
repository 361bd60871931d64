"""Full-screen frame rate of ``pyvirtio serve gpu`` against QEMU's C ``vhost-user-gpu``.

This process plays both the guest driver and QEMU, so that neither a TCG guest nor
QEMU's display is the bottleneck:

- the driver side is pyvirtio's vhost-user front-end (shared memfd RAM, the controlq
  and cursorq rings): it creates a 1280x800 B8G8R8X8 resource backed by one
  contiguous 4000 KiB range, shows it on scanout 0, then repeats ``TRANSFER_TO_HOST_2D``
  of the whole screen and ``RESOURCE_FLUSH`` of the whole screen, each waited for;
- the QEMU side is a thread on the vhost-user-gpu socket handed over with
  ``VHOST_USER_GPU_SET_SOCKET``: it answers GET_PROTOCOL_FEATURES (none) and
  GET_DISPLAY_INFO (1280x800) and reads every UPDATE as fast as it can.

For each back-end and round: full-screen flushes per second (transfer + flush
completed), frames delivered to "QEMU" per second (UPDATE bytes / 4000 KiB: pyvirtio
coalesces updates QEMU has not read yet, the C back-end sends every one), and the
back-end's CPU time per flush (``/proc/PID/stat``).  The back-ends run alternately
(pyvirtio, C, pyvirtio, C...) with a fresh daemon each round, and the ratio of the
medians is printed.  The machine is shared: read the ratio, not the absolute figures.

Usage: ``python benchmarks/gpu_bench.py [--frames N] [--rounds N] [--width W --height H]
[--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pyvirtio.frontend.connection import GuestRam, VhostUserFrontend
from pyvirtio.guestkit.assets import ensure_tool
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.spec.common import Feature
from pyvirtio.spec.gpu import (
    CTRL_HDR,
    DISPLAY_ONE,
    MAX_SCANOUTS,
    MEM_ENTRY,
    RESOURCE_ATTACH_BACKING,
    RESOURCE_CREATE_2D,
    RESOURCE_FLUSH,
    SET_SCANOUT,
    TRANSFER_TO_HOST_2D,
    VU_FLAG_REPLY,
    VU_HEADER,
    CtrlType,
    GpuFormat,
    VuGpuRequest,
)
from pyvirtio.vhost_user.protocol import Request

C_BACKEND = "/usr/lib/qemu/vhost-user-gpu"


class FakeQemu(threading.Thread):
    """QEMU's end of the display socket: answers the handshake, swallows updates."""

    def __init__(self, sock: socket.socket, width: int, height: int) -> None:
        super().__init__(daemon=True)
        self.sock, self.width, self.height = sock, width, height
        self.update_bytes = 0
        self.updates = 0
        self.last = time.monotonic()

    def _reply(self, request: int, payload: bytes) -> None:
        self.sock.sendall(VU_HEADER.pack(request, VU_FLAG_REPLY, len(payload)) + payload)

    def run(self) -> None:
        buffer = bytearray(16 << 20)
        view = memoryview(buffer)
        have = 0
        while True:
            try:
                got = self.sock.recv_into(view[have:])
            except OSError:
                return
            if not got:
                return
            have += got
            self.last = time.monotonic()
            while have >= VU_HEADER.size:
                request, _, size = VU_HEADER.unpack_from(buffer)
                if have < VU_HEADER.size + size:
                    break
                if request == VuGpuRequest.GET_PROTOCOL_FEATURES:
                    self._reply(request, struct.pack("=Q", 0))
                elif request == VuGpuRequest.GET_DISPLAY_INFO:
                    info = CTRL_HDR.pack(CtrlType.RESP_OK_DISPLAY_INFO, 0, 0, 0, 0)
                    info += DISPLAY_ONE.pack(0, 0, self.width, self.height, 1, 0)
                    self._reply(request, info + bytes(DISPLAY_ONE.size * (MAX_SCANOUTS - 1)))
                elif request == VuGpuRequest.UPDATE:
                    self.updates += 1
                    self.update_bytes += size - 20
                end = VU_HEADER.size + size
                buffer[:have - end] = buffer[end:have]
                have -= end


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drive(socket_path: Path, pid: int, frames: int, width: int, height: int) -> dict[str, Any]:
    """One connection: set up, then ``frames`` full-screen transfer+flush pairs."""
    frontend = VhostUserFrontend.connect(socket_path)
    size = width * height * 4
    ram = GuestRam(size + (4 << 20))
    try:
        frontend.probe()
        frontend.negotiate(1 << Feature.VERSION_1)
        frontend.share_memory(ram)
        controlq = frontend.setup_queue(0, 64)
        frontend.setup_queue(1, 64)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        qemu = FakeQemu(ours, width, height)
        qemu.start()
        frontend.send(Request.GPU_SET_SOCKET, b"", [theirs.fileno()])
        theirs.close()
        frontend.driver_ok()
        pixels = ram.alloc(size, 4096)
        ram.view(pixels, size)[:] = bytes(range(256)) * (size // 256)
        request, response = ram.alloc(4096), ram.alloc(4096)

        def command(ctype: int, body: bytes) -> None:
            data = CTRL_HDR.pack(ctype, 0, 0, 0, 0) + body
            ram.view(request, len(data))[:] = data
            controlq.submit([(request, len(data))], [(response, 24)], timeout=30,
                            what=CtrlType(ctype).name)
            answer = CTRL_HDR.unpack_from(ram.view(response, 24))[0]
            if answer != CtrlType.RESP_OK_NODATA:
                raise RuntimeError(f"{CtrlType(ctype).name}: {answer:#x}")

        command(CtrlType.CMD_RESOURCE_CREATE_2D,
                RESOURCE_CREATE_2D.pack(1, GpuFormat.B8G8R8X8_UNORM, width, height))
        command(CtrlType.CMD_RESOURCE_ATTACH_BACKING,
                RESOURCE_ATTACH_BACKING.pack(1, 1) + MEM_ENTRY.pack(pixels, size))
        command(CtrlType.CMD_SET_SCANOUT, SET_SCANOUT.pack(0, 0, width, height, 0, 1))
        transfer = TRANSFER_TO_HOST_2D.pack(0, 0, width, height, 0, 1)
        flush = RESOURCE_FLUSH.pack(0, 0, width, height, 1)
        command(CtrlType.CMD_TRANSFER_TO_HOST_2D, transfer)
        command(CtrlType.CMD_RESOURCE_FLUSH, flush)
        while time.monotonic() - qemu.last < 0.3:
            time.sleep(0.05)
        before_bytes, cpu0, start = qemu.update_bytes, _cpu_seconds(pid), time.perf_counter()
        for _ in range(frames):
            command(CtrlType.CMD_TRANSFER_TO_HOST_2D, transfer)
            command(CtrlType.CMD_RESOURCE_FLUSH, flush)
        elapsed = time.perf_counter() - start
        while time.monotonic() - qemu.last < 0.3:  # let the display side finish
            time.sleep(0.05)
        drained = time.perf_counter() - start
        cpu = _cpu_seconds(pid) - cpu0
        delivered = (qemu.update_bytes - before_bytes) / size
        return {"flushes_per_s": frames / elapsed, "delivered_frames": delivered,
                "delivered_per_s": delivered / (drained - 0.3),
                "cpu_ms_per_flush": cpu * 1000 / frames}
    finally:
        frontend.close()
        ram.close()


def _round(kind: str, tmp: Path, frames: int, width: int, height: int) -> dict[str, Any]:
    sock = tmp / f"{kind}.sock"
    sock.unlink(missing_ok=True)
    if kind == "pyvirtio":
        daemon = BackendProcess("gpu", sock, ["--width", str(width), "--height", str(height)],
                                log_level="warning")
        try:
            return _drive(sock, daemon.process.pid, frames, width, height)
        finally:
            daemon.stop()
    process = subprocess.Popen([C_BACKEND, f"--socket-path={sock}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return _drive(sock, process.pid, frames, width, height)
    finally:
        process.kill()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    kinds = ["pyvirtio", "C"]
    ensure_tool(C_BACKEND, "qemu-system-gui")  # Debian ships the C back-end there
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="pyvirtio-gpu-bench-") as tmp:
        for n in range(args.rounds):
            for kind in kinds:
                r = _round(kind, Path(tmp), args.frames, args.width, args.height)
                results[kind].append(r)
                print(f"round {n + 1} {kind:8}: {r['flushes_per_s']:7.1f} flushes/s, "
                      f"{r['delivered_per_s']:7.1f} frames/s delivered "
                      f"({r['delivered_frames']:.0f} of {args.frames}), "
                      f"{r['cpu_ms_per_flush']:.2f} ms CPU per flush", flush=True)
    summary: dict[str, Any] = {"machine": platform.node(), "cpus": os.cpu_count(),
                               "width": args.width, "height": args.height,
                               "frames": args.frames, "rounds": results}
    for key in ("flushes_per_s", "delivered_per_s", "cpu_ms_per_flush"):
        medians = {kind: statistics.median(r[key] for r in results[kind]) for kind in kinds}
        summary[f"median_{key}"] = medians
        line = ", ".join(f"{kind} {value:.2f}" for kind, value in medians.items())
        if medians.get("C"):
            summary[f"ratio_{key}"] = medians["pyvirtio"] / medians["C"]
            line += f"; pyvirtio/C = {summary[f'ratio_{key}']:.2f}"
        print(f"median {key}: {line}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
