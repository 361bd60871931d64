"""The events ``pyvirtio input`` makes (US layout text, keys, moves, absolute
positions, clicks) and how they are cut into control-socket lines."""

from __future__ import annotations

import pytest

from pyvirtio.devices.input import Kind, capabilities, keymap
from pyvirtio.devices.input.client import LINE_LIMIT, batches, build_events
from pyvirtio.spec.input import KEY_CODES, Abs, Button, EventType, Rel

SYN = (EventType.SYN, 0, 0)
KEY = EventType.KEY
SHIFT = KEY_CODES["KEY_LEFTSHIFT"]


def test_text_types_each_key_down_then_up_with_a_report_after_each() -> None:
    assert keymap.text("ab") == [(KEY, 30, 1), SYN, (KEY, 30, 0), SYN,
                                 (KEY, 48, 1), SYN, (KEY, 48, 0), SYN]


def test_capitals_and_shifted_symbols_hold_left_shift_around_the_key() -> None:
    for char, key in (("A", "KEY_A"), ("!", "KEY_1"), ("?", "KEY_SLASH"), ("~", "KEY_GRAVE"),
                      ('"', "KEY_APOSTROPHE")):
        code = KEY_CODES[key]
        assert keymap.text(char) == [(KEY, SHIFT, 1), SYN, (KEY, code, 1), SYN,
                                     (KEY, code, 0), SYN, (KEY, SHIFT, 0), SYN], char


def test_every_printable_ascii_character_has_a_us_key() -> None:
    printable = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t"
    strokes = keymap.text_keys(printable)
    assert len(strokes) == len(printable)
    keyboard = capabilities(Kind.KEYBOARD)
    assert all(keyboard.supports(KEY, code) for code, _ in strokes)
    assert keymap.text_keys(" \n") == [(KEY_CODES["KEY_SPACE"], False),
                                       (KEY_CODES["KEY_ENTER"], False)]


def test_characters_without_a_us_key_are_refused() -> None:
    for char in ("é", "€", "\x00", "\r"):
        with pytest.raises(ValueError, match="no US keyboard key"):
            keymap.text(f"a{char}")


def test_key_names_numbers_and_combinations() -> None:
    assert keymap.key_code("KEY_A") == keymap.key_code("a") == keymap.key_code("30") == 30
    assert keymap.key_code("BTN_LEFT") == Button.LEFT
    assert keymap.key_code("0x1d") == KEY_CODES["KEY_LEFTCTRL"]
    for bad in ("KEY_NOPE", "0", "768", "-1"):
        with pytest.raises(ValueError):
            keymap.key_code(bad)
    ctrl, c = KEY_CODES["KEY_LEFTCTRL"], KEY_CODES["KEY_C"]
    assert keymap.keys("KEY_LEFTCTRL+KEY_C") == [(KEY, ctrl, 1), SYN, (KEY, c, 1), SYN,
                                                 (KEY, c, 0), SYN, (KEY, ctrl, 0), SYN]


def test_moves_clicks_and_absolute_positions() -> None:
    assert keymap.move(5, -3) == [(EventType.REL, Rel.X, 5), (EventType.REL, Rel.Y, -3), SYN]
    assert keymap.move(0, 7) == [(EventType.REL, Rel.Y, 7), SYN]
    assert keymap.move(0, 0) == []
    with pytest.raises(ValueError):
        keymap.move(2**31, 0)
    assert keymap.click("right") == [(KEY, Button.RIGHT, 1), SYN, (KEY, Button.RIGHT, 0), SYN]
    with pytest.raises(ValueError, match="unknown button"):
        keymap.click("fourth")
    assert keymap.absolute(1, 32767, Kind.TABLET) == [(EventType.ABS, Abs.X, 1),
                                                       (EventType.ABS, Abs.Y, 32767), SYN]
    touch = keymap.absolute(10, 20, Kind.MULTITOUCH, tracking_id=3)
    assert touch[:5] == [(EventType.ABS, Abs.MT_SLOT, 0), (EventType.ABS, Abs.MT_TRACKING_ID, 3),
                         (EventType.ABS, Abs.MT_POSITION_X, 10),
                         (EventType.ABS, Abs.MT_POSITION_Y, 20), (KEY, Button.TOUCH, 1)]
    assert touch[-3:] == [(EventType.ABS, Abs.MT_TRACKING_ID, -1), (KEY, Button.TOUCH, 0), SYN]
    multitouch = capabilities(Kind.MULTITOUCH)
    assert all(multitouch.supports(t, c) for t, c, _ in touch)
    for x, y in ((-1, 0), (0, 32768)):
        with pytest.raises(ValueError, match="outside"):
            keymap.absolute(x, y, Kind.TABLET)
    with pytest.raises(ValueError, match="no absolute axes"):
        keymap.absolute(1, 1, Kind.MOUSE)


def test_command_line_steps_act_in_order() -> None:
    steps = [("abs", [5, 6]), ("click", "left"), ("text", "a"), ("key", "KEY_ENTER"),
             ("move", [1, 1])]
    events = build_events(steps, Kind.TABLET)
    assert events == (keymap.absolute(5, 6, Kind.TABLET) + keymap.click("left")
                      + keymap.text("a") + keymap.keys("KEY_ENTER") + keymap.move(1, 1))


def test_batches_fit_a_control_line_and_are_cut_after_a_report() -> None:
    events = keymap.text("The quick brown fox jumps over the lazy dog! 0123456789" * 3)
    lines = list(batches(events))
    assert len(lines) > 5
    assert [w for line in lines for w in line] == keymap.encode(events)
    for line in lines:
        assert len(" ".join(["input send", *line])) <= LINE_LIMIT
        assert line[-1] == "0,0,0"  # every text update fits one line, so cuts fall after SYN


def test_an_update_longer_than_a_line_is_cut_inside() -> None:
    events = [(EventType.ABS, Abs.X, 30000 + i) for i in range(60)] + [SYN]
    lines = list(batches(events))
    assert len(lines) > 1
    assert [w for line in lines for w in line] == keymap.encode(events)
    assert all(len(" ".join(["input send", *line])) <= LINE_LIMIT for line in lines)
    assert list(batches([(KEY, 30, 1)])) == [["1,30,1"]]  # no SYN at the end: still sent
