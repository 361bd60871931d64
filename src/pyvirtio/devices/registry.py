"""The device types pyvirtio knows: one entry per type, read by every part that needs one.

A :class:`DeviceType` says everything the rest of the program needs to know about a
kind of device: its ``pyvirtio serve`` sub-command (options and the factory that
builds the device from them), its virtio device ID, how QEMU attaches it, and how
``pyvirtio probe`` names its feature bits and decodes its config space. The CLI,
``probe``, the guest kit and ``pyvirtio devices`` all read :func:`device_types`.

Where the entries come from:

- the built-in devices, each declared once next to its model (:data:`BUILTIN`);
- third-party devices: an installed distribution names a :class:`DeviceType` in the
  entry-point group :data:`ENTRY_POINT_GROUP`::

      [project.entry-points."pyvirtio.devices"]
      uppercase = "mypackage.uppercase:UPPERCASE_TYPE"

An entry point that fails to load, or names something else, is skipped with a
warning; so is one whose name a built-in device already has (the built-in wins), or
an earlier entry point's.

Built-ins are a static list rather than entry points of pyvirtio's own distribution
so that they need no installed metadata: they are there when pyvirtio runs from a
source tree or from a stale editable install, and no other distribution
can shadow them.
"""

from __future__ import annotations

import argparse
import enum
import importlib.metadata
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvirtio.devices.base import VirtioDevice

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "ClientCommand",
    "ConfigDecoder",
    "DeviceRegistry",
    "DeviceType",
    "Registration",
    "ServeOptions",
    "device_types",
    "discover",
    "parse_size",
    "positive_int",
]

log = logging.getLogger(__name__)

#: The entry-point group third-party device types register in.
ENTRY_POINT_GROUP = "pyvirtio.devices"

#: The built-in device types, as ``module:attribute`` (the entry-point syntax), in the
#: order ``pyvirtio serve --help`` lists them.
BUILTIN = (
    "pyvirtio.devices.blk_type:BLK_TYPE",
    "pyvirtio.devices.scsi.entry:SCSI_TYPE",
    "pyvirtio.devices.fs.entry:FS_TYPE",
    "pyvirtio.devices.net.entry:NET_TYPE",
    "pyvirtio.devices.vsock.entry:VSOCK_TYPE",
    "pyvirtio.devices.console.entry:CONSOLE_TYPE",
    "pyvirtio.devices.rng:RNG_TYPE",
    "pyvirtio.devices.balloon_type:BALLOON_TYPE",
    "pyvirtio.devices.input.entry:INPUT_TYPE",
    "pyvirtio.devices.gpu.entry:GPU_TYPE",
)

#: Decodes the first :attr:`DeviceType.config_read` bytes of a config space into
#: named fields (``pyvirtio probe`` prints them, ``--json`` carries them).
ConfigDecoder = Callable[[bytes], dict[str, int | bool | str]]

_NAME = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What a device asks of the daemon serving it, besides the options every one has.

    Attributes:
        link_commands: the control socket takes ``link up|down`` (``pyvirtio link``):
            the daemon can close its vhost-user socket to take the link down.
    """

    link_commands: bool = False


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A device type without options of its own."""


