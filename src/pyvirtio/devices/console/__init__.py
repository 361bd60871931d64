"""virtio-console (VIRTIO 1.4 §5.3): the console and named ports, bridged to host sockets.

:mod:`.device` is the model, :mod:`.entry` its ``pyvirtio serve console`` entry.
"""

from __future__ import annotations

from pyvirtio.devices.console.device import ConsoleConfig, ConsoleDevice, PortSpec

__all__ = ["ConsoleConfig", "ConsoleDevice", "PortSpec"]
