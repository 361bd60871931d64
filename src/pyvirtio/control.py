"""The daemon's control socket: ``pyvirtio stats``, ``link``, and device commands.

A daemon serving ``SOCK`` listens on ``SOCK.ctl``
(:func:`pyvirtio.client.control_path`; the commands' side is :mod:`pyvirtio.client`).  One
connection carries one command line and gets one answer line:

- ``stats``: the counters, as JSON (:meth:`pyvirtio.runtime.Server.stats_snapshot`);
- ``link [up|down]`` (a net daemon): the link state, as text;
- a device's own commands (:meth:`pyvirtio.devices.base.VirtioDevice.control_commands`,
  e.g. blk's ``resize BYTES``): a JSON object, maybe sent later (after the
  front-end's answer) while the loop goes on serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvirtio.runtime import Server

__all__ = ["answer"]

log = logging.getLogger(__name__)

def _send(conn: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(data)


def answer(server: Server, conn: socket.socket) -> None:
    """Read one command from ``conn`` (a control connection ``server`` accepted) and
    answer it."""
    conn.settimeout(1.0)
    try:
        command = conn.recv(256).decode(errors="replace").split()
    except OSError:
        return
    if command == ["stats"]:
        _send(conn, json.dumps(server.stats_snapshot()).encode() + b"\n")
        return
    if _device_command(server, conn, command):
        return
    device = server.device
    if command[:1] not in (["link"], []):
        # A device command this device does not have: answered as devices answer.
        names = ", ".join(sorted(device.control_commands())) or "none"
        error = (f"{command[0]} is not a command of this device "
                 f"({type(device).__name__}; its commands: {names})")
        _send(conn, json.dumps({"ok": False, "error": error}).encode() + b"\n")
        return
    if command[:1] == ["link"] and not server.link_commands:
        _send(conn, b"error: link commands are for net devices\n")
        return
    if command == ["link", "down"]:
        server.set_link(False)
    elif command == ["link", "up"]:
        server.set_link(True)
    elif command != ["link"]:
        _send(conn, f"error: unknown command {' '.join(command)!r}\n".encode())
        return
    _send(conn, f"link {'up' if server.link_up else 'down'}\n".encode())


def _device_command(server: Server, conn: socket.socket, command: list[str]) -> bool:
    """Hand ``command`` to the device's control command of that name, if it has one.

    The device answers once, maybe later (after the front-end's answer): the
    connection is kept (a duplicate) until then, and the loop goes on serving.
    """
    handler = server.device.control_commands().get(command[0]) if command else None
    if handler is None:
        return False
    held = socket.socket(fileno=os.dup(conn.fileno()))
    answered = False

    def reply(result: dict[str, object]) -> None:
        nonlocal answered
        if answered:
            return
        answered = True
        with held:
            _send(held, json.dumps(result).encode() + b"\n")

    try:
        handler(command[1:], reply)
    except Exception as exc:
        log.exception("control command %r failed", command[0])
        reply({"ok": False, "error": f"internal error: {exc}"})
    return True
