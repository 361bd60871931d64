"""virtio-console definitions (VIRTIO 1.4 §5.3 Console Device).

Queues (§5.3.2): ``receiveq(port0)`` 0, ``transmitq(port0)`` 1, then, with
VIRTIO_CONSOLE_F_MULTIPORT, the control queues 2 (``control receiveq``, device to
driver) and 3 (``control transmitq``, driver to device), then a receiveq/transmitq
pair for each port from 1 up to ``max_nr_ports - 1``.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "BAD_ID",
    "CONFIG",
    "CONTROL",
    "CONTROL_RECEIVEQ",
    "CONTROL_TRANSMITQ",
    "RESIZE",
    "ConsoleFeature",
    "ControlEvent",
    "port_queues",
    "queue_count",
    "queue_port",
]


class ConsoleFeature(enum.IntEnum):
    """Device-specific feature bits (§5.3.3)."""

    SIZE = 0
    MULTIPORT = 1
    EMERG_WRITE = 2


class ControlEvent(enum.IntEnum):
    """``event`` of ``struct virtio_console_control`` (§5.3.6.2)."""

    DEVICE_READY = 0
    DEVICE_ADD = 1
    DEVICE_REMOVE = 2
    PORT_READY = 3
    CONSOLE_PORT = 4
    RESIZE = 5
    PORT_OPEN = 6
    PORT_NAME = 7


#: ``struct virtio_console_config`` (§5.3.4): cols, rows, max_nr_ports, emerg_wr.
CONFIG = struct.Struct("<HHII")
#: ``struct virtio_console_control`` (§5.3.6.2): id, event, value.
CONTROL = struct.Struct("<IHH")
#: The size that follows a RESIZE control message: two le16, ``cols, rows``
#: (§5.3.6.2); older Linux kernels read ``rows, cols`` (see
#: :mod:`pyvirtio.devices.console.device`).
RESIZE = struct.Struct("<HH")
#: The port id Linux uses in DEVICE_READY (the id is unused there, §5.3.6.2).
BAD_ID = 0xFFFFFFFF

CONTROL_RECEIVEQ = 2
CONTROL_TRANSMITQ = 3


def port_queues(port: int) -> tuple[int, int]:
    """(receiveq, transmitq) of ``port`` (§5.3.2)."""
    if port == 0:
        return 0, 1
    return 2 * (port + 1), 2 * (port + 1) + 1


def queue_port(queue: int) -> int | None:
    """The port whose receiveq or transmitq ``queue`` is; None for a control queue."""
    if queue in (CONTROL_RECEIVEQ, CONTROL_TRANSMITQ):
        return None
    return 0 if queue < 2 else queue // 2 - 1


def queue_count(max_nr_ports: int) -> int:
    """Virtqueues of a MULTIPORT device with ``max_nr_ports`` ports (§5.3.2)."""
    return 2 * max_nr_ports + 2
