"""``pyvirtio vm``: a throwaway Linux guest attached to pyvirtio devices, in one command.

``pyvirtio vm --blk disk.img --run 'cat /sys/block/vda/size'`` starts ``pyvirtio
serve blk`` through the CLI, as a user would, with its socket in a private
temporary folder; boots the guest kit's kernel under QEMU (TCG, shared memfd
memory) with an initramfs holding busybox and the modules the devices need;
prints the command's output and exits with its status.  Without ``--run`` the
guest's serial console is a shell on this terminal.  Daemons, QEMU and the
folder go away on exit, on errors and on Ctrl-C alike.

The guest side is :data:`GUEST_SCRIPT`, run by the kit's ``/init`` once the
modules are loaded.  It brings up ``lo`` and every ``ethN`` (with the address
``PYVIRTIO_IP_ethN`` from the kernel command line, if any), then runs, in this
order of preference:

- ``/pyvirtio/run.sh`` (``--run``): its stdout goes to ttyS1 and its stderr to
  ttyS2, which QEMU connects to Unix sockets this process copies to its own
  stdout and stderr, so the console's kernel messages never mix with them;
- ``$PYVIRTIO_RUN`` from the kernel command line, on the console (the command
  lines of ``--print-cmdline``);
- a shell on the console (ttyS0); leaving it powers the guest off.

Exit statuses: the command's own with ``--run``; :data:`EXIT_TIMEOUT` when
``--timeout`` expired, :data:`EXIT_FAILED` when ``pyvirtio vm`` itself failed
(bad arguments, a daemon or QEMU that would not start, a guest that died) and
:data:`EXIT_INTERRUPTED` on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import BinaryIO

from pyvirtio.closing import Closing
from pyvirtio.devices.net import default_mac, format_mac, parse_mac
from pyvirtio.errors import (
    GuestError,
    GuestRunError,
    GuestTimeoutError,
    Terminated,
    VmError,
    VmTimeout,
)
from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.assets import default_cache_dir
from pyvirtio.guestkit.backends import (
    BackendProcess,
    serve_command,
    vhost_user_device_args,
    vhost_user_net_args,
)
from pyvirtio.guestkit.vm import qemu_command

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_TIMEOUT",
    "EXPORT_MODULES",
    "GUEST_SCRIPT",
    "Attachment",
    "NetSpec",
    "VmConfig",
    "add_parser",
    "export",
    "main",
]

EXIT_TIMEOUT = 124
"""``--timeout`` expired; QEMU was killed (the status ``timeout(1)`` uses)."""

EXIT_FAILED = 125
"""``pyvirtio vm`` itself failed, before, around or instead of the command."""

EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT) or SIGTERM: everything was stopped and removed."""

RUN_SCRIPT = "/pyvirtio/run.sh"
"""Where ``--run`` puts the command in the initramfs."""

GUEST_SCRIPT = r"""# pyvirtio vm's guest: the network, then the command or a shell.
ip link set lo up
for path in /sys/class/net/eth*; do
    [ -e "$path" ] || continue
    name=${path##*/}
    ip link set "$name" up
    eval "address=\${PYVIRTIO_IP_$name:-}"
    [ -z "$address" ] || ip addr add "$address" dev "$name"
done
# The kernel sends nothing on a link until it is up (some 0.1-1 s after its carrier).
for _ in $(seq 30); do
    grep -qvx up /sys/class/net/eth*/operstate 2>/dev/null || break
    sleep 0.1
done
if [ -e /pyvirtio/run.sh ]; then
    # pyvirtio vm --run: QEMU sends ttyS1 and ttyS2 to the host's stdout and stderr.
    stty -F /dev/ttyS1 raw -echo
    stty -F /dev/ttyS2 raw -echo
    sh /pyvirtio/run.sh </dev/null >/dev/ttyS1 2>/dev/ttyS2
    exit
fi
if [ -n "${PYVIRTIO_RUN:-}" ]; then
    sh -c "$PYVIRTIO_RUN" </dev/null
    exit
fi
case "${PYVIRTIO_TERM_SIZE:-}" in
*x*) stty -F /dev/ttyS0 rows "${PYVIRTIO_TERM_SIZE%x*}" cols "${PYVIRTIO_TERM_SIZE#*x}" ;;
esac
echo "pyvirtio vm: a shell on the serial console; 'exit' powers the guest off"
export PS1='vm:\w# '
setsid cttyhack sh
"""
"""The guest's ``/pyvirtio/script.sh``: see the module's docstring."""

