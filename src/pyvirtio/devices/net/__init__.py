"""virtio-net (VIRTIO 1.4 §5.1): the device model, its paths and its back ends.

- :mod:`.device`: :class:`NetDevice` (features, config space, queues, the control
  queue's chains);
- :mod:`.common`: MAC addresses, the back-end protocols (:class:`FrameBackend`,
  :class:`OffloadBackend`), :class:`NetDeviceConfig`, the state both paths share;
- :mod:`.rx`: the receive path, with mergeable receive buffers (the device drives
  its receive queues itself), and :mod:`.taprx`: a tap read straight into receive
  buffers; :mod:`.tx`: the transmit path;
- :mod:`.offload`: header checks both ways; :mod:`.steering`: which receive queue
  a flow goes to;
- :mod:`.ctrl`: the control queue's commands and the receive filter; :mod:`.qmp`:
  following QEMU's view of it;
- back ends: :mod:`.switch` (with :mod:`.hub`: ports of one process, and
  :mod:`.peers`: sending to other processes' ports, with back-pressure),
  :mod:`.tap`, :mod:`.uplink` (a switch with a tap uplink); :mod:`.pcap`: captures;
- :mod:`.entry`: the registry entry (:data:`~.entry.NET_TYPE`, ``pyvirtio serve net``).

The names outside code uses are re-exported here.
"""

from __future__ import annotations

from pyvirtio.devices.net.common import (
    MAX_QUEUE_PAIRS,
    FrameBackend,
    NetDeviceConfig,
    NullBackend,
    OffloadBackend,
    default_mac,
    format_mac,
    parse_mac,
)
from pyvirtio.devices.net.device import CONTROL_FEATURES, NetDevice
from pyvirtio.devices.net.offload import (
    GSO_MAX_FRAME,
    OFFLOAD_FEATURES,
    rx_header_problem,
    tx_header_problem,
)
from pyvirtio.devices.net.rx import RX_BACKLOG, RX_MAX_AGE
from pyvirtio.devices.net.steering import STEERING_FLOWS, flow_hash, flow_key, pick_rx_queue
from pyvirtio.spec.net import NetConfig

__all__ = [
    "CONTROL_FEATURES",
    "GSO_MAX_FRAME",
    "MAX_QUEUE_PAIRS",
    "OFFLOAD_FEATURES",
    "RX_BACKLOG",
    "RX_MAX_AGE",
    "STEERING_FLOWS",
    "FrameBackend",
    "NetConfig",
    "NetDevice",
    "NetDeviceConfig",
    "NullBackend",
    "OffloadBackend",
    "default_mac",
    "flow_hash",
    "flow_key",
    "format_mac",
    "parse_mac",
    "pick_rx_queue",
    "rx_header_problem",
    "tx_header_problem",
]
