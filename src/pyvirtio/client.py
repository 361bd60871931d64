"""Talking to a running daemon through its control socket, from a command.

A daemon serving ``SOCK`` listens on ``SOCK.ctl`` (:func:`control_path`); one
connection carries one command and its answer (the daemon's side is
:mod:`pyvirtio.control`).  Device types use these helpers for their client
commands (``pyvirtio resize``, ``pyvirtio balloon``...,
:class:`pyvirtio.devices.registry.ClientCommand`), so every command reports
errors the same way (:func:`command_failed`).
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

from pyvirtio.errors import NoDaemon

__all__ = [
    "MAX_CONTROL_ANSWER",
    "NOTIFIED",
    "ask",
    "command_failed",
    "control_path",
    "send_control",
]

#: The longest control answer read (a stats dump of 255 queues, current, last and
#: total, is ~130 KiB).
MAX_CONTROL_ANSWER = 1 << 20

#: What the front-end made of a config change (a device's ``notified`` answer), for people.
NOTIFIED = {
    "acked": "the front-end acknowledged the config change",
    "sent": "config change sent to the front-end (it does not acknowledge)",
    "failed": "the front-end refused the config change notification",
    "no answer": "the front-end went away before it acknowledged the config change",
    "no front-end": "no front-end connected: the next one reads the new capacity",
    "no channel": "the front-end set up no back-end request channel: the guest sees the "
    "new capacity only when its driver re-reads the config",
}


def control_path(socket_path: Path) -> Path:
    """Where a daemon serving ``socket_path`` takes control commands."""
    return socket_path.with_name(socket_path.name + ".ctl")


def send_control(control_path: Path, command: str, timeout: float = 5.0) -> str:
    """Send one command to a daemon's control socket; return its answer (one line).

    Raises:
        OSError: nobody listens there, or no answer in time.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(control_path))
        sock.sendall(command.encode() + b"\n")
        reply = bytearray()
        while len(reply) < MAX_CONTROL_ANSWER and (data := sock.recv(65536)):
            reply += data
        return reply.decode(errors="replace").strip()


def ask(socket_path: Path, command: str, timeout: float = 5.0) -> Any:
    """Send ``command`` to the daemon serving ``socket_path``; return its JSON answer.

    Raises:
        NoDaemon: nobody answers on its control socket, or not with JSON.
    """
    path = control_path(socket_path)
    try:
        return json.loads(send_control(path, command, timeout))
    except (OSError, ValueError) as exc:
        raise NoDaemon(f"no daemon answering at {path}: {exc}") from exc


def command_failed(command: str, message: str, status: int = 1) -> int:
    """Print ``pyvirtio COMMAND: message`` on stderr; return ``status`` (the exit status)."""
    print(f"pyvirtio {command}: {message}", file=sys.stderr)
    return status
