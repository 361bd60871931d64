"""Fuzz target: virtio-console's control queues (VIRTIO 1.4 §5.3.6.2) under a hostile driver.

A case is a list of driver-to-device control chains (a message near the valid ones
or arbitrary bytes, cut into descriptors at arbitrary points, with or without a
writable descriptor) and the sizes of the control receive buffers the driver
posts (some too small for a message).  They go through the real back-end and
engine (:class:`~pyvirtio.testing.DeviceHarness`, split or packed rings) into
:class:`~pyvirtio.devices.console.ConsoleDevice`.

Invariants:

- nothing escapes and nothing is logged with a traceback;
- every control chain is used with length 0;
- ``kinds["malformed"]`` counts exactly the messages a model of §5.3.6.2 rejects
  (short, an event a driver does not send, a value other than 0 or 1, a port that
  was not added);
- the device keeps serving: afterwards a host client connecting to a port the
  driver made ready gets a PORT_OPEN 1 out on the control receiveq (or, when the
  buffer it lands in was posted too small for it, the message is counted as
  dropped).
"""

from __future__ import annotations

import itertools
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from pyvirtio.devices.console import ConsoleConfig, ConsoleDevice, PortSpec
from pyvirtio.spec.console import CONTROL, ControlEvent
from pyvirtio.testing import DeviceHarness

from .conftest import fuzz_target

CTRL_RX, CTRL_TX = 2, 3
PORTS = 3
DRIVER_EVENTS = (ControlEvent.DEVICE_READY, ControlEvent.PORT_READY, ControlEvent.PORT_OPEN)


@dataclass(frozen=True)
class ControlChain:
    """One driver-to-device control chain: its bytes cut at ``cuts``."""

    data: bytes
    cuts: tuple[int, ...]
    writable: int


@dataclass(frozen=True)
class ConsoleCase:
    packed: bool
    receive_buffers: tuple[int, ...]
    chains: tuple[ControlChain, ...]


def _message() -> st.SearchStrategy[bytes]:
    near = st.builds(
        lambda ident, event, value, tail: CONTROL.pack(ident, event, value) + tail,
        st.one_of(st.integers(0, PORTS + 1), st.just(0xFFFFFFFF), st.integers(0, 2**32 - 1)),
        st.one_of(st.sampled_from(list(ControlEvent)), st.integers(0, 0xFFFF)),
        st.one_of(st.integers(0, 2), st.integers(0, 0xFFFF)),
        st.binary(max_size=8),
    )
    return st.one_of(near, st.binary(min_size=1, max_size=16))


def _chain() -> st.SearchStrategy[ControlChain]:
    return _message().flatmap(lambda data: st.builds(
        ControlChain, st.just(data),
        st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3, unique=True).map(
            lambda cuts: tuple(sorted(cuts))),
        st.sampled_from([0, 0, 0, 4])))


def console_cases() -> st.SearchStrategy[ConsoleCase]:
    return st.builds(
        ConsoleCase,
        st.booleans(),
        st.lists(st.sampled_from([4, 8, 12, 64, 4096]), min_size=0, max_size=12).map(tuple),
        st.lists(_chain(), max_size=12).map(tuple),
    )


def _malformed(data: bytes, added: bool) -> bool:
    """The model (§5.3.6.2): which messages the device must reject."""
    if len(data) < CONTROL.size:
        return True
    ident, event, value = CONTROL.unpack_from(data)
    if event not in DRIVER_EVENTS or value not in (0, 1):
        return True
    return event != ControlEvent.DEVICE_READY and not (added and ident < PORTS)


def _pieces(chain: ControlChain) -> list[bytes]:
    bounds = [0, *[c for c in chain.cuts if c < len(chain.data)], len(chain.data)]
    return [chain.data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@fuzz_target("console", console_cases(), types=[ConsoleCase, ControlChain], quick_examples=120)
def test_console_control_queue_survives_a_hostile_driver(case: ConsoleCase) -> None:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-fuzz-console-") as tmp:
        folder = Path(tmp)
        device = ConsoleDevice(ConsoleConfig(
            console_socket=folder / "c0.sock",
            ports=tuple(PortSpec(f"p{i}", folder / f"p{i}.sock") for i in range(1, PORTS))))
        try:
            with DeviceHarness(device, packed=case.packed, queue_size=64) as harness:
                for size in case.receive_buffers:
                    harness.post(CTRL_RX, writable=size)
                harness.kick(CTRL_RX)
                added = False
                expected = 0
                for chain in case.chains:
                    expected += _malformed(chain.data, added)
                    used = harness.request(CTRL_TX, _pieces(chain), chain.writable)
                    assert used.length == 0
                    if not _malformed(chain.data, added):
                        _ident, event, value = CONTROL.unpack_from(chain.data)
                        added = added or (event == ControlEvent.DEVICE_READY and value == 1)
                assert device.stats[CTRL_TX].kinds["malformed"] == expected
                # Still serving: a driver that follows the rules gets its ports.
                harness.used(CTRL_RX)
                for _ in range(16):
                    harness.post(CTRL_RX, writable=4096)
                harness.kick(CTRL_RX)
                harness.request(CTRL_TX, CONTROL.pack(0xFFFFFFFF, ControlEvent.DEVICE_READY, 1))
                harness.request(CTRL_TX, CONTROL.pack(1, ControlEvent.PORT_READY, 1))
                harness.used(CTRL_RX)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    client.connect(str(folder / "p1.sock"))
                    listener = device.ports[1].listener
                    assert listener is not None
                    dropped = device.stats[CTRL_RX].errors
                    harness.fd_readable(listener.fileno())
                    opened = [CONTROL.unpack_from(u.data) for u in harness.used(CTRL_RX)
                              if u.length >= CONTROL.size]
                    # Delivered, or dropped (and counted) into a buffer posted too small.
                    assert ((1, ControlEvent.PORT_OPEN, 1) in opened
                            or device.stats[CTRL_RX].errors == dropped + 1)
        finally:
            device.close()