#: Kernel modules each device needs in the guest (the kit adds virtio_pci and
#: every dependency).  A disk comes with ext4 (which also mounts ext2 and ext3)
#: and the crc32c its metadata checksums ask the crypto API for.
DEVICE_MODULES: dict[str, tuple[str, ...]] = {
    "blk": ("virtio_blk", "crc32c_generic", "ext4"),
    "rng": ("virtio-rng",),
    "net": ("virtio_net",),
}

EXPORT_MODULES: tuple[str, ...] = tuple(dict.fromkeys(
    module for modules in DEVICE_MODULES.values() for module in modules
))
"""The modules of ``--export``'s initramfs: those of every pyvirtio device."""

#: Longest kernel command line on x86 (COMMAND_LINE_SIZE), terminating NUL included.
_KERNEL_COMMAND_LINE_SIZE = 2048
_QEMU = Path("qemu-system-x86_64")
_SOCKET_DIR = "/PYVIRTIO-VM-SOCKETS"  # stands for "$D" in --print-cmdline's lines


@dataclass(frozen=True, slots=True)
class NetSpec:
    """One ``--net SWITCH[,ip=ADDRESS/PREFIX][,mac=MAC]``.

    Attributes:
        switch: the pyvirtio switch the port joins (``pyvirtio serve net --switch``).
        ip: the guest interface's address with its prefix, or ``None`` (link up only).
        mac: the port's MAC, or ``None`` for one derived from its socket path.
    """

    switch: str
    ip: str | None = None
    mac: str | None = None

    @classmethod
    def parse(cls, text: str) -> NetSpec:
        """Parse the option's value.

        Raises:
            argparse.ArgumentTypeError: an unknown key, or a bad address or MAC.
        """
        switch, *settings = text.split(",")
        if not switch:
            raise argparse.ArgumentTypeError(f"no switch name in {text!r}")
        values: dict[str, str] = {}
        for setting in settings:
            key, equals, value = setting.partition("=")
            if key not in ("ip", "mac") or not equals:
                raise argparse.ArgumentTypeError(
                    f"{setting!r}: expected ip=ADDRESS/PREFIX or mac=MAC")
            values[key] = value
        ip, mac = values.get("ip"), values.get("mac")
        try:
            if ip is not None:
                if "/" not in ip:
                    raise ValueError("no /PREFIX")
                ip = str(ipaddress.ip_interface(ip))
            if mac is not None:
                mac = format_mac(parse_mac(mac))
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
        return cls(switch, ip, mac)