@dataclass(frozen=True, slots=True)
class ClientCommand:
    """A top-level ``pyvirtio NAME`` command that talks to a running daemon of a device
    type (blk's ``resize``, the balloon's ``balloon``), declared with the type.

    Attributes:
        name: the command (``pyvirtio NAME``); one a built-in command or an earlier
            device type has is left out, with a warning.
        help: one line for ``pyvirtio --help``.
        add_arguments: adds its arguments (``--log-level`` is already there).
        run: does it; returns the exit status.  Errors are reported with
            :func:`pyvirtio.client.command_failed` (``pyvirtio NAME: ...``).
        description: its ``--help`` text (default: :attr:`help`).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


@dataclass(frozen=True, slots=True)
class DeviceType:
    """One kind of device: how to serve it, attach it to QEMU and probe it.

    Attributes:
        name: the ``pyvirtio serve NAME`` sub-command and ``probe --device NAME``
            (lower case letters, digits, ``-`` and ``_``).
        summary: one line for ``pyvirtio serve --help``.
        device_id: the virtio device ID (VIRTIO 1.4 §5).
        qemu_device: QEMU's ``-device`` driver (``vhost-user-blk-pci``).
        factory: builds the device from the parsed ``serve`` options (``args.socket``
            and those of :attr:`add_arguments`); returns it with what it asks of the
            daemon. It raises ``ValueError`` or ``OSError`` for options that do not
            work together or a back-end that cannot open: ``pyvirtio serve`` prints
            the message and exits with status 2.
        add_arguments: adds the device's own ``serve`` options to its sub-parser
            (``--socket`` and the options every device has are already there).
        description: the ``pyvirtio serve NAME --help`` text (default: the summary).
        qemu_netdev: QEMU attaches the back-end as a network back-end,
            ``-netdev vhost-user,chardev=...``, which the ``-device`` (virtio-net-pci)
            names with ``netdev=`` (virtio-net); otherwise the ``-device`` names the
            chardev itself.
        feature_names: the device-specific feature bits by name (bit -> name), for
            ``probe``; None: the device defines none (virtio-rng, §5.4.3).
        config_read: bytes of config space ``probe`` reads and :attr:`decode_config`
            decodes; 0: the device has no config space (virtio-rng, §5.4.4).
        decode_config: names the fields of those bytes; None: ``probe`` shows none.
        commands: ``pyvirtio`` commands for a running daemon of this type
            (:class:`ClientCommand`), so that the CLI needs no edit for them.
    """

    name: str
    summary: str
    device_id: int
    qemu_device: str
    factory: Callable[[argparse.Namespace], tuple[VirtioDevice, ServeOptions]]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    description: str = ""
    qemu_netdev: bool = False
    feature_names: type[enum.IntEnum] | None = None
    config_read: int = 0
    decode_config: ConfigDecoder | None = None
    commands: tuple[ClientCommand, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"device type name {self.name!r}: lower case letters, digits, "
                             "'-' and '_', starting with a letter")
        if not self.summary or "\n" in self.summary:
            raise ValueError(f"device type {self.name!r}: the summary is one line")
        if not 0 < self.device_id <= 0xFFFF:
            raise ValueError(f"device type {self.name!r}: device ID {self.device_id} "
                             "is not a virtio device ID (1..65535)")
        if self.config_read < 0:
            raise ValueError(f"device type {self.name!r}: config_read {self.config_read} "
                             "is negative")

    @property
    def has_config(self) -> bool:
        """Whether the device has a config space (:attr:`config_read` bytes of it)."""
        return self.config_read > 0

    @property
    def defined_features(self) -> int:
        """The device-specific feature bits the device type defines, as a mask."""
        if self.feature_names is None:
            return 0
        return sum(1 << member.value for member in self.feature_names)

    def qemu_args(
        self, socket_path: Path | str, ident: str, *, reconnect: int | None = None,
        **props: object,
    ) -> list[str]:
        """QEMU arguments attaching a back-end on ``socket_path``: a socket chardev
        ``ident`` and the device (for a netdev type, the netdev ``<ident>n`` between).

        ``props`` become ``,key=value`` device properties (``num_queues=2`` gives
        ``num-queues=2``); ``reconnect`` makes QEMU reconnect after that many seconds.
        """
        chardev = f"socket,id={ident},path={socket_path}"
        if reconnect is not None:
            chardev += f",reconnect={reconnect}"
        args = ["-chardev", chardev]
        if self.qemu_netdev:
            args += ["-netdev", f"vhost-user,id={ident}n,chardev={ident}"]
            device = f"{self.qemu_device},netdev={ident}n"
        else:
            device = f"{self.qemu_device},chardev={ident}"
        for key, value in props.items():
            device += f",{key.replace('_', '-')}={value}"
        return [*args, "-device", device]


@dataclass(frozen=True, slots=True)
class Registration:
    """A registered device type and where it came from.

    Attributes:
        device_type: the entry.
        source: ``module:attribute`` for a built-in; for a third-party one, the entry
            point and its distribution (``uppercase = mypkg.up:UP_TYPE (mypkg 1.0)``).
        builtin: whether pyvirtio itself declares it.
    """

    device_type: DeviceType
    source: str
    builtin: bool


class DeviceRegistry(Mapping[str, DeviceType]):
    """The device types by name, built-ins first (see :func:`discover`).

    Attributes:
        registrations: every accepted entry, in order, with its source.
        problems: why entries were skipped (each was also logged as a warning).
    """

    def __init__(
        self, registrations: Iterable[Registration], problems: Iterable[str] = ()
    ) -> None:
        self.registrations = tuple(registrations)
        self.problems = tuple(problems)
        self._by_name = {r.device_type.name: r for r in self.registrations}

    def __getitem__(self, name: str) -> DeviceType:
        return self._by_name[name].device_type

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def registration(self, name: str) -> Registration:
        """The device type ``name`` with its source (KeyError if there is none)."""
        return self._by_name[name]


def _describe(entry_point: importlib.metadata.EntryPoint) -> str:
    """``name = module:attribute (distribution version)``, for messages."""
    dist = entry_point.dist
    where = f" ({dist.name} {dist.version})" if dist is not None else ""
    return f"{entry_point.name} = {entry_point.value}{where}"


def discover(
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> DeviceRegistry:
    """Load the built-in device types, then the third-party ones.

    ``entry_points``: the third-party entry points (default: the installed ones of
    :data:`ENTRY_POINT_GROUP`). One that cannot be loaded, that names no
    :class:`DeviceType`, or whose type's name is taken is skipped; a warning names
    it, and the registry's ``problems`` keep the message.

    Raises:
        Exception: a built-in entry cannot be loaded (a bug of pyvirtio's, not hidden).
    """
    registrations: list[Registration] = []
    for value in BUILTIN:
        entry = importlib.metadata.EntryPoint(name="", value=value, group=ENTRY_POINT_GROUP)
        device_type = entry.load()
        assert isinstance(device_type, DeviceType), value
        registrations.append(Registration(device_type, value, builtin=True))
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    problems: list[str] = []
    taken = {r.device_type.name: r for r in registrations}
    for entry_point in entry_points:
        source = _describe(entry_point)
        try:
            loaded = entry_point.load()
        except Exception as exc:  # whatever a third party's import raises
            problem = (f"device type entry point {source}: cannot be loaded: "
                       f"{type(exc).__name__}: {exc}")
        else:
            if not isinstance(loaded, DeviceType):
                problem = (f"device type entry point {source}: names a "
                           f"{type(loaded).__name__}, not a pyvirtio DeviceType")
            elif loaded.name in taken:
                winner = taken[loaded.name]
                problem = (f"device type entry point {source}: the name {loaded.name!r} "
                           f"is taken by {'built-in ' if winner.builtin else ''}"
                           f"{winner.source}, which is kept")
            else:
                registration = Registration(loaded, source, builtin=False)
                registrations.append(registration)
                taken[loaded.name] = registration
                continue
        log.warning("%s; ignored", problem)
        problems.append(problem)
    return DeviceRegistry(registrations, problems)


@cache
def device_types() -> DeviceRegistry:
    """The device types, discovered once per process (:func:`discover`).

    ``device_types.cache_clear()`` makes the next call discover them again.
    """
    return discover()


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``512M``, ``1G``, ``2T`` (binary units; an optional ``iB``/``B``).

    An argparse ``type``: a bad size raises ``argparse.ArgumentTypeError``.
    """
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G, 512M, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]



def positive_int(text: str) -> int:
    """A whole number of at least 1 (an argparse ``type``, as ``--queues`` takes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value
