"""Fuzz target: the balloon's five queues (VIRTIO 1.4 §5.5) with arbitrary chains.

A case is the negotiated device features and a few chains, each on any queue, with
arbitrary readable bytes (PFN arrays with PFNs inside and outside guest memory, stats
arrays, command IDs, junk of any length) cut into descriptors, and writable buffers.
Each goes through the real back-end (:class:`~pyvirtio.testing.DeviceHarness`) into
:meth:`BalloonDevice.handle_chain`.  Invariants:

- nothing escapes and nothing is logged with a traceback;
- the PFNs in the balloon are all pages of guest memory;
- every chain but the held statsq buffer is used, with length 0;
- afterwards the device still serves: a valid inflate request is taken.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import strategies as st

from pyvirtio.devices.balloon import BalloonDevice
from pyvirtio.spec.balloon import (
    BALLOON_PAGE_SIZE,
    PFN,
    STAT,
    BalloonFeature,
    BalloonQueue,
    queue_roles,
)
from pyvirtio.spec.common import Feature
from pyvirtio.testing import DeviceHarness

from .conftest import fuzz_target

OPTIONAL = (BalloonFeature.STATS_VQ, BalloonFeature.FREE_PAGE_HINT,
            BalloonFeature.PAGE_REPORTING, BalloonFeature.DEFLATE_ON_OOM)


@dataclass(frozen=True)
class Chain:
    queue: int
    readable: list[bytes]
    writable: list[int]


@dataclass(frozen=True)
class BalloonCase:
    features: int
    chains: list[Chain]


def _payload() -> st.SearchStrategy[bytes]:
    # Pages of the harness's buffer space, past the rings: a driver that balloons its
    # own rings breaks its queues (the engine reports that), not the device.
    pfn = st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0x100080, 0x1000FF))
    return st.one_of(
        st.lists(pfn, max_size=40).map(lambda ps: b"".join(PFN.pack(p) for p in ps)),
        st.lists(st.tuples(st.integers(0, 20), st.integers(0, (1 << 64) - 1)), max_size=12)
        .map(lambda ss: b"".join(STAT.pack(t, v) for t, v in ss)),
        st.integers(0, 5).map(PFN.pack),
        st.binary(max_size=64),
    )


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


chains = st.builds(
    lambda queue, data, cuts, writable: Chain(queue, _pieces(data, cuts), writable),
    st.integers(0, 5), _payload(), st.lists(st.integers(0, 200), max_size=3),
    st.lists(st.integers(1, 3 * BALLOON_PAGE_SIZE), max_size=3),
).filter(lambda c: c.readable or c.writable)
cases = st.builds(BalloonCase, st.integers(0, 15), st.lists(chains, min_size=1, max_size=8))
TYPES = (BalloonCase, Chain)


@fuzz_target("balloon", cases, types=TYPES, quick_examples=80)
def test_balloon_queues_never_escape_and_keep_serving(case: BalloonCase) -> None:
    """Whatever a driver puts on the balloon's queues, the device answers and goes on."""
    device = BalloonDevice()
    features = (1 << Feature.VERSION_1) | sum(
        1 << bit for i, bit in enumerate(OPTIONAL) if case.features >> i & 1)
    roles = queue_roles(features)
    with DeviceHarness(device, features=features, queues=range(len(roles)),
                       queue_size=16) as harness:
        region = harness.guest.memory.regions[-1]
        pages = {*range(region.guest_addr // BALLOON_PAGE_SIZE,
                        region.guest_end // BALLOON_PAGE_SIZE)}
        for chain in case.chains:
            if chain.queue >= len(roles):
                continue
            harness.post(chain.queue, readable=chain.readable, writable=chain.writable)
            used = harness.kick(chain.queue)
            held = roles[chain.queue] is BalloonQueue.STATS
            assert all(u.length == 0 for u in used)
            if not held:
                assert len(used) == 1
        assert device.inflated <= pages
        assert len(device.config_space()) == 16
        good = max(pages)
        harness.request(0, readable=PFN.pack(good))
        assert good in device.inflated