@dataclass(frozen=True, slots=True)
class VmConfig:
    """What one ``pyvirtio vm`` invocation asks for, validated.

    Attributes:
        blk: raw images, one ``pyvirtio serve blk`` each (``/dev/vda``, ``vdb``...).
        rng: whether to attach a ``pyvirtio serve rng``.
        net: one ``pyvirtio serve net`` port each (``eth0``, ``eth1``...).
        run: the guest command, or ``None`` for a shell.
        qemu_args: appended to QEMU's command line.
        print_cmdline: print the command lines instead of running them.
        export: write the kernel and an initramfs to this folder.
        memory_mb: guest memory.
        timeout: seconds the guest may run, or ``None``.
        json: print JSON.
    """

    blk: tuple[Path, ...] = ()
    rng: bool = False
    net: tuple[NetSpec, ...] = ()
    run: str | None = None
    qemu_args: tuple[str, ...] = ()
    print_cmdline: bool = False
    export: Path | None = None
    memory_mb: int = 512
    timeout: float | None = None
    json: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, stdin_is_tty: bool) -> VmConfig:
        """Validate the parsed options.

        Raises:
            VmError: an image is missing, or the options do not go together.
        """
        for image in args.blk:
            if not image.is_file():
                raise VmError(f"{image}: no such image file (make one: truncate -s 1G {image})")
        run: str | None = args.run
        booting = not args.print_cmdline and args.export is None
        if args.export is not None and not args.print_cmdline and (run is not None or args.shell):
            raise VmError("--export writes the files and boots nothing: drop --run/--shell "
                          "(or add --print-cmdline to see how to boot them)")
        if booting and run is None and not args.shell and not stdin_is_tty:
            raise VmError("stdin is not a terminal: give --run 'CMD' (or --shell)")
        if args.memory % (1 << 20) or args.memory < (64 << 20):
            raise VmError(f"--memory {args.memory}: give at least 64M, in whole MiB")
        if args.timeout is not None and args.timeout <= 0:
            raise VmError(f"--timeout {args.timeout}: must be positive")
        try:
            qemu_args = tuple(arg for text in args.qemu_args for arg in shlex.split(text))
        except ValueError as error:
            raise VmError(f"--qemu-args: {error}") from None
        return cls(
            blk=tuple(image.resolve() for image in args.blk),
            rng=args.rng,
            net=tuple(args.net),
            run=run,
            qemu_args=qemu_args,
            print_cmdline=args.print_cmdline,
            export=args.export,
            memory_mb=args.memory >> 20,
            timeout=args.timeout,
            json=args.json,
        )

    def attachments(self, socket_dir: Path, mac_seed: str = "") -> list[Attachment]:
        """The devices, each with its daemon's socket in *socket_dir*.

        A net port without ``mac=`` gets one derived from its socket path and
        *mac_seed*, so ports in different folders (or seeds) differ.
        """
        found = [
            Attachment("blk", f"blk{index}", socket_dir, ("--image", str(image)))
            for index, image in enumerate(self.blk)
        ]
        if self.rng:
            found.append(Attachment("rng", "rng0", socket_dir))
        for index, spec in enumerate(self.net):
            name = f"net{index}"
            mac = spec.mac or format_mac(default_mac(socket_dir / f"{name}{mac_seed}.sock"))
            found.append(Attachment(
                "net", name, socket_dir, ("--switch", spec.switch, "--mac", mac), mac))
        return found

    def modules(self) -> list[str]:
        """The guest modules the devices need."""
        devices = ["blk"] * bool(self.blk) + ["rng"] * self.rng + ["net"] * bool(self.net)
        return [module for device in devices for module in DEVICE_MODULES[device]]

    def kernel_args(self) -> list[str]:
        """``NAME=value`` words for the kernel command line, read by :data:`GUEST_SCRIPT`."""
        return [f"PYVIRTIO_IP_eth{index}={spec.ip}"
                for index, spec in enumerate(self.net) if spec.ip is not None]


@dataclass(frozen=True, slots=True)
class Attachment:
    """One device: its ``pyvirtio serve`` daemon and the QEMU arguments for it.

    Attributes:
        device: ``blk``, ``rng`` or ``net``.
        name: its QEMU id and socket name (``blk0``, ``net1``...).
        socket_dir: the folder of the daemon's socket.
        options: the daemon's options after ``--socket``.
        mac: a net port's MAC (the daemon's and QEMU's).
    """

    device: str
    name: str
    socket_dir: Path
    options: tuple[str, ...] = ()
    mac: str = ""

    @property
    def socket_path(self) -> Path:
        """The daemon's vhost-user socket."""
        return self.socket_dir / f"{self.name}.sock"

    def qemu_args(self) -> list[str]:
        """QEMU's chardev and device (and netdev) for the daemon's socket."""
        if self.device == "net":
            return vhost_user_net_args(self.socket_path, self.name, self.mac)
        return vhost_user_device_args(self.device, self.socket_path, self.name)

    def describe(self) -> str:
        """``blk0 (disk.img)``, ``net0 (switch lab, 02:...)``: for messages."""
        if self.device == "blk":
            return f"{self.name} ({self.options[1]})"
        if self.device == "net":
            return f"{self.name} (switch {self.options[1]}, {self.mac})"
        return self.name


