"""virtio-input's device model (VIRTIO 1.4 §5.8) through the real back-end and engine
(:class:`~pyvirtio.testing.DeviceHarness`): the config selectors, the eventq as a
receive queue, the statusq's LEDs and the ``input`` control command."""

from __future__ import annotations

from typing import Any

import pytest

from pyvirtio.devices.input import AbsAxis, Capabilities, InputDevice, Kind, capabilities
from pyvirtio.devices.input.device import MAX_PENDING, parse_events
from pyvirtio.devices.input.keymap import text
from pyvirtio.spec.input import (
    ABSINFO,
    CONFIG_HEADER,
    CONFIG_SIZE,
    DEVIDS,
    EVENT,
    EVENTQ,
    KEY_CODES,
    STATUSQ,
    Abs,
    Button,
    ConfigSelect,
    EventType,
    InputProp,
    Led,
    Rel,
)
from pyvirtio.testing import DeviceHarness


def _select(harness: DeviceHarness, select: int, subsel: int) -> bytes:
    """What Linux's virtinput_cfg_select does, with QEMU's whole-space writes: set
    select, then subsel, then read ``size`` and that much of ``u``."""
    space = bytearray(harness.read_config(0, CONFIG_SIZE))
    space[0] = select
    harness.write_config(0, bytes(space))
    space = bytearray(harness.read_config(0, CONFIG_SIZE))
    space[1] = subsel
    harness.write_config(0, bytes(space))
    head = harness.read_config(0, CONFIG_HEADER.size)
    assert CONFIG_HEADER.unpack(head)[:2] == (select, subsel)
    size = head[2]
    return harness.read_config(CONFIG_HEADER.size, size) if size else b""


def _bits(bitmap: bytes) -> set[int]:
    return {i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1}


def test_the_config_selectors_answer_what_each_kind_advertises() -> None:
    device = InputDevice(capabilities(Kind.TABLET, "my tablet", "SN-1"), Kind.TABLET)
    with DeviceHarness(device) as harness:
        assert _select(harness, ConfigSelect.ID_NAME, 0) == b"my tablet"
        assert _select(harness, ConfigSelect.ID_SERIAL, 0) == b"SN-1"
        assert DEVIDS.unpack(_select(harness, ConfigSelect.ID_DEVIDS, 0)) == (6, 0x0627, 3, 1)
        assert _select(harness, ConfigSelect.PROP_BITS, 0) == b""
        assert _bits(_select(harness, ConfigSelect.EV_BITS, EventType.KEY)) == {
            Button.LEFT, Button.RIGHT, Button.MIDDLE, Button.SIDE, Button.EXTRA}
        assert _bits(_select(harness, ConfigSelect.EV_BITS, EventType.ABS)) == {Abs.X, Abs.Y}
        assert _bits(_select(harness, ConfigSelect.EV_BITS, EventType.REL)) == {Rel.WHEEL}
        assert ABSINFO.unpack(_select(harness, ConfigSelect.ABS_INFO, Abs.X)) == (
            0, 32767, 0, 0, 0)


def test_the_device_answers_size_zero_for_what_it_does_not_have() -> None:
    """§5.8.5.2: size 0 for an unsupported select/subsel combination."""
    device = InputDevice(capabilities(Kind.KEYBOARD), Kind.KEYBOARD)
    with DeviceHarness(device) as harness:
        for select, subsel in ((ConfigSelect.UNSET, 0), (ConfigSelect.ID_NAME, 1),
                               (ConfigSelect.ID_SERIAL, 0), (ConfigSelect.PROP_BITS, 0),
                               (ConfigSelect.EV_BITS, EventType.ABS),
                               (ConfigSelect.ABS_INFO, Abs.X), (0x13, 0), (0xFF, 0xFF)):
            assert _select(harness, select, subsel) == b"", (select, subsel)
        # The rest of u reads as zeros.
        assert harness.read_config(CONFIG_HEADER.size, 128) == bytes(128)


def test_a_keyboard_has_its_keys_leds_and_autorepeat() -> None:
    device = InputDevice(capabilities(Kind.KEYBOARD, "kbd"), Kind.KEYBOARD)
    with DeviceHarness(device) as harness:
        assert _bits(_select(harness, ConfigSelect.EV_BITS, EventType.KEY)) == set(
            KEY_CODES.values())
        assert _bits(_select(harness, ConfigSelect.EV_BITS, EventType.LED)) == {
            Led.NUML, Led.CAPSL, Led.SCROLLL}
        # EV_REP: the type with an empty one-byte bitmap, which Linux takes as "repeat".
        assert _select(harness, ConfigSelect.EV_BITS, EventType.REP) == b"\0"


