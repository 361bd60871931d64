"""Boot a Linux guest under QEMU (TCG) and collect what its script reports.

:class:`GuestKit` ties the kit together: :meth:`GuestKit.ensure` provides QEMU
and a kernel, :meth:`GuestKit.run` builds an initramfs around a shell script,
boots it with the caller's extra QEMU arguments (typically vhost-user devices)
and returns a :class:`GuestResult`.  :meth:`GuestKit.start` returns a running
:class:`GuestVM` instead, for tests that act while the guest runs.

Guest memory is a shared memfd (``-object memory-backend-memfd,share=on``), as
vhost-user back-ends must map it.  The kit never starts a back-end itself: its
socket must be listening before QEMU starts.

Results protocol: the script prints ``RESULT key=value`` lines (found anywhere
in a console line, the last one of a key wins); ``/init`` brackets the script
with :data:`~pyvirtio.guestkit.initramfs.BEGIN_MARKER` and
:data:`~pyvirtio.guestkit.initramfs.END_MARKER` carrying its exit status.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.closing import Closing
from pyvirtio.errors import GuestRunError, GuestTimeoutError
from pyvirtio.guestkit.assets import (
    ensure_host_tools,
    ensure_kernel,
    qemu_binary,
)
from pyvirtio.guestkit.initramfs import BEGIN_MARKER, END_MARKER, build_initramfs

__all__ = [
    "KERNEL_COMMAND_LINE",
    "MEMORY_BACKEND_ID",
    "GuestKit",
    "GuestResult",
    "GuestVM",
    "parse_results",
    "qemu_command",
]

logger = logging.getLogger(__name__)

KERNEL_COMMAND_LINE = "console=ttyS0 quiet panic=-1"
"""Serial console, few kernel messages, and reboot (QEMU exits) on a panic."""

MEMORY_BACKEND_ID = "mem"
"""The id of the shared memfd memory backend, for arguments that refer to it."""

INTERACTIVE_CONSOLE_ARGS = (
    "-chardev",
    "stdio,id=console,mux=on,signal=off",
    "-serial",
    "chardev:console",
    "-mon",
    "chardev=console",
)
"""The console of an interactive guest: the terminal, multiplexed with QEMU's monitor.

