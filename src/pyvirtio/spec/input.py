"""virtio-input definitions (VIRTIO 1.4 §5.8 Input Device).

Two queues (§5.8.2): ``eventq`` 0 (device to driver: input events) and ``statusq`` 1
(driver to device: LED and sound feedback). No feature bits (§5.8.3). The config
space (§5.8.4) is a window the driver points with ``select`` and ``subsel``; the
device answers ``size`` and the union ``u``. Events on both queues are
``struct virtio_input_event``, evdev's ``type``, ``code`` and ``value`` in little
endian (§5.8.6).

The event codes are Linux's (``include/uapi/linux/input-event-codes.h``), which the
specification defers to: only the ones pyvirtio's kinds of device and its ``pyvirtio
input`` command use are named here.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "ABSINFO",
    "ABS_CNT",
    "CONFIG_HEADER",
    "CONFIG_PAYLOAD_SIZE",
    "CONFIG_SIZE",
    "DEVIDS",
    "EVENT",
    "EVENTQ",
    "KEY_CNT",
    "KEY_CODES",
    "STATUSQ",
    "SYN_REPORT",
    "Abs",
    "Button",
    "ConfigSelect",
    "EventType",
    "InputProp",
    "Led",
    "Rel",
]

#: Queue indexes (§5.8.2).
EVENTQ = 0
STATUSQ = 1


class ConfigSelect(enum.IntEnum):
    """``enum virtio_input_config_select`` (§5.8.4)."""

    UNSET = 0x00
    ID_NAME = 0x01
    ID_SERIAL = 0x02
    ID_DEVIDS = 0x03
    PROP_BITS = 0x10
    EV_BITS = 0x11
    ABS_INFO = 0x12


#: ``struct virtio_input_config`` up to the union (§5.8.4): select, subsel, size,
#: reserved[5].
CONFIG_HEADER = struct.Struct("<BBB5x")
#: The union ``u``: ``char string[128]`` / ``u8 bitmap[128]`` / absinfo / devids.
CONFIG_PAYLOAD_SIZE = 128
#: The whole config space: 136 bytes (QEMU's ``sizeof(virtio_input_config)``).
CONFIG_SIZE = CONFIG_HEADER.size + CONFIG_PAYLOAD_SIZE
#: ``struct virtio_input_absinfo`` (§5.8.4): min, max, fuzz, flat, res. The
#: specification says le32; Linux hands them to ``input_set_abs_params`` as ``int``,
#: so they are packed signed (an axis from -100 to 100 is common).
ABSINFO = struct.Struct("<iiiii")
#: ``struct virtio_input_devids`` (§5.8.4): bustype, vendor, product, version.
DEVIDS = struct.Struct("<HHHH")
#: ``struct virtio_input_event`` (§5.8.6): type, code, value. ``value`` is evdev's
#: signed ``__s32`` (a relative move of -1 is 0xFFFFFFFF on the wire).
EVENT = struct.Struct("<HHi")

#: evdev's code space sizes (``KEY_CNT``, ``ABS_CNT``): the largest bitmaps.
KEY_CNT = 0x300
ABS_CNT = 0x40


class EventType(enum.IntEnum):
    """evdev event types (``EV_*``)."""

    SYN = 0x00
    KEY = 0x01
    REL = 0x02
    ABS = 0x03
    MSC = 0x04
    SW = 0x05
    LED = 0x11
    SND = 0x12
    REP = 0x14
    FF = 0x15


#: ``SYN_REPORT``: the code of the EV_SYN event that ends one device update.
SYN_REPORT = 0


class Rel(enum.IntEnum):
    """Relative axes (``REL_*``)."""

    X = 0x00
    Y = 0x01
    HWHEEL = 0x06
    WHEEL = 0x08


class Abs(enum.IntEnum):
    """Absolute axes (``ABS_*``)."""

    X = 0x00
    Y = 0x01
    MT_SLOT = 0x2F
    MT_POSITION_X = 0x35
    MT_POSITION_Y = 0x36
    MT_TRACKING_ID = 0x39


class Button(enum.IntEnum):
    """Buttons (``BTN_*``, EV_KEY codes)."""

    LEFT = 0x110
    RIGHT = 0x111
    MIDDLE = 0x112
    SIDE = 0x113
    EXTRA = 0x114
    TOUCH = 0x14A


class Led(enum.IntEnum):
    """Keyboard LEDs (``LED_*``), what the driver reports on the statusq."""

    NUML = 0x00
    CAPSL = 0x01
    SCROLLL = 0x02
    COMPOSE = 0x03
    KANA = 0x04


class InputProp(enum.IntEnum):
    """Device properties (``INPUT_PROP_*``), the PROP_BITS bitmap."""

    POINTER = 0x00
    DIRECT = 0x01


def _keys() -> dict[str, int]:
    codes = {"KEY_ESC": 1, "KEY_MINUS": 12, "KEY_EQUAL": 13, "KEY_BACKSPACE": 14,
             "KEY_TAB": 15, "KEY_LEFTBRACE": 26, "KEY_RIGHTBRACE": 27, "KEY_ENTER": 28,
             "KEY_LEFTCTRL": 29, "KEY_SEMICOLON": 39, "KEY_APOSTROPHE": 40, "KEY_GRAVE": 41,
             "KEY_LEFTSHIFT": 42, "KEY_BACKSLASH": 43, "KEY_COMMA": 51, "KEY_DOT": 52,
             "KEY_SLASH": 53, "KEY_RIGHTSHIFT": 54, "KEY_KPASTERISK": 55, "KEY_LEFTALT": 56,
             "KEY_SPACE": 57, "KEY_CAPSLOCK": 58, "KEY_NUMLOCK": 69, "KEY_SCROLLLOCK": 70,
             "KEY_KPMINUS": 74, "KEY_KPPLUS": 78, "KEY_KPDOT": 83, "KEY_102ND": 86,
             "KEY_F11": 87, "KEY_F12": 88, "KEY_KPENTER": 96, "KEY_RIGHTCTRL": 97,
             "KEY_KPSLASH": 98, "KEY_SYSRQ": 99, "KEY_RIGHTALT": 100, "KEY_HOME": 102,
             "KEY_UP": 103, "KEY_PAGEUP": 104, "KEY_LEFT": 105, "KEY_RIGHT": 106,
             "KEY_END": 107, "KEY_DOWN": 108, "KEY_PAGEDOWN": 109, "KEY_INSERT": 110,
             "KEY_DELETE": 111, "KEY_MUTE": 113, "KEY_VOLUMEDOWN": 114, "KEY_VOLUMEUP": 115,
             "KEY_POWER": 116, "KEY_KPEQUAL": 117, "KEY_PAUSE": 119, "KEY_LEFTMETA": 125,
             "KEY_RIGHTMETA": 126, "KEY_COMPOSE": 127}
    for i, digit in enumerate("1234567890"):
        codes[f"KEY_{digit}"] = 2 + i
    # The letter rows of a PC keyboard: each row's codes are consecutive.
    for first, row in ((16, "QWERTYUIOP"), (30, "ASDFGHJKL"), (44, "ZXCVBNM")):
        for i, letter in enumerate(row):
            codes[f"KEY_{letter}"] = first + i
    for i in range(10):
        codes[f"KEY_F{i + 1}"] = 59 + i
    for code, name in ((71, "KP7"), (72, "KP8"), (73, "KP9"), (75, "KP4"), (76, "KP5"),
                       (77, "KP6"), (79, "KP1"), (80, "KP2"), (81, "KP3"), (82, "KP0")):
        codes[f"KEY_{name}"] = code
    return codes


#: Key names (``KEY_A``...) to codes: the keys of a US PC keyboard, which the
#: keyboard kind advertises and ``pyvirtio input --key`` names.
KEY_CODES: dict[str, int] = _keys()
