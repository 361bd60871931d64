"""A small blocking QMP client, for tests and tools that drive the guest's QEMU
(``screendump``, ``announce-self``, ``quit``...).

QMP is line-delimited JSON (QEMU's docs/interop/qmp-spec): a greeting, then
``qmp_capabilities``, then commands, each answered by ``return`` or ``error``;
asynchronous events may come in between and are skipped here.  QEMU is started
with ``-qmp unix:PATH,server=on,wait=off``; the socket may appear a moment after
QEMU starts, so connecting retries until ``timeout``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from pyvirtio.errors import QmpError

__all__ = ["Qmp"]


class Qmp:
    """One QMP connection, ready for commands once constructed.

    Raises (at construction):
        OSError: the socket could not be connected to within ``timeout``.
    """

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self.file.readline()  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> object:
        """Run ``command``; its ``return`` value.

        Raises:
            QmpError: QEMU answered with an error, or closed the connection.
        """
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode()
                        + b"\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise QmpError(f"QMP {command}: QEMU closed the connection")
            answer = json.loads(line)
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                raise QmpError(f"QMP {command}: {answer['error']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