Ctrl-C goes to the guest (``signal=off``); ``Ctrl-A x`` quits QEMU and
``Ctrl-A c`` switches to the monitor, as with ``-nographic``.
"""

_RESULT_LINE = re.compile(r"RESULT ([^\s=]+)=(.*)")
_END_LINE = re.compile(re.escape(END_MARKER) + r"(\d+)")
_READ_SIZE = 65536


def parse_results(console: str) -> dict[str, str]:
    """Return the ``RESULT key=value`` pairs of *console*, the last one of a key winning."""
    results: dict[str, str] = {}
    for line in console.splitlines():
        match = _RESULT_LINE.search(line)
        if match:
            results[match.group(1)] = match.group(2)
    return results


@dataclass(frozen=True, slots=True)
class GuestResult:
    """What a finished guest run produced.

    Attributes:
        console: the serial console interleaved with QEMU's own messages
            (its stderr), ``\\r`` removed.
        results: the ``RESULT key=value`` lines, parsed by :func:`parse_results`.
        exit_code: the script's exit status, ``None`` if the guest stopped
            before the script ended (it powered off or rebooted itself).
        qemu_returncode: QEMU's exit status (0 after a guest power-off).
    """

    console: str
    results: dict[str, str]
    exit_code: int | None
    qemu_returncode: int

    @classmethod
    def from_console(cls, console: str, qemu_returncode: int) -> GuestResult:
        """Parse the console of a finished run; the last end marker gives the exit code."""
        statuses = _END_LINE.findall(console)
        return cls(
            console=console,
            results=parse_results(console),
            exit_code=int(statuses[-1]) if statuses else None,
            qemu_returncode=qemu_returncode,
        )


def qemu_command(
    qemu: Path,
    kernel: Path,
    initrd: Path,
    qemu_args: Sequence[str] = (),
    *,
    smp: int = 1,
    memory_mb: int = 512,
    reboot: bool = False,
    interactive: bool = False,
    kernel_args: Sequence[str] = (),
) -> list[str]:
    """Return the QEMU command line that boots *kernel* with *initrd* under TCG.

    The machine has no default devices; the serial console is on stdio (with
    *interactive*, a terminal: see :data:`INTERACTIVE_CONSOLE_ARGS`).
    *kernel_args* are added to :data:`KERNEL_COMMAND_LINE` (``NAME=value``
    words the kernel does not know reach ``/init``'s environment).
    *qemu_args* come last, so they may add devices or override options.
    """
    command = [
        str(qemu),
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        *(INTERACTIVE_CONSOLE_ARGS if interactive else ("-serial", "stdio")),
        "-m",
        f"{memory_mb}M",
        "-smp",
        str(smp),
        "-object",
        f"memory-backend-memfd,id={MEMORY_BACKEND_ID},size={memory_mb}M,share=on",
        "-numa",
        f"node,memdev={MEMORY_BACKEND_ID}",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        " ".join([KERNEL_COMMAND_LINE, *kernel_args]),
    ]
    if not reboot:
        command.append("-no-reboot")
    command.extend(qemu_args)
    return command


class GuestVM(Closing):
    """A running QEMU process whose console is collected in the background.

    Use it as a context manager: leaving the block kills QEMU if it still runs
    and removes the temporary folder the run was built in, if any.

    An *interactive* VM (a command from ``qemu_command(..., interactive=True)``)
    shares this process's terminal instead: nothing is collected, its
    :attr:`console` stays empty and :meth:`wait` does not look for the markers.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        workdir: tempfile.TemporaryDirectory[str] | None = None,
        interactive: bool = False,
    ) -> None:
        """Start *command* (see :func:`qemu_command`), owning *workdir* if given.

        Raises:
            GuestRunError: the QEMU executable could not be started.
        """
        self.command = tuple(command)
        self.interactive = interactive
        self._workdir = workdir
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._console = ""
        self._cursor = 0
        self._changed = threading.Condition()
        self._started = time.monotonic()
        logger.info("starting %s", " ".join(self.command))
        try:
            if interactive:
                self._process = subprocess.Popen(self.command)
            else:
                self._process = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
        except OSError as error:
            self._cleanup()
            raise GuestRunError(f"cannot start {self.command[0]}: {error}", "") from error
        self._reader = threading.Thread(
            target=self._read_console, name=f"guest-console-{self.pid}", daemon=True
        )
        if not interactive:
            self._reader.start()

    @property
    def pid(self) -> int:
        """The process id of QEMU."""
        return self._process.pid

    @property
    def console(self) -> str:
        """What the guest and QEMU printed so far, ``\\r`` removed."""
        with self._changed:
            return self._console

    @property
    def running(self) -> bool:
        """Whether QEMU has not exited yet."""
        return self._process.poll() is None

    def _join_reader(self) -> None:
        """Wait for the console reader to collect QEMU's last output (if it runs)."""
        if not self.interactive:
            self._reader.join()

    def _read_console(self) -> None:
        """Collect QEMU's output until it closes it, logging each line at DEBUG."""
        assert self._process.stdout is not None
        descriptor = self._process.stdout.fileno()
        pending = ""
        while chunk := os.read(descriptor, _READ_SIZE):
            text = self._decoder.decode(chunk).replace("\r", "")
            with self._changed:
                self._console += text
                self._changed.notify_all()
            *lines, pending = (pending + text).split("\n")
            for line in lines:
                logger.debug("guest %d: %s", self.pid, line)
        with self._changed:
            self._console += self._decoder.decode(b"", final=True)
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """Wait until *text* appears in the console after the previous match.

        Like ``pexpect``'s ``expect``: each call searches only the output that
        follows the previous match.

        Returns:
            The whole console line containing *text*.

        Raises:
            GuestTimeoutError: *text* did not appear in time (QEMU keeps running).
            GuestRunError: QEMU exited before *text* appeared.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self._console.find(text, self._cursor)
                line_end = self._console.find("\n", found) if found >= 0 else -1
                # A match counts once its line is complete (or the console ended),
                # so the caller never sees half a line.
                if found >= 0 and (line_end >= 0 or not self._reader.is_alive()):
                    self._cursor = found + len(text)
                    line_start = self._console.rfind("\n", 0, found) + 1
                    return self._console[line_start : None if line_end < 0 else line_end]
                if not self._reader.is_alive():  # never started when interactive
                    raise GuestRunError(f"QEMU exited before printing {text!r}", self._console)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestTimeoutError(
                        f"{text!r} did not appear within {timeout} s", self._console
                    )
                self._changed.wait(remaining)

    def wait(self, timeout: float | None = 120.0) -> GuestResult:
        """Wait for QEMU to exit and return the parsed result (``None``: however long).

        Raises:
            GuestTimeoutError: QEMU still ran after *timeout* seconds; it is killed.
            GuestRunError: the guest never started its script (QEMU refused its
                arguments, the kernel panicked, ...).
        """
        try:
            returncode = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestTimeoutError(
                f"guest still running after {timeout} s; killed QEMU", self.console
            ) from None
        self._join_reader()
        console = self.console
        logger.info(
            "QEMU %d exited with status %d after %.1f s",
            self.pid,
            returncode,
            time.monotonic() - self._started,
        )
        if BEGIN_MARKER not in console and not self.interactive:
            raise GuestRunError(
                f"guest never started its script; QEMU exited with status {returncode}"
                f"\ncommand: {' '.join(self.command)}",
                console,
            )
        return GuestResult.from_console(console, returncode)

    def kill(self) -> None:
        """Kill QEMU (if still running) and wait for it and the console reader."""
        if self.running:
            logger.info("killing QEMU %d", self.pid)
            self._process.kill()
        self._process.wait()
        self._join_reader()

    def _cleanup(self) -> None:
        """Remove the temporary working folder, if this VM owns one."""
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def close(self) -> None:
        """Kill QEMU if need be and remove the VM's temporary folder."""
        self.kill()
        self._cleanup()



