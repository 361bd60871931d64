"""virtio-input's costs, in process (real back-end, engine, rings and eventfds, no socket):

1. **Probe**: the config traffic of a Linux driver probing a keyboard and a multitouch
   screen through QEMU's vhost-user-input (select and subsel each a SET_CONFIG of the
   whole 136 bytes, each byte read a GET_CONFIG: ``virtinput_cfg_select``,
   ``virtio_cread_bytes``), counted and timed.
2. **Events**: events per second from ``InputDevice.send`` into eventq buffers, the
   driver reposting each buffer as Linux does, with QEMU 10's queue of 4 buffers
   against a queue of 64, measured alternately (A, B, A, B...) and reported as
   medians and their ratio.

Usage: ``python benchmarks/input_bench.py [--events N] [--rounds R] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pyvirtio.devices.input import InputDevice, Kind, capabilities
from pyvirtio.spec.input import CONFIG_HEADER, CONFIG_SIZE, EVENTQ, ConfigSelect, EventType
from pyvirtio.testing import DeviceHarness


def _probe(harness: DeviceHarness, device: InputDevice) -> int:
    """A Linux probe (virtinput_probe) through QEMU's whole-space writes; returns
    the config requests it took."""
    requests = 0

    def select(sel: int, sub: int) -> int:
        nonlocal requests
        for offset, value in ((0, sel), (1, sub)):
            space = bytearray(harness.read_config(0, CONFIG_SIZE))
            space[offset] = value
            harness.write_config(0, bytes(space))
            requests += 2
        requests += 1
        return harness.read_config(2, 1)[0]

    def read_bytes(count: int) -> None:
        nonlocal requests
        for i in range(count):
            harness.read_config(CONFIG_HEADER.size + i, 1)
            requests += 1

    for sel in (ConfigSelect.ID_NAME, ConfigSelect.ID_SERIAL, ConfigSelect.ID_DEVIDS,
                ConfigSelect.PROP_BITS):
        read_bytes(select(sel, 0))
    for ev in (EventType.REP, EventType.KEY, EventType.REL, EventType.ABS, EventType.MSC,
               EventType.SW, EventType.LED, EventType.SND):
        read_bytes(select(ConfigSelect.EV_BITS, ev))
    for axis in device.caps.axes:
        read_bytes(select(ConfigSelect.ABS_INFO, axis))
    return requests


def _events_per_second(count: int, queue_size: int) -> float:
    device = InputDevice(capabilities(Kind.TABLET), Kind.TABLET)
    update = [(EventType.ABS, 0, 1), (EventType.ABS, 1, 2), (EventType.SYN, 0, 0)]
    with DeviceHarness(device, queue_size=queue_size) as harness:
        for _ in range(queue_size):
            harness.post(EVENTQ, writable=8)
        used = harness.kick(EVENTQ)
        delivered = 0
        start = time.perf_counter()
        while delivered < count:
            if len(device.pending) < queue_size:
                device.send(update * 64)
            used += harness.used(EVENTQ)
            delivered += len(used)
            for _ in used:  # the driver gives each buffer back, as Linux does
                harness.post(EVENTQ, writable=8)
            used = harness.kick(EVENTQ)
        return delivered / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    summary: dict[str, object] = {}
    for kind in (Kind.KEYBOARD, Kind.MULTITOUCH):
        device = InputDevice(capabilities(kind), kind)
        with DeviceHarness(device) as harness:
            start = time.perf_counter()
            requests = _probe(harness, device)
            elapsed = time.perf_counter() - start
        summary[f"probe_{kind}"] = {"config_requests": requests, "ms": round(elapsed * 1e3, 1)}
        print(f"probe of a {kind}: {requests} config requests, {elapsed * 1e3:.1f} ms "
              f"({requests / elapsed:.0f} requests/s)")
    rates: dict[int, list[float]] = {4: [], 64: []}
    for _ in range(args.rounds):
        for size, values in rates.items():  # alternately: the machine's load hits both
            values.append(_events_per_second(args.events, size))
    medians = {size: statistics.median(values) for size, values in rates.items()}
    for size, value in medians.items():
        print(f"events, queue of {size}: {value:.0f} events/s (median of {args.rounds})")
    print(f"queue of 64 / queue of 4: {medians[64] / medians[4]:.2f}")
    summary["events_per_second"] = {str(k): round(v) for k, v in medians.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
