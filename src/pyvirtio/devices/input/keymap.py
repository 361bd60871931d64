"""Input events for ``pyvirtio input``: typed text, keys, moves, absolute positions, clicks.

Each function returns evdev events ``(type, code, value)`` grouped as a device sends
them: every update ends with ``SYN_REPORT`` (VIRTIO 1.4 §5.8.6.2 keeps such a
sequence whole). Text is typed with a US layout: a capital letter or a shifted
symbol is the key with left shift held around it.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyvirtio.devices.input.caps import ABS_MAX, Kind
from pyvirtio.spec.input import KEY_CNT, KEY_CODES, SYN_REPORT, Abs, Button, EventType, Rel

__all__ = [
    "BUTTONS",
    "Event",
    "absolute",
    "click",
    "encode",
    "key_code",
    "keys",
    "move",
    "text",
    "text_keys",
]

#: One evdev event: type, code, value.
Event = tuple[int, int, int]

#: ``--click`` names.
BUTTONS = {"left": Button.LEFT, "right": Button.RIGHT, "middle": Button.MIDDLE,
           "side": Button.SIDE, "extra": Button.EXTRA}

_SYN: Event = (EventType.SYN, SYN_REPORT, 0)
_SHIFT = KEY_CODES["KEY_LEFTSHIFT"]


def _us_layout() -> dict[str, tuple[int, bool]]:
    """Character -> (key code, shift held) on a US keyboard."""
    layout: dict[str, tuple[int, bool]] = {}
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        layout[letter.lower()] = (KEY_CODES[f"KEY_{letter}"], False)
        layout[letter] = (KEY_CODES[f"KEY_{letter}"], True)
    for digit, shifted in zip("1234567890", "!@#$%^&*()", strict=True):
        layout[digit] = (KEY_CODES[f"KEY_{digit}"], False)
        layout[shifted] = (KEY_CODES[f"KEY_{digit}"], True)
    for plain, shifted, name in (("-", "_", "MINUS"), ("=", "+", "EQUAL"),
                                 ("[", "{", "LEFTBRACE"), ("]", "}", "RIGHTBRACE"),
                                 (";", ":", "SEMICOLON"), ("'", '"', "APOSTROPHE"),
                                 ("`", "~", "GRAVE"), ("\\", "|", "BACKSLASH"),
                                 (",", "<", "COMMA"), (".", ">", "DOT"), ("/", "?", "SLASH")):
        layout[plain] = (KEY_CODES[f"KEY_{name}"], False)
        layout[shifted] = (KEY_CODES[f"KEY_{name}"], True)
    layout[" "] = (KEY_CODES["KEY_SPACE"], False)
    layout["\n"] = (KEY_CODES["KEY_ENTER"], False)
    layout["\t"] = (KEY_CODES["KEY_TAB"], False)
    return layout


_US = _us_layout()


def text_keys(typed: str) -> list[tuple[int, bool]]:
    """The (key, shift) strokes that type ``typed`` on a US keyboard.

    Raises:
        ValueError: a character no US key types.
    """
    strokes = []
    for char in typed:
        if char not in _US:
            raise ValueError(f"no US keyboard key types {char!r}")
        strokes.append(_US[char])
    return strokes


def _press(code: int, value: int) -> list[Event]:
    return [(EventType.KEY, code, value), _SYN]


def text(typed: str) -> list[Event]:
    """Events typing ``typed``: each key down then up, shift around capitals and
    shifted symbols.

    Raises:
        ValueError: a character no US key types.
    """
    events: list[Event] = []
    for code, shift in text_keys(typed):
        if shift:
            events += _press(_SHIFT, 1)
        events += _press(code, 1) + _press(code, 0)
        if shift:
            events += _press(_SHIFT, 0)
    return events


def key_code(name: str) -> int:
    """The code of a key named ``KEY_A``, ``A``, ``BTN_LEFT``, or a number (a code:
    ``1`` is KEY_ESC, ``KEY_1`` the 1 key).

    Raises:
        ValueError: an unknown name, or a number outside evdev's key codes.
    """
    try:
        code = int(name, 0)
    except ValueError:
        upper = name.upper()
        for candidate in (upper, f"KEY_{upper}"):
            if candidate in KEY_CODES:
                return KEY_CODES[candidate]
        if upper.startswith("BTN_") and upper[4:] in Button.__members__:
            return int(Button[upper[4:]])
        raise ValueError(f"unknown key {name!r} (KEY_A, KEY_ENTER, BTN_LEFT... or a "
                         "number)") from None
    if not 0 < code < KEY_CNT:
        raise ValueError(f"key code {code} outside 1..{KEY_CNT - 1}")
    return code


def keys(combo: str) -> list[Event]:
    """Events pressing ``combo`` (``KEY_A``, or ``KEY_LEFTCTRL+KEY_C``): each key
    down in order, then up in reverse order.

    Raises:
        ValueError: an unknown key.
    """
    codes = [key_code(part) for part in combo.split("+")]
    events: list[Event] = []
    for code in codes:
        events += _press(code, 1)
    for code in reversed(codes):
        events += _press(code, 0)
    return events


def move(dx: int, dy: int) -> list[Event]:
    """A relative move (REL_X, REL_Y; an axis that does not move is left out).

    Raises:
        ValueError: a distance that does not fit evdev's 32-bit value.
    """
    for value in (dx, dy):
        if not -(1 << 31) <= value < 1 << 31:
            raise ValueError(f"move {value} does not fit 32 bits")
    events = [(EventType.REL, axis, value)
              for axis, value in ((Rel.X, dx), (Rel.Y, dy)) if value]
    return [*events, _SYN] if events else []


def absolute(x: int, y: int, kind: Kind, tracking_id: int = 0) -> list[Event]:
    """The pointer at (``x``, ``y``), 0..32767 on each axis (the device's ABS_INFO).

    A tablet moves there (ABS_X, ABS_Y). A multitouch screen is touched there and
    released: slot 0 gets ``tracking_id``, its position and the single-touch axes
    with BTN_TOUCH, then tracking id -1 and BTN_TOUCH up.

    Raises:
        ValueError: a coordinate outside 0..32767, or a kind without absolute axes.
    """
    for value in (x, y):
        if not 0 <= value <= ABS_MAX:
            raise ValueError(f"absolute coordinate {value} outside 0..{ABS_MAX}")
    if kind is Kind.TABLET:
        return [(EventType.ABS, Abs.X, x), (EventType.ABS, Abs.Y, y), _SYN]
    if kind is Kind.MULTITOUCH:
        return [(EventType.ABS, Abs.MT_SLOT, 0),
                (EventType.ABS, Abs.MT_TRACKING_ID, tracking_id % 0x10000),
                (EventType.ABS, Abs.MT_POSITION_X, x), (EventType.ABS, Abs.MT_POSITION_Y, y),
                (EventType.KEY, Button.TOUCH, 1),
                (EventType.ABS, Abs.X, x), (EventType.ABS, Abs.Y, y), _SYN,
                (EventType.ABS, Abs.MT_TRACKING_ID, -1), (EventType.KEY, Button.TOUCH, 0),
                _SYN]
    raise ValueError(f"a {kind} has no absolute axes (--abs is for a tablet or a "
                     "multitouch screen)")


def click(button: str) -> list[Event]:
    """A click: ``button`` (left, right, middle, side, extra) down, then up.

    Raises:
        ValueError: an unknown button.
    """
    if button not in BUTTONS:
        raise ValueError(f"unknown button {button!r} (one of {', '.join(BUTTONS)})")
    return _press(BUTTONS[button], 1) + _press(BUTTONS[button], 0)


def encode(events: Iterable[Event]) -> list[str]:
    """The words of an ``input send`` control command: ``TYPE,CODE,VALUE`` each."""
    return [f"{t},{c},{v}" for t, c, v in events]

