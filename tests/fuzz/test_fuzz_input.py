"""Fuzz target: virtio-input (VIRTIO 1.4 §5.8) under a hostile driver.

A case is a sequence of driver actions on a tablet (it has every part: ids, axes,
buttons, a wheel): config writes of any offset and length within the vhost-user
config window (QEMU's whole-space writes, single selector bytes, writes past the
136-byte space, writes of the read-only bytes) and config reads; statusq chains
(near-valid LED events or arbitrary bytes, cut into descriptors anywhere, maybe with
a writable descriptor); eventq buffers of any shape (too small, readable, split); and
host events sent in between. Everything goes through the real back-end and engine
(:class:`~pyvirtio.testing.DeviceHarness`, split or packed rings).

Invariants:

- nothing escapes and nothing is logged with a traceback;
- a config read always answers the requested length, and its header is the model's
  ``select``/``subsel`` (a model of §5.8.4 writes: bytes 0 and 1 of a write inside the
  space) with ``size`` the length of that selection's answer (0 for what the device
  lacks, §5.8.5.2);
- every statusq chain is used with length 0; the LEDs are the model's (the last LED
  event of each code in a buffer of 8 readable bytes at least); shorter buffers are
  counted as violations, exactly;
- eventq buffers that are writable-only and 8 bytes long at least get the host's
  events one each, in order; the others come back empty and are counted;
- the device keeps serving: afterwards a driver that follows the rules reads the name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from pyvirtio.devices.input import InputDevice, Kind, capabilities
from pyvirtio.spec.input import (
    CONFIG_HEADER,
    CONFIG_SIZE,
    EVENT,
    EVENTQ,
    STATUSQ,
    ConfigSelect,
    EventType,
    Led,
)
from pyvirtio.testing import DeviceHarness

from .conftest import fuzz_target

#: vhost-user's config window (VHOST_USER_MAX_CONFIG_SIZE).
WINDOW = 256
NAME = "fuzz tablet"


@dataclass(frozen=True)
class ConfigWrite:
    offset: int
    data: bytes


@dataclass(frozen=True)
class ConfigRead:
    offset: int
    size: int


@dataclass(frozen=True)
class StatusChain:
    data: bytes
    cuts: tuple[int, ...]
    writable: int


@dataclass(frozen=True)
class EventBuffer:
    readable: int
    writable: tuple[int, ...]


@dataclass(frozen=True)
class HostEvents:
    events: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class InputCase:
    packed: bool
    actions: tuple[ConfigWrite | ConfigRead | StatusChain | EventBuffer | HostEvents, ...]


def _config_write() -> st.SearchStrategy[ConfigWrite]:
    selector = st.one_of(st.sampled_from(list(ConfigSelect)), st.integers(0, 255))
    near = st.builds(lambda s, sub, rest: ConfigWrite(0, bytes([s, sub]) + rest),
                     selector, st.integers(0, 255),
                     st.sampled_from([b"", bytes(CONFIG_SIZE - 2), b"\xff" * 20]))
    anywhere = st.integers(0, WINDOW - 1).flatmap(lambda offset: st.builds(
        ConfigWrite, st.just(offset), st.binary(max_size=WINDOW - offset)))
    return st.one_of(near, anywhere)


def _config_read() -> st.SearchStrategy[ConfigRead]:
    return st.integers(0, WINDOW).flatmap(
        lambda offset: st.builds(ConfigRead, st.just(offset), st.integers(0, WINDOW - offset)))


def _status_chain() -> st.SearchStrategy[StatusChain]:
    led = st.builds(lambda code, value, tail: EVENT.pack(EventType.LED, code, value) + tail,
                    st.one_of(st.sampled_from(list(Led)), st.integers(0, 0xFFFF)),
                    st.integers(-(2**31), 2**31 - 1), st.binary(max_size=8))
    data = st.one_of(led, st.binary(max_size=20))
    return data.flatmap(lambda d: st.builds(
        StatusChain, st.just(d),
        st.lists(st.integers(1, max(1, len(d) - 1)), max_size=3, unique=True).map(
            lambda cuts: tuple(sorted(cuts))),
        st.sampled_from([0, 0, 8])))


def _event_buffer() -> st.SearchStrategy[EventBuffer]:
    return st.builds(EventBuffer, st.sampled_from([0, 0, 0, 4]),
                     st.lists(st.sampled_from([1, 4, 7, 8, 16]), min_size=0, max_size=3).map(
                         tuple))


def _host_events() -> st.SearchStrategy[HostEvents]:
    event = st.tuples(st.sampled_from([0, 1, 2, 3, 4, 0x11]), st.integers(0, 0x150),
                      st.integers(-(2**31), 2**31 - 1))
    return st.builds(HostEvents, st.lists(event, max_size=6).map(tuple))


def input_cases() -> st.SearchStrategy[InputCase]:
    action = st.one_of(_config_write(), _config_read(), _status_chain(), _event_buffer(),
                       _host_events())
    return st.builds(InputCase, st.booleans(), st.lists(action, max_size=16).map(tuple))


def _pieces(chain: StatusChain) -> list[bytes]:
    bounds = [0, *[c for c in chain.cuts if c < len(chain.data)], len(chain.data)]
    return [chain.data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _accepted(caps_supports: Callable[[int, int], bool],
              events: tuple[tuple[int, int, int], ...]) -> list[bytes]:
    """The model of what ``send`` queues: advertised events, without the SYN_REPORT of
    an update whose every event was left out."""
    out: list[bytes] = []
    kept = dropped = 0
    for type_, code, value in events:
        if not caps_supports(type_, code):
            dropped += 1
            continue
        if (type_, code) == (EventType.SYN, 0):
            emptied = dropped and not kept
            kept = dropped = 0
            if emptied:
                continue
        else:
            kept += 1
        out.append(EVENT.pack(type_, code, value))
    return out


@fuzz_target("input", input_cases(),
             types=[InputCase, ConfigWrite, ConfigRead, StatusChain, EventBuffer, HostEvents],
             quick_examples=150)
def test_input_config_and_queues_survive_a_hostile_driver(case: InputCase) -> None:
    caps = capabilities(Kind.TABLET, NAME)
    device = InputDevice(caps, Kind.TABLET)
    select = subsel = 0
    leds: dict[int, int] = {}
    status_violations = 0
    accepted: list[bytes] = []
    eventq_used = []
    with DeviceHarness(device, packed=case.packed, queue_size=64) as harness:
        for action in case.actions:
            if isinstance(action, ConfigWrite):
                inside = action.offset + len(action.data) <= CONFIG_SIZE
                assert harness.write_config(action.offset, action.data) == inside
                if inside and action.offset == 0 and action.data:
                    select = action.data[0]
                if inside and action.offset <= 1 < action.offset + len(action.data):
                    subsel = action.data[1 - action.offset]
            elif isinstance(action, ConfigRead):
                got = harness.read_config(action.offset, action.size)
                assert len(got) == action.size
                space = harness.read_config(0, CONFIG_SIZE)
                size = len(caps.window(select, subsel))
                assert CONFIG_HEADER.unpack_from(space) == (select, subsel, size)
                assert got == (space + bytes(WINDOW))[action.offset:action.offset + action.size]
            elif isinstance(action, StatusChain):
                if not action.data and not action.writable:
                    continue  # an empty chain cannot be posted
                used = harness.request(STATUSQ, _pieces(action), action.writable)
                assert used.length == 0
                if len(action.data) < EVENT.size:
                    status_violations += 1
                else:
                    type_, code, value = EVENT.unpack_from(action.data)
                    if type_ == EventType.LED:
                        leds[code] = 1 if value else 0
            elif isinstance(action, EventBuffer):
                if action.readable or action.writable:  # an empty chain cannot be posted
                    harness.post(EVENTQ, readable=bytes(action.readable),
                                 writable=list(action.writable))
                    eventq_used += harness.kick(EVENTQ)
            else:
                accepted += _accepted(caps.supports, action.events)
                device.send(list(action.events))
            eventq_used += harness.used(EVENTQ)
        eventq_used += harness.used(EVENTQ)
        assert device.leds == leds
        assert device.stats[STATUSQ].violations == status_violations
        # Bad buffers come back empty (once events wait) and are counted; good ones
        # get the accepted events, one each, in order.
        empty = [u for u in eventq_used if u.length == 0]
        assert device.stats[EVENTQ].violations == len(empty)
        received = [u.data for u in eventq_used if u.length]
        assert all(u.length == EVENT.size for u in eventq_used if u.length)
        assert received == accepted[:len(received)]
        assert len(device.pending) == len(accepted) - len(received)
        # Still serving: the name, as a driver that follows the rules reads it.
        assert harness.write_config(0, bytes([ConfigSelect.ID_NAME, 0]))
        assert harness.read_config(0, 3) == bytes([ConfigSelect.ID_NAME, 0, len(NAME)])
        assert harness.read_config(CONFIG_HEADER.size, len(NAME)) == NAME.encode()
