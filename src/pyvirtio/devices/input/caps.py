"""What an input device says it is: the answers of its config space (VIRTIO 1.4 §5.8.4).

A :class:`Capabilities` holds the identity (name, serial, ids), the properties, the
event codes of each event type and the ranges of the absolute axes.
:meth:`Capabilities.window` answers one ``select``/``subsel`` pair, and
:func:`capabilities` builds those of the four kinds ``pyvirtio serve input --kind``
offers, modelled on QEMU's built-in virtio-keyboard, -mouse, -tablet and
-multitouch: a Linux guest shows the same event types, axes and properties
(``/proc/bus/input/devices``), except that the keyboard has the keys of a US PC
keyboard rather than every key QEMU maps, the pointers have no BTN_TOUCH or
BTN_GEAR_* buttons, and the touch screen adds single-touch ABS_X/ABS_Y and
BTN_TOUCH (so that pointer users see it) in place of the mouse buttons.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pyvirtio.spec.input import (
    ABSINFO,
    CONFIG_PAYLOAD_SIZE,
    DEVIDS,
    KEY_CNT,
    KEY_CODES,
    Abs,
    Button,
    ConfigSelect,
    EventType,
    InputProp,
    Led,
    Rel,
)

__all__ = [
    "ABS_MAX",
    "BUS_VIRTUAL",
    "MT_SLOTS",
    "AbsAxis",
    "Capabilities",
    "Kind",
    "capabilities",
]

#: ``BUS_VIRTUAL`` (Linux ``input.h``): the bus type of the ID_DEVIDS answer.
BUS_VIRTUAL = 0x06
#: The vendor id QEMU's HID devices report (ID_DEVIDS), kept so guests treat the
#: devices alike.
_VENDOR = 0x0627
#: The top of the absolute axes (0..32767), as QEMU's tablet.
ABS_MAX = 0x7FFF
#: Touch slots of the multitouch kind.
MT_SLOTS = 10
#: Buttons of the mouse and the tablet.
_BUTTONS = frozenset({Button.LEFT, Button.RIGHT, Button.MIDDLE, Button.SIDE, Button.EXTRA})


class Kind(enum.StrEnum):
    """The kinds of device ``pyvirtio serve input --kind`` makes."""

    KEYBOARD = "keyboard"
    MOUSE = "mouse"
    TABLET = "tablet"
    MULTITOUCH = "multitouch"


@dataclass(frozen=True, slots=True)
class AbsAxis:
    """One absolute axis (``struct virtio_input_absinfo``, §5.8.4)."""

    min: int
    max: int
    fuzz: int = 0
    flat: int = 0
    res: int = 0

    def __post_init__(self) -> None:
        for value in (self.min, self.max, self.fuzz, self.flat, self.res):
            if not -(1 << 31) <= value < 1 << 31:
                raise ValueError(f"axis value {value} does not fit 32 bits")
        if self.min > self.max:
            raise ValueError(f"axis min {self.min} above max {self.max}")


def _frozen(mapping: Mapping[int, frozenset[int]] | Mapping[int, AbsAxis]) -> Mapping[int, object]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """An input device's identity and the events it sends.

    Attributes:
        name: ID_NAME (at most 128 bytes of UTF-8, no NUL terminator on the wire).
        serial: ID_SERIAL ("" answers size 0).
        devids: ID_DEVIDS: bustype, vendor, product, version.
        props: PROP_BITS: ``INPUT_PROP_*`` numbers.
        events: EV_BITS: event type -> its codes (an empty set still advertises the
            type, with a one-byte empty bitmap, as EV_REP is).
        axes: ABS_INFO: absolute axis -> its range.
    """

    name: str
    serial: str = ""
    devids: tuple[int, int, int, int] = (BUS_VIRTUAL, 0, 0, 0)
    props: frozenset[int] = frozenset()
    events: Mapping[int, frozenset[int]] = field(default_factory=dict)
    axes: Mapping[int, AbsAxis] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label, text in (("name", self.name), ("serial", self.serial)):
            if len(text.encode()) > CONFIG_PAYLOAD_SIZE:
                raise ValueError(f"the {label} is {len(text.encode())} bytes of UTF-8; "
                                 f"the config space holds {CONFIG_PAYLOAD_SIZE}")
            if "\0" in text:
                raise ValueError(f"the {label} contains a NUL character")
        if any(not 0 <= part <= 0xFFFF for part in self.devids):
            raise ValueError(f"device ids {self.devids} do not fit 16 bits")
        limit = CONFIG_PAYLOAD_SIZE * 8
        for type_, codes in self.events.items():
            if not 0 <= type_ <= 0xFF:
                raise ValueError(f"event type {type_} does not fit the subsel byte")
            if any(not 0 <= code < min(limit, KEY_CNT) for code in codes):
                raise ValueError(f"event type {type_}: a code outside 0..{KEY_CNT - 1}")
        if any(not 0 <= prop < limit for prop in self.props):
            raise ValueError("a property outside the 128-byte bitmap")
        if any(not 0 <= axis <= 0xFF for axis in self.axes):
            raise ValueError("an axis number does not fit the subsel byte")
        if set(self.axes) != set(self.events.get(EventType.ABS, ())):
            raise ValueError("the axes with ABS_INFO must be the EV_ABS codes")
        object.__setattr__(self, "events", _frozen(self.events))
        object.__setattr__(self, "axes", _frozen(self.axes))

    def supports(self, type_: int, code: int) -> bool:
        """Whether the device advertises event ``type_``/``code`` (EV_SYN always)."""
        return type_ == EventType.SYN or code in self.events.get(type_, ())

    def window(self, select: int, subsel: int) -> bytes:
        """The answer to ``select``/``subsel``: the first ``size`` bytes of ``u``
        (§5.8.4). Empty (size 0) for what the device does not have, which
        §5.8.5.2 requires ("MUST set the size field to zero")."""
        if select == ConfigSelect.ID_NAME and subsel == 0:
            return self.name.encode()
        if select == ConfigSelect.ID_SERIAL and subsel == 0:
            return self.serial.encode()
        if select == ConfigSelect.ID_DEVIDS and subsel == 0:
            return DEVIDS.pack(*self.devids)
        if select == ConfigSelect.PROP_BITS and subsel == 0:
            return _bitmap(self.props) if self.props else b""
        if select == ConfigSelect.EV_BITS and subsel in self.events:
            return _bitmap(self.events[subsel])
        if select == ConfigSelect.ABS_INFO and subsel in self.axes:
            axis = self.axes[subsel]
            return ABSINFO.pack(axis.min, axis.max, axis.fuzz, axis.flat, axis.res)
        return b""


def _bitmap(bits: frozenset[int]) -> bytes:
    """A bitmap of ``bits`` (bit n: byte n // 8, bit n % 8), as short as it can be
    but one byte at least."""
    out = bytearray(max(bits, default=0) // 8 + 1)
    for bit in bits:
        out[bit // 8] |= 1 << (bit % 8)
    return bytes(out)


_DEFAULT_NAMES = {
    Kind.KEYBOARD: "pyvirtio Keyboard",
    Kind.MOUSE: "pyvirtio Mouse",
    Kind.TABLET: "pyvirtio Tablet",
    Kind.MULTITOUCH: "pyvirtio MultiTouch",
}


def capabilities(kind: Kind, name: str | None = None, serial: str = "") -> Capabilities:
    """The capabilities of a ``kind`` device, named ``name`` (default
    ``pyvirtio Keyboard`` and so on).

    - keyboard: the keys of :data:`~pyvirtio.spec.input.KEY_CODES`, the NumLock,
      CapsLock and ScrollLock LEDs (the driver reports them on the statusq) and EV_REP
      (the guest repeats held keys itself);
    - mouse: five buttons, relative X, Y and wheel;
    - tablet: five buttons, absolute X and Y (0..32767), a wheel;
    - multitouch: :data:`MT_SLOTS` touch slots with absolute positions, BTN_TOUCH
      and the single-touch ABS_X/ABS_Y, INPUT_PROP_DIRECT.

    Raises:
        ValueError: the name or serial does not fit the config space.
    """
    name = _DEFAULT_NAMES[kind] if name is None else name
    product = {Kind.KEYBOARD: 1, Kind.MOUSE: 2, Kind.TABLET: 3, Kind.MULTITOUCH: 4}[kind]
    devids = (BUS_VIRTUAL, _VENDOR, product, 1)
    screen = AbsAxis(0, ABS_MAX)
    if kind is Kind.KEYBOARD:
        return Capabilities(
            name, serial, devids,
            events={EventType.KEY: frozenset(KEY_CODES.values()),
                    EventType.LED: frozenset({Led.NUML, Led.CAPSL, Led.SCROLLL}),
                    EventType.REP: frozenset()},
        )
    if kind is Kind.MOUSE:
        return Capabilities(
            name, serial, devids,
            events={EventType.KEY: _BUTTONS,
                    EventType.REL: frozenset({Rel.X, Rel.Y, Rel.WHEEL})},
        )
    if kind is Kind.TABLET:
        return Capabilities(
            name, serial, devids,
            events={EventType.KEY: _BUTTONS, EventType.REL: frozenset({Rel.WHEEL}),
                    EventType.ABS: frozenset({Abs.X, Abs.Y})},
            axes={Abs.X: screen, Abs.Y: screen},
        )
    axes: dict[int, AbsAxis] = {Abs.X: screen, Abs.Y: screen, Abs.MT_POSITION_X: screen,
            Abs.MT_POSITION_Y: screen, Abs.MT_SLOT: AbsAxis(0, MT_SLOTS - 1),
            Abs.MT_TRACKING_ID: AbsAxis(0, 0xFFFF)}
    return Capabilities(
        name, serial, devids, props=frozenset({InputProp.DIRECT}),
        events={EventType.KEY: frozenset({Button.TOUCH}), EventType.ABS: frozenset(axes)},
        axes=axes,
    )
