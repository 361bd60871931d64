"""pyvirtio: the VirtIO standard (OASIS VIRTIO 1.4) implemented in Python.

Layers, each importable on its own:

- :mod:`pyvirtio.spec`: wire constants and structs from the specification;
- :mod:`pyvirtio.memory`: guest memory regions and address translation;
- :mod:`pyvirtio.virtqueue`: split virtqueues, device and driver side;
- :mod:`pyvirtio.vhost_user`: the vhost-user protocol (sans-I/O) and backend state;
- :mod:`pyvirtio.devices`: device models (blk, rng);
- :mod:`pyvirtio.runtime`: sockets, eventfds and the event loop;
- :mod:`pyvirtio.cli`: the ``pyvirtio`` command.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
