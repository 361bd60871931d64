"""``pyvirtio console``: a terminal attached to a console port's host socket.

The terminal goes into raw mode (every key, Ctrl-C included, goes to the guest);
``Ctrl-]`` detaches.  On SIGWINCH (and once at the start) the terminal's size goes to
``on_resize``, which the CLI turns into the daemon's ``console-size`` control
command (the guest gets a RESIZE message and a config change, VIRTIO 1.4 §5.3.6.2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import termios
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from pyvirtio.client import ask, control_path, send_control

__all__ = ["DETACH", "attach_terminal", "find_console"]

#: The key that detaches the terminal (Ctrl-], as telnet's).
DETACH = b"\x1d"


def find_console(socket_path: Path) -> tuple[Path, Callable[[int, int], None] | None]:
    """Where to attach for ``pyvirtio console SOCKET``, and how to send a new size.

    ``socket_path`` is a console daemon's ``--socket``: its control socket
    (``SOCKET.ctl``) answers ``console`` with the ``--console-socket`` path, and
    takes ``console-size COLS ROWS``.  Without a control socket next to it,
    ``socket_path`` is taken as the console socket itself (no resize then).

    Raises:
        NoDaemon: the daemon does not answer, or not with JSON.
        ValueError: it is not a console daemon, or its console is its stdin/stdout.
    """
    ctl = control_path(socket_path)
    if not ctl.exists():
        return socket_path, None
    answer = ask(socket_path, "console")
    if not answer.get("ok"):
        raise ValueError(f"{socket_path} is not a console daemon: {answer.get('error', answer)}")
    if answer.get("path") is None:
        raise ValueError("the daemon's console is its stdin/stdout (serve it with "
                         "--console-socket PATH to attach)")

    def on_resize(cols: int, rows: int) -> None:
        try:
            send_control(ctl, f"console-size {cols} {rows}")
        except OSError as exc:
            logging.getLogger("pyvirtio").warning("console resize not sent: %s", exc)

    return Path(answer["path"]), on_resize


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """Raw mode on ``fd`` while inside, when it is a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def attach_terminal(
    path: Path, *, stdin: int = 0, stdout: int = 1,
    on_resize: Callable[[int, int], None] | None = None,
) -> str:
    """Relay ``stdin``/``stdout`` and the socket at ``path`` until one side ends.

    Returns why it ended: ``detached`` (Ctrl-]), ``input ended`` (stdin's EOF: what
    was read is sent, then the socket is shut for writing and read to its end) or
    ``closed`` (the daemon closed the socket).

    Raises:
        OSError: the socket cannot be reached.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous: object = None

    def on_winch(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, b"w")

    def send_size() -> None:
        if on_resize is not None:
            size = shutil.get_terminal_size() if not os.isatty(stdout) else os.get_terminal_size(
                stdout)
            on_resize(size.columns, size.lines)

    selector = selectors.DefaultSelector()
    try:
        if on_resize is not None:
            previous = signal.signal(signal.SIGWINCH, on_winch)
            send_size()
        selector.register(sock, selectors.EVENT_READ, "sock")
        selector.register(stdin, selectors.EVENT_READ, "stdin")
        selector.register(wake_r, selectors.EVENT_READ, "winch")
        input_open = True
        with _raw(stdin):
            while True:
                for key, _ in selector.select():
                    if key.data == "winch":
                        os.read(wake_r, 64)
                        send_size()
                    elif key.data == "sock":
                        data = sock.recv(65536)
                        if not data:
                            return "input ended" if not input_open else "closed"
                        _write_all(stdout, data)
                    else:
                        data = os.read(stdin, 65536)
                        if DETACH in data and os.isatty(stdin):
                            sock.sendall(data[:data.index(DETACH)])
                            return "detached"
                        if not data:
                            input_open = False
                            selector.unregister(stdin)
                            sock.shutdown(socket.SHUT_WR)
                            continue
                        sock.sendall(data)
    finally:
        selector.close()
        if on_resize is not None and previous is not None:
            signal.signal(signal.SIGWINCH, previous)  # type: ignore[arg-type]
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
