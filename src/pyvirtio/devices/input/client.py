"""``pyvirtio input SOCK``: events for a running ``pyvirtio serve input`` daemon.

The command builds evdev events (:mod:`pyvirtio.devices.input.keymap`) and sends
them over the daemon's control socket as ``input send TYPE,CODE,VALUE...`` lines,
in order, each line within the control socket's 256 bytes and cut between device
updates (after a ``SYN_REPORT``) where it can be. ``--evdev`` forwards a host
``/dev/input/eventN`` the same way, update by update, until it ends.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pyvirtio.client import ask, command_failed
from pyvirtio.devices.input import keymap
from pyvirtio.devices.input.caps import Kind
from pyvirtio.devices.input.keymap import Event
from pyvirtio.errors import NoDaemon
from pyvirtio.spec.input import SYN_REPORT, EventType

__all__ = [
    "EVDEV_EVENT",
    "LINE_LIMIT",
    "add_arguments",
    "batches",
    "build_events",
    "read_evdev",
    "run",
]

#: The longest ``input send`` line (the daemon reads 256 bytes of a command).
LINE_LIMIT = 250
#: ``struct input_event`` as a host's evdev device gives it: ``struct timeval``
#: (two native longs), type, code, value; 24 bytes on x86-64.
EVDEV_EVENT = struct.Struct("@llHHi")
#: ``EVIOCGRAB``: ``_IOW('E', 0x90, int)``.
_EVIOCGRAB = 0x40044590
#: How long a full device queue is waited on before giving up.
_FULL_WAIT = 10.0

_PREFIX = "input send"


class _Step(argparse.Action):
    """Keeps the event options in command-line order (``--abs 10 10 --click left``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        steps = [*getattr(namespace, "steps", []), (self.dest, values)]
        namespace.steps = steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pyvirtio input``."""
    parser.add_argument("socket", type=Path, help="the daemon's --socket")
    parser.add_argument("--text", action=_Step, metavar="TEXT",
                        help="type TEXT with a US layout (shift for capitals and symbols)")
    parser.add_argument("--key", action=_Step, metavar="KEY",
                        help="press and release KEY (KEY_A, KEY_ENTER, BTN_LEFT, a number; "
                        "KEY_LEFTCTRL+KEY_C for a combination)")
    parser.add_argument("--move", action=_Step, nargs=2, type=int, metavar=("DX", "DY"),
                        help="move a mouse by DX, DY")
    parser.add_argument("--abs", action=_Step, nargs=2, type=int, metavar=("X", "Y"),
                        help="put a tablet's pointer at X, Y (0..32767 each); a multitouch "
                        "screen is touched there")
    parser.add_argument("--click", action=_Step, choices=sorted(keymap.BUTTONS),
                        help="press and release a button")
    parser.add_argument("--evdev", type=Path, metavar="DEVICE",
                        help="then forward the host's /dev/input/eventN DEVICE until it "
                        "ends (Ctrl-C stops)")
    parser.add_argument("--grab", action="store_true",
                        help="with --evdev: grab DEVICE, so only the guest gets its events")
    parser.add_argument("--json", action="store_true",
                        help="print the daemon's last answer as JSON")
    parser.set_defaults(steps=[])


def build_events(steps: list[tuple[str, Any]], kind: Kind) -> list[Event]:
    """The events of the command line's steps, in order, for a ``kind`` device.

    Raises:
        ValueError: text no US key types, an unknown key, a coordinate out of range.
    """
    events: list[Event] = []
    touches = 0
    for option, value in steps:
        if option == "text":
            events += keymap.text(value)
        elif option == "key":
            events += keymap.keys(value)
        elif option == "move":
            events += keymap.move(*value)
        elif option == "abs":
            touches += 1
            x, y = value
            events += keymap.absolute(x, y, kind, tracking_id=touches)
        elif option == "click":
            events += keymap.click(value)
    return events


def batches(events: Sequence[Event], limit: int = LINE_LIMIT) -> Iterator[list[str]]:
    """``events`` as the words of ``input send`` lines of at most ``limit`` bytes,
    cut after a ``SYN_REPORT`` unless one update alone is too long."""
    line: list[str] = []
    size = len(_PREFIX)
    group: list[str] = []
    for word, event in zip(keymap.encode(events), events, strict=True):
        group.append(word)
        if event[:2] != (EventType.SYN, SYN_REPORT):
            continue
        group_size = sum(len(w) + 1 for w in group)
        if size + group_size > limit and line:
            yield line
            line, size = [], len(_PREFIX)
        for word_ in group:
            if size + len(word_) + 1 > limit:
                yield line
                line, size = [], len(_PREFIX)
            line.append(word_)
            size += len(word_) + 1
        group = []
    for word_ in group:  # a last update without SYN_REPORT
        if size + len(word_) + 1 > limit:
            yield line
            line, size = [], len(_PREFIX)
        line.append(word_)
        size += len(word_) + 1
    if line:
        yield line


def _send(socket_path: Path, words: list[str]) -> dict[str, Any]:
    """One ``input send`` line; a daemon whose queue is full is asked again for a while.

    Raises:
        NoDaemon: no daemon answers.
        ValueError: the daemon refused the events.
    """
    deadline = time.monotonic() + _FULL_WAIT
    while True:
        answer: dict[str, Any] = ask(socket_path, " ".join([_PREFIX, *words]))
        if answer.get("ok"):
            return answer
        if not answer.get("full") or time.monotonic() > deadline:
            raise ValueError(str(answer.get("error", answer)))
        time.sleep(0.05)


def _read(fd: int) -> bytes:
    """The next records of an evdev device; b"" at its end, or when it went away
    (ENODEV: unplugged)."""
    try:
        return os.read(fd, EVDEV_EVENT.size * 64)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return b""
        raise


def read_evdev(fd: int, on_update: Callable[[list[Event]], None]) -> None:
    """Read ``struct input_event`` records from ``fd`` until its end (or until the
    device is unplugged), handing each update (the events up to a ``SYN_REPORT``,
    which is included) to ``on_update``. Other EV_SYN codes (SYN_DROPPED...) are not
    forwarded.

    Raises:
        OSError: reading failed otherwise.
    """
    pending = b""
    update: list[Event] = []
    while chunk := _read(fd):
        pending += chunk
        whole = len(pending) - len(pending) % EVDEV_EVENT.size
        for _, _, type_, code, value in EVDEV_EVENT.iter_unpack(pending[:whole]):
            if type_ == EventType.SYN:
                if code == SYN_REPORT and update:
                    on_update([*update, (type_, code, value)])
                    update = []
                continue
            update.append((type_, code, value))
        pending = pending[whole:]


def run(args: argparse.Namespace) -> int:
    """``pyvirtio input SOCK [--text T] [--key K] [--move DX DY] [--abs X Y]
    [--click B] [--evdev DEV]``."""
    try:
        info: dict[str, Any] = ask(args.socket, "input info")
    except NoDaemon as exc:
        return command_failed("input", str(exc))
    if not info.get("ok") or "name" not in info:
        return command_failed("input", f"{args.socket} is not an input daemon: "
                              f"{info.get('error', info)}")
    kind = Kind(info["kind"]) if info.get("kind") else Kind.KEYBOARD
    if not args.steps and args.evdev is None:
        print(json.dumps(info, indent=2) if args.json else
              f"{args.socket}: {kind} {info['name']!r}, {info['delivered']} events delivered, "
              f"{info['pending']} waiting, LEDs {info['leds'] or 'none reported'}")
        return 0
    totals = {"queued": 0, "unsupported": 0}
    last = info

    def send(events: list[Event]) -> None:
        nonlocal last
        for words in batches(events):
            last = _send(args.socket, words)
            totals["queued"] += last["queued"]
            totals["unsupported"] += last["unsupported"]

    try:
        send(build_events(args.steps, kind))
        if args.evdev is not None:
            fd = os.open(args.evdev, os.O_RDONLY)
            try:
                if args.grab:
                    fcntl.ioctl(fd, _EVIOCGRAB, 1)
                read_evdev(fd, send)
            except KeyboardInterrupt:
                pass
            finally:
                os.close(fd)
    except (NoDaemon, OSError, ValueError) as exc:
        return command_failed("input", str(exc))
    if args.json:
        print(json.dumps({**last, **totals}, indent=2))
    else:
        print(f"{args.socket}: {totals['queued']} events queued for the guest "
              f"({last['pending']} waiting for its buffers, {last['delivered']} delivered "
              "so far)" + (f", {totals['unsupported']} the {kind} does not have left out"
                           if args.evdev is not None and totals["unsupported"] else ""))
    # A host device has events a guest device lacks (MSC_SCAN...): only the command
    # line's own events must all go through.
    if totals["unsupported"] and args.evdev is None:
        return command_failed("input", f"{totals['unsupported']} events left out: the "
                              f"{kind} does not have those keys, buttons or axes")
    return 0