def test_mouse_and_multitouch_properties_and_axes() -> None:
    mouse = capabilities(Kind.MOUSE)
    assert mouse.window(ConfigSelect.PROP_BITS, 0) == b""  # as QEMU's virtio-mouse
    assert _bits(mouse.window(ConfigSelect.EV_BITS, EventType.REL)) == {Rel.X, Rel.Y,
                                                                         Rel.WHEEL}
    touch = capabilities(Kind.MULTITOUCH)
    assert touch.window(ConfigSelect.PROP_BITS, 0) == bytes([1 << InputProp.DIRECT])
    assert ABSINFO.unpack(touch.window(ConfigSelect.ABS_INFO, Abs.MT_SLOT))[:2] == (0, 9)
    assert _bits(touch.window(ConfigSelect.EV_BITS, EventType.ABS)) == {
        Abs.X, Abs.Y, Abs.MT_SLOT, Abs.MT_POSITION_X, Abs.MT_POSITION_Y, Abs.MT_TRACKING_ID}


def test_selector_writes_of_any_shape_set_select_and_subsel() -> None:
    device = InputDevice(capabilities(Kind.KEYBOARD, "k"), Kind.KEYBOARD)
    with DeviceHarness(device) as harness:
        harness.write_config(0, bytes([ConfigSelect.ID_NAME]))      # one byte at 0
        harness.write_config(1, b"\0")                                 # one byte at 1
        assert harness.read_config(0, 9) == bytes([1, 0, 1, 0, 0, 0, 0, 0]) + b"k"
        harness.write_config(0, bytes([ConfigSelect.EV_BITS, EventType.LED]))  # both at once
        assert (device.select, device.subsel) == (ConfigSelect.EV_BITS, EventType.LED)
        # A write of the other bytes only (the driver must not, §5.8.5.1) changes nothing.
        harness.write_config(2, b"\xff" * 10)
        assert (device.select, device.subsel) == (ConfigSelect.EV_BITS, EventType.LED)
        assert harness.read_config(2, 1) == b"\x01"


def test_a_config_write_past_the_end_is_refused() -> None:
    device = InputDevice(capabilities(Kind.KEYBOARD), Kind.KEYBOARD)
    assert not device.write_config(CONFIG_SIZE - 1, b"\0\0")
    assert not device.write_config(200, b"\x01")
    assert (device.select, device.subsel) == (0, 0)
    assert device.write_config(0, bytes([1]) + bytes(CONFIG_SIZE - 1))


def _events(used: list[Any]) -> list[tuple[int, int, int]]:
    return [EVENT.unpack(u.data) for u in used]


@pytest.mark.parametrize("packed", [False, True])
def test_eventq_buffers_wait_until_events_come_then_get_one_event_each(packed: bool) -> None:
    device = InputDevice(capabilities(Kind.KEYBOARD), Kind.KEYBOARD)
    with DeviceHarness(device, packed=packed, queue_size=8) as harness:
        for _ in range(4):
            harness.post(EVENTQ, writable=8)
        assert harness.kick(EVENTQ) == []          # held, not used empty
        queued, left_out = device.send(text("ab"))
        assert (queued, left_out) == (8, 0)
        first = harness.used(EVENTQ)
        assert [u.length for u in first] == [8] * 4
        assert _events(first) == [(1, 30, 1), (0, 0, 0), (1, 30, 0), (0, 0, 0)]
        assert len(device.pending) == 4           # the rest waits for buffers
        for _ in range(4):
            harness.post(EVENTQ, writable=[4, 12])  # split over descriptors
        assert _events(harness.kick(EVENTQ)) == [(1, 48, 1), (0, 0, 0), (1, 48, 0), (0, 0, 0)]
        assert device.delivered == 8
        assert device.stats[EVENTQ].kinds == {"key": 4, "syn": 4}
        assert device.stats[EVENTQ].bytes_in == 64


def test_a_bad_eventq_buffer_is_given_back_empty_and_the_event_kept() -> None:
    """§5.8.6.1: eventq buffers are device-writable, an event long at least."""
    device = InputDevice(capabilities(Kind.MOUSE), Kind.MOUSE)
    with DeviceHarness(device, queue_size=8) as harness:
        device.send([(EventType.REL, Rel.X, -5), (EventType.SYN, 0, 0)])
        short = harness.request(EVENTQ, writable=7)
        readable = harness.request(EVENTQ, readable=b"x", writable=8)
        assert (short.length, readable.length) == (0, 0)
        assert device.stats[EVENTQ].violations == 2
        assert _events([harness.request(EVENTQ, writable=8)]) == [(EventType.REL, Rel.X, -5)]
        assert len(device.pending) == 1


def test_events_the_device_does_not_advertise_are_left_out() -> None:
    device = InputDevice(capabilities(Kind.TABLET), Kind.TABLET)
    queued, left_out = device.send([(EventType.KEY, KEY_CODES["KEY_A"], 1),
                                    (EventType.ABS, Abs.X, 7), (EventType.SYN, 0, 0)])
    assert (queued, left_out) == (2, 1)
    # An update with nothing left loses its SYN_REPORT too; a bare one is kept.
    assert device.send([(EventType.KEY, Button.TOUCH, 1), (EventType.SYN, 0, 0),
                        (EventType.SYN, 0, 0)]) == (1, 1)
    assert [EVENT.unpack(e) for e in device.pending][-1:] == [(EventType.SYN, 0, 0)]
    assert len(device.pending) == 3