class _OutputPort(Closing):
    """A guest serial port that QEMU connects to a Unix socket; its bytes go to *sink*.

    The socket listens before QEMU starts (QEMU connects as a client when it
    creates the chardev).  With no *sink*, the bytes are kept in :attr:`data`.
    """

    def __init__(self, path: Path, ident: str, sink: BinaryIO | None) -> None:
        self.path, self.ident, self._sink = path, ident, sink
        self.data = bytearray()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._copy, name=f"vm-{ident}", daemon=True)
        self._thread.start()

    def qemu_args(self) -> list[str]:
        """The next ``-serial`` port of the guest (ttyS1, then ttyS2), on this socket."""
        return ["-chardev", f"socket,id={self.ident},path={self.path}",
                "-serial", f"chardev:{self.ident}"]

    def _copy(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except OSError:  # closed: QEMU never connected
            return
        with connection:
            while chunk := connection.recv(65536):
                if self._sink is None:
                    self.data += chunk
                    continue
                with contextlib.suppress(BrokenPipeError):
                    self._sink.write(chunk)
                    self._sink.flush()

    def finish(self, timeout: float = 5.0) -> None:
        """Wait (QEMU has exited) until everything the guest sent is copied."""
        self._thread.join(timeout)

    def close(self) -> None:
        """Stop listening (the copy thread ends with QEMU's connection)."""
        self._listener.close()


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: Sequence[argparse.ArgumentParser],
    parse_size: Callable[[str], int],
) -> argparse.ArgumentParser:
    """Add the ``vm`` subcommand to the CLI's *subparsers*; sizes parse with *parse_size*."""
    vm: argparse.ArgumentParser = subparsers.add_parser(
        "vm",
        parents=list(parents),
        help="boot a throwaway Linux guest on pyvirtio devices",
        description="Start pyvirtio daemons for the devices asked for, boot a Linux guest "
        "under QEMU (TCG) attached to them, then run CMD in it (its output here, its exit "
        "status as ours) or give a shell on its serial console ('exit' powers the guest off; "
        "Ctrl-A x kills QEMU). Everything is stopped and removed on exit. In the guest: "
        "/dev/vda, vdb... (--blk), /dev/hwrng (--rng), eth0, eth1... up (--net). Exit "
        f"statuses besides CMD's: {EXIT_TIMEOUT} timeout, {EXIT_FAILED} pyvirtio vm failed, "
        f"{EXIT_INTERRUPTED} interrupted.",
    )
    vm.add_argument("--blk", metavar="IMAGE", type=Path, action="append", default=[],
                    help="attach a raw disk image (pyvirtio serve blk); repeatable")
    vm.add_argument("--rng", action="store_true", help="attach pyvirtio serve rng")
    vm.add_argument("--net", metavar="SWITCH[,ip=A/N][,mac=M]", type=NetSpec.parse,
                    action="append", default=[],
                    help="attach a port of pyvirtio switch SWITCH (pyvirtio serve net); the "
                    "guest's ethN is up, with address A/N if given; repeatable")
    mode = vm.add_mutually_exclusive_group()
    mode.add_argument("--shell", action="store_true",
                      help="a shell on the guest's serial console (default if stdin is a tty)")
    mode.add_argument("--run", metavar="CMD",
                      help="run CMD with sh -c in the guest, print its stdout and stderr, "
                      "exit with its status")
    vm.add_argument("--qemu-args", metavar="'ARGS'", action="append", default=[],
                    help="more QEMU arguments, split as a shell would: --qemu-args='-smp 2'")
    vm.add_argument("--print-cmdline", action="store_true",
                    help="print the equivalent daemon and QEMU command lines and exit")
    vm.add_argument("--export", metavar="DIR", type=Path,
                    help="write DIR/vmlinuz and DIR/initrd.img (busybox, all of pyvirtio's "
                    "virtio modules, a shell on ttyS0) for your own QEMU command lines")
    vm.add_argument("--memory", type=parse_size, default=512 << 20, metavar="SIZE",
                    help="guest memory (default 512M)")
    vm.add_argument("--timeout", type=float, metavar="S",
                    help="kill the guest after S seconds (default: no limit)")
    vm.add_argument("--json", action="store_true", help="print JSON")
    return vm


def _cli_program() -> list[str]:
    """How to run this pyvirtio's CLI from a shell: the venv's script if there is one."""
    script = Path(sys.executable).with_name("pyvirtio")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pyvirtio.cli"]


def _shell_line(command: Sequence[str]) -> str:
    """*command* quoted for a shell, with :data:`_SOCKET_DIR` written ``"$D"``."""
    return " ".join(
        '"$D"'.join(shlex.quote(part) if part else "" for part in arg.split(_SOCKET_DIR))
        if _SOCKET_DIR in arg else shlex.quote(arg)
        for arg in command
    )


