"""A toy virtio device, complete: the driver's text comes back in upper case.

One queue.  The driver posts a chain with its text in the device-readable part and
room in the device-writable part; the device writes the text back upper-cased and
reports how many bytes it wrote (VIRTIO 1.4 §2.7.8: the used length).  A chain with
too little room gets nothing back, and counts as an error.

Install this folder next to pyvirtio (``pip install ./examples/uppercase``) and
``pyvirtio serve uppercase --socket up.sock`` serves it: ``pyproject.toml`` names
:data:`UPPERCASE_TYPE` in the ``pyvirtio.devices`` entry-point group.
docs/writing-a-device.md walks through this file.
"""

from __future__ import annotations

import argparse

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.registry import DeviceType, ServeOptions
from pyvirtio.errors import RequestTooShort
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["TOY_DEVICE_ID", "UPPERCASE_TYPE", "UppercaseDevice"]

#: VIRTIO 1.4 §5 assigns no such device ID: this device exists on this page only.
TOY_DEVICE_ID = 0x3FFF


class UppercaseDevice(VirtioDevice):
    """One queue; each chain's readable bytes come back upper-cased in its writable ones."""

    device_id = TOY_DEVICE_ID
    num_queues = 1

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        # The cursors read and write across descriptors, however the driver split them.
        text = chain.reader().read()
        writer = chain.writer()
        stats = self.stats[queue]
        stats.bytes_out += len(text)
        try:
            writer.write(text.upper())
        except RequestTooShort:
            stats.errors += 1  # no room for the answer: nothing written, counted
        stats.bytes_in += writer.written
        return writer.written


def make_uppercase(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    """``pyvirtio serve uppercase``: the device, and nothing special asked of the daemon."""
    return UppercaseDevice(), ServeOptions()


#: The device's entry in pyvirtio's device registry (``pyvirtio devices`` lists it).
UPPERCASE_TYPE = DeviceType(
    name="uppercase",
    summary="a toy device: the driver's text comes back in upper case",
    device_id=TOY_DEVICE_ID,
    # QEMU has no model for a made-up ID. Its generic development device is the nearest
    # (virtio-id=, num_vqs=), though a stock QEMU build does not let users create it.
    qemu_device="vhost-user-device-pci",
    factory=make_uppercase,
)
