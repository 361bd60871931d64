"""A toy virtio device in one file: it returns what the driver sends, in upper case.

One queue.  The driver posts a chain with its text in the device-readable part and
room in the device-writable part; the device writes the text back upper-cased and
reports how many bytes it wrote (VIRTIO 1.4 §2.7.8: the used length).  It shows the
whole of today's device interface (docs/writing-a-device.md walks through it):
a :class:`~pyvirtio.devices.base.VirtioDevice` subclass, served over vhost-user by
:class:`~pyvirtio.runtime.Server`.

Run: ``python examples/uppercase_device.py --socket up.sock``; drive it with any
vhost-user front-end (tests/integration/test_example_device.py uses pyvirtio's).
:data:`UPPERCASE_TYPE` is its entry for the device registry: a package that names it in
the ``pyvirtio.devices`` entry-point group is served by ``pyvirtio serve uppercase``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.registry import DeviceType, ServeOptions
from pyvirtio.runtime import Server, control_path
from pyvirtio.virtqueue.chain import DescriptorChain, gather, scatter

#: VIRTIO 1.4 §5 assigns no such device ID: this device exists on this page only.
TOY_DEVICE_ID = 0x3FFF


class UppercaseDevice(VirtioDevice):
    """One queue; each chain's readable bytes come back upper-cased in its writable ones."""

    device_id = TOY_DEVICE_ID
    num_queues = 1

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        # The driver's bytes may span several descriptors: gather them, scatter the answer.
        text = gather(chain.readable, 0, chain.readable_len)
        stats = self.stats[queue]
        stats.bytes_out += len(text)
        if len(text) > chain.writable_len:
            stats.errors += 1  # no room for the answer: write nothing, count it
            return 0
        written = scatter(chain.writable, 0, text.upper())
        stats.bytes_in += written
        return written


def make_uppercase(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    """``pyvirtio serve uppercase``: the device, and nothing special asked of the daemon."""
    return UppercaseDevice(), ServeOptions()


UPPERCASE_TYPE = DeviceType(
    name="uppercase",
    summary="a toy device: the driver's text comes back in upper case",
    device_id=TOY_DEVICE_ID,
    # QEMU has no model for a made-up ID. Its generic development device is the nearest
    # (virtio-id=, num_vqs=), though a stock QEMU build does not let users create it.
    qemu_device="vhost-user-device-pci",
    factory=make_uppercase,
)


def main() -> None:
    """Serve the device on ``--socket`` until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server = Server(args.socket, UppercaseDevice(), control_path=control_path(args.socket))
    server.listen()
    server.install_signal_handlers()
    server.serve_forever()


if __name__ == "__main__":
    main()