def export(kit: GuestKit, folder: Path) -> tuple[Path, Path]:
    """Write *folder*/vmlinuz and *folder*/initrd.img; return their paths.

    The initramfs has busybox, :data:`EXPORT_MODULES` and :data:`GUEST_SCRIPT`.

    Raises:
        GuestError: the initramfs cannot be built.
        OSError: the folder cannot be written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    kernel, initrd = folder / "vmlinuz", folder / "initrd.img"
    shutil.copyfile(kit.kernel, kernel)
    _write_initramfs(kit, initrd)
    return kernel.resolve(), initrd.resolve()


def _write_initramfs(kit: GuestKit, dest: Path) -> None:
    """Build the initramfs of :func:`export` next to *dest*, then move it there at once."""
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        kit.build_initramfs(GUEST_SCRIPT, EXPORT_MODULES, partial)
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)


def _boot_files(config: VmConfig, kit: GuestKit) -> tuple[Path, Path]:
    """The kernel and initramfs that printed command lines boot: --export's or the cache's."""
    if config.export is not None:
        try:
            kernel, initrd = export(kit, config.export)
        except OSError as error:
            raise VmError(f"cannot write to {config.export}: {error}") from None
        if not config.json:
            comment = "# " if config.print_cmdline else ""
            print(f"{comment}wrote {kernel} (Linux {kit.version}, {_mib(kernel)})")
            print(f"{comment}wrote {initrd} (busybox, modules {' '.join(EXPORT_MODULES)}; "
                  f"a shell on ttyS0; {_mib(initrd)})")
        return kernel, initrd
    folder = default_cache_dir() / "vm"
    folder.mkdir(parents=True, exist_ok=True)
    initrd = folder / f"initrd-{kit.version}.img"
    _write_initramfs(kit, initrd)
    return kit.kernel, initrd


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / (1 << 20):.1f} MiB"


def _print_cmdline(config: VmConfig, kit: GuestKit) -> int:
    """Print the daemons' and QEMU's command lines, as a script a shell can run."""
    if config.run is not None and '"' in config.run:
        raise VmError("--print-cmdline passes CMD on the kernel command line in double "
                      "quotes: CMD cannot contain '\"'")
    kernel, initrd = _boot_files(config, kit)
    attachments = config.attachments(Path(_SOCKET_DIR), secrets.token_hex(8))
    program = _cli_program()
    daemons = [serve_command(a.device, a.socket_path, a.options, log_level="warning",
                             program=program) for a in attachments]
    kernel_args = config.kernel_args()
    if config.run is not None:
        kernel_args.append(f'PYVIRTIO_RUN="{config.run}"')
    qemu = qemu_command(
        _QEMU, kernel, initrd,
        [*(arg for a in attachments for arg in a.qemu_args()), *config.qemu_args],
        memory_mb=config.memory_mb, interactive=True, kernel_args=kernel_args,
    )
    if len(qemu[qemu.index("-append") + 1]) >= _KERNEL_COMMAND_LINE_SIZE:
        raise VmError("CMD is too long for the kernel command line")
    if config.json:
        # A real folder (to create first) in place of "$D".
        folder = str(Path(tempfile.gettempdir()) / f"pyvirtio-vm-{secrets.token_hex(4)}")
        print(json.dumps({
            "socket_dir": folder,
            "daemons": [[arg.replace(_SOCKET_DIR, folder) for arg in d] for d in daemons],
            "qemu": [arg.replace(_SOCKET_DIR, folder) for arg in qemu],
            "kernel": str(kernel), "initrd": str(initrd),
        }, indent=2))
        return 0
    lines = ["# pyvirtio vm, by hand: "
             + ("the daemons (sockets in $D), then QEMU. " if daemons else "QEMU. ")
             + ("In the guest, the command runs, then it powers off." if config.run is not None
                else "In the guest, a shell: 'exit' powers off, Ctrl-A x quits QEMU.")]
    if daemons:
        lines.append('D=$(mktemp -d "${TMPDIR:-/tmp}/pyvirtio-vm.XXXXXX")')
        for attachment, daemon in zip(attachments, daemons, strict=True):
            lines.append(f"{_shell_line(daemon)} &")
            socket_arg = _shell_line([str(attachment.socket_path)])
            lines.append(f"while [ ! -S {socket_arg} ] && kill -0 $! 2>/dev/null; "
                         "do sleep 0.1; done")
    lines.append(_shell_line(qemu))
    if daemons:
        lines.append('kill $(jobs -p) 2>/dev/null; wait; rm -rf "$D"')
    print("\n".join(lines))
    return 0


@contextlib.contextmanager
def _terminal_restored() -> Iterator[None]:
    """Put stdin's terminal settings back afterwards, even if QEMU was killed."""
    try:
        saved = termios.tcgetattr(sys.stdin.fileno())
    except (termios.error, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def _boot(config: VmConfig, kit: GuestKit) -> int:
    """Start the daemons, boot the guest, run the command or the shell; clean up."""
    shell = config.run is None
    with tempfile.TemporaryDirectory(prefix="pyvirtio-vm-") as temporary, \
            contextlib.ExitStack() as stack:
        folder = Path(temporary)
        attachments = config.attachments(folder)
        daemons = [stack.enter_context(BackendProcess(a.device, a.socket_path, a.options))
                   for a in attachments]
        qemu_args = [arg for a in attachments for arg in a.qemu_args()]
        kernel_args = config.kernel_args()
        files: dict[str, bytes] = {}
        ports: list[_OutputPort] = []
        if shell:
            size = shutil.get_terminal_size((0, 0))
            if size.lines and size.columns:
                kernel_args.append(f"PYVIRTIO_TERM_SIZE={size.lines}x{size.columns}")
            print(f"pyvirtio vm: Linux {kit.version}"
                  f"{' with ' if attachments else ''}"
                  f"{', '.join(a.describe() for a in attachments)}; 'exit' powers the "
                  "guest off, Ctrl-A x kills it", file=sys.stderr)
            stack.enter_context(_terminal_restored())
        else:
            assert config.run is not None
            files[RUN_SCRIPT] = config.run.encode()
            sinks = (None, None) if config.json else (sys.stdout.buffer, sys.stderr.buffer)
            ports = [stack.enter_context(_OutputPort(folder / f"{name}.sock", name, sink))
                     for name, sink in zip(("stdout", "stderr"), sinks, strict=True)]
            qemu_args += [arg for port in ports for arg in port.qemu_args()]
        started = time.monotonic()
        vm = stack.enter_context(kit.start(
            GUEST_SCRIPT, config.modules(), [*qemu_args, *config.qemu_args],
            memory_mb=config.memory_mb, workdir=folder, files=files,
            interactive=shell, kernel_args=kernel_args,
        ))
        try:
            result = vm.wait(config.timeout)
        except GuestTimeoutError as error:
            raise VmTimeout(str(error)) from None
        for port in ports:
            port.finish()
        for daemon in daemons:
            if daemon.process.poll() is not None:
                print(f"pyvirtio vm: {daemon.name} {daemon.device} exited during the run "
                      f"(status {daemon.process.returncode}):\n{daemon.log}", file=sys.stderr)
        if shell:
            return 0 if result.qemu_returncode == 0 else EXIT_FAILED
        if result.exit_code is None:
            raise GuestRunError(
                f"the guest stopped before the command ended (QEMU exit status "
                f"{result.qemu_returncode})", result.console)
        if config.json:
            print(json.dumps({
                "exit_status": result.exit_code,
                "stdout": ports[0].data.decode(errors="replace"),
                "stderr": ports[1].data.decode(errors="replace"),
                "seconds": round(time.monotonic() - started, 3),
                "devices": [a.describe() for a in attachments],
            }, indent=2))
        return result.exit_code


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def main(args: argparse.Namespace) -> int:
    """Run ``pyvirtio vm`` with the CLI's parsed *args*; return the exit status."""
    previous = {signum: signal.signal(signum, _terminate)
                for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        config = VmConfig.from_args(args, sys.stdin.isatty())
        kit = GuestKit.ensure()
        if config.print_cmdline:
            return _print_cmdline(config, kit)
        if config.export is not None:
            kernel, initrd = _boot_files(config, kit)
            if config.json:
                print(json.dumps({"kernel": str(kernel), "initrd": str(initrd),
                                  "version": kit.version, "modules": list(EXPORT_MODULES)},
                                 indent=2))
            else:
                print(f"boot them: qemu-system-x86_64 ... -kernel {shlex.quote(str(kernel))} "
                      f"-initrd {shlex.quote(str(initrd))} -append console=ttyS0 -nographic")
            return 0
        return _boot(config, kit)
    except VmTimeout as error:
        print(f"pyvirtio vm: --timeout {args.timeout}: {error}", file=sys.stderr)
        return EXIT_TIMEOUT
    except GuestRunError as error:
        print(f"pyvirtio vm: the guest failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (VmError, GuestError) as error:
        print(f"pyvirtio vm: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, Terminated):
        print("pyvirtio vm: interrupted; the guest and the daemons are stopped",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