@dataclass(frozen=True, slots=True)
class GuestKit:
    """QEMU plus a guest kernel, ready to boot scripted guests.

    Attributes:
        kernel: the guest kernel image (``vmlinuz``).
        modules_root: the kernel's ``lib/modules/VERSION`` folder.
        version: the kernel release (``uname -r`` in the guest).
        qemu: the ``qemu-system-x86_64`` executable.
    """

    kernel: Path
    modules_root: Path
    version: str
    qemu: Path

    @classmethod
    def ensure(cls, cache_dir: Path | None = None) -> GuestKit:
        """Install missing host tools and fetch the kernel into the cache if need be.

        Args:
            cache_dir: where the kernel is unpacked; default ``$PYVIRTIO_CACHE``
                or ``~/.cache/pyvirtio``.

        Raises:
            GuestSetupError: a tool or the kernel is missing and cannot be provided.
        """
        ensure_host_tools()
        assets = ensure_kernel(cache_dir)
        return cls(
            kernel=assets.kernel,
            modules_root=assets.modules_root,
            version=assets.version,
            qemu=qemu_binary(),
        )

    def build_initramfs(
        self,
        script: str,
        modules: Sequence[str],
        dest: Path,
        files: Mapping[str, bytes] | None = None,
    ) -> Path:
        """Write to *dest* an initramfs that loads *modules* and runs *script*.

        See :func:`pyvirtio.guestkit.initramfs.build_initramfs`.

        Raises:
            GuestSetupError: a module is unknown, or busybox is unusable.
        """
        return build_initramfs(script, modules, dest, modules_root=self.modules_root, files=files)

    def start(
        self,
        script: str,
        modules: Sequence[str],
        qemu_args: Sequence[str] = (),
        *,
        smp: int = 1,
        memory_mb: int = 512,
        reboot: bool = False,
        workdir: Path | None = None,
        files: Mapping[str, bytes] | None = None,
        interactive: bool = False,
        kernel_args: Sequence[str] = (),
    ) -> GuestVM:
        """Build an initramfs and boot it, returning without waiting for the guest.

        Args:
            script: ``/bin/sh`` script body the guest runs once its modules are loaded.
            modules: extra kernel modules to load (virtio_pci is always loaded).
            qemu_args: appended to the QEMU command line, e.g. vhost-user devices.
            smp: number of guest vCPUs.
            memory_mb: guest memory, all of it in the shared memfd.
            reboot: if false, a guest reboot ends QEMU (``-no-reboot``); if
                true, QEMU resets the machine and boots the same initramfs again.
            workdir: folder for the initramfs; default a temporary one that the
                returned VM removes when closed.
            files: extra guest files (guest path to content), mode 0755.
            interactive: give the guest's console this process's terminal
                (see :class:`GuestVM`) instead of collecting it.
            kernel_args: words added to the kernel command line.

        Raises:
            GuestSetupError: the initramfs cannot be built.
            GuestRunError: QEMU cannot be started.
        """
        temporary = None
        if workdir is None:
            temporary = tempfile.TemporaryDirectory(prefix="pyvirtio-guest-")
            workdir = Path(temporary.name)
        try:
            initrd = self.build_initramfs(script, modules, workdir / "initramfs.cpio", files)
        except BaseException:
            if temporary is not None:
                temporary.cleanup()
            raise
        command = qemu_command(
            self.qemu,
            self.kernel,
            initrd,
            qemu_args,
            smp=smp,
            memory_mb=memory_mb,
            reboot=reboot,
            interactive=interactive,
            kernel_args=kernel_args,
        )
        return GuestVM(command, workdir=temporary, interactive=interactive)

    def run(
        self,
        script: str,
        modules: Sequence[str],
        qemu_args: Sequence[str] = (),
        *,
        smp: int = 1,
        memory_mb: int = 512,
        timeout: float = 120.0,
        reboot: bool = False,
        workdir: Path | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> GuestResult:
        """Boot a guest that runs *script*, wait for it to power off, return its result.

        Arguments are those of :meth:`start`; *timeout* bounds the whole run.

        Raises:
            GuestSetupError: the initramfs cannot be built.
            GuestTimeoutError: the guest ran longer than *timeout*; QEMU was killed.
            GuestRunError: QEMU failed to start or the guest never ran the script.
        """
        with self.start(
            script,
            modules,
            qemu_args,
            smp=smp,
            memory_mb=memory_mb,
            reboot=reboot,
            workdir=workdir,
            files=files,
        ) as vm:
            return vm.wait(timeout)