def test_too_many_waiting_events_refuse_the_whole_batch() -> None:
    """§5.8.6.2: a sequence is buffered or dropped whole, never in part."""
    device = InputDevice(capabilities(Kind.KEYBOARD), Kind.KEYBOARD)
    device.send([(EventType.SYN, 0, 0)] * (MAX_PENDING - 1))
    with pytest.raises(ValueError, match="more would pass"):
        device.send([(EventType.KEY, 30, 1), (EventType.SYN, 0, 0)])
    assert len(device.pending) == MAX_PENDING - 1


def test_the_statusq_records_the_leds_and_shows_them_in_the_stats() -> None:
    device = InputDevice(capabilities(Kind.KEYBOARD), Kind.KEYBOARD)
    with DeviceHarness(device) as harness:
        for led, value in ((Led.CAPSL, 1), (Led.NUML, 1), (Led.NUML, 0)):
            assert harness.request(STATUSQ, readable=EVENT.pack(EventType.LED, led, value)
                                   ).length == 0
        harness.request(STATUSQ, readable=EVENT.pack(EventType.SND, 1, 1))
        harness.request(STATUSQ, readable=[EVENT.pack(0x99, 1, 1)[:3],
                                           EVENT.pack(0x99, 1, 1)[3:] + b"extra"])
        assert device.leds == {Led.CAPSL: 1, Led.NUML: 0}
        kinds = device.stats[STATUSQ].kinds
        assert (kinds["led capslock"], kinds["led numlock"]) == (1, 0)
        assert (kinds["sound"], kinds["other status"]) == (1, 1)
        assert "capslock 1" in str(device.stats[STATUSQ])
        assert device.info()["leds"] == {"numlock": 0, "capslock": 1}


def test_a_short_status_buffer_is_a_violation() -> None:
    device = InputDevice(capabilities(Kind.KEYBOARD), Kind.KEYBOARD)
    with DeviceHarness(device) as harness:
        assert harness.request(STATUSQ, readable=b"\x11\x00\x01").length == 0
        assert harness.request(STATUSQ, writable=8).length == 0
        assert device.stats[STATUSQ].violations == 2
        assert device.leds == {}


def test_the_input_control_command() -> None:
    device = InputDevice(capabilities(Kind.KEYBOARD, "kbd"), Kind.KEYBOARD)
    answers: list[dict[str, object]] = []
    command = device.control_commands()["input"]
    command(["info"], answers.append)
    command(["send", "1,30,1", "0,0,0", "17,1,1"], answers.append)  # 17: EV_LED
    command(["send", "1,30"], answers.append)
    command(["send", "1,30,99999999999"], answers.append)
    command(["bogus"], answers.append)
    info, sent, short, big, bogus = answers
    assert info == {"ok": True, "kind": "keyboard", "name": "kbd", "pending": 0,
                    "delivered": 0, "leds": {}}
    assert sent["ok"] and sent["queued"] == 3 and sent["pending"] == 3
    for refused in (short, big, bogus):
        assert refused["ok"] is False and "full" not in refused


def test_parse_events_checks_every_field() -> None:
    assert parse_events(["3,0,-1", "65535,65535,2147483647"]) == [(3, 0, -1),
                                                                  (65535, 65535, 2**31 - 1)]
    for word in ("1,2", "1,2,3,4", "a,b,c", "-1,0,0", "0,65536,0", "0,0,2147483648", ""):
        with pytest.raises(ValueError):
            parse_events([word])


def test_a_new_front_end_starts_from_a_clean_state() -> None:
    device = InputDevice(capabilities(Kind.KEYBOARD), Kind.KEYBOARD)
    device.send(text("x"))
    device.write_config(0, b"\x01\x00")
    device.start()
    assert (device.select, device.subsel, len(device.pending)) == (0, 0, 0)


def test_capabilities_refuse_what_the_config_space_cannot_carry() -> None:
    with pytest.raises(ValueError, match="128"):
        capabilities(Kind.KEYBOARD, "x" * 129)
    with pytest.raises(ValueError, match="NUL"):
        capabilities(Kind.KEYBOARD, "a\0b")
    with pytest.raises(ValueError, match="ABS_INFO"):
        Capabilities("t", events={EventType.ABS: frozenset({0})})
    with pytest.raises(ValueError, match="min"):
        AbsAxis(10, 0)
    with pytest.raises(ValueError, match="code"):
        Capabilities("t", events={EventType.KEY: frozenset({0x300})})
    assert len(capabilities(Kind.KEYBOARD, "é" * 64).name.encode()) == 128
