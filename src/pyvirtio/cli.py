"""The ``pyvirtio`` command: argparse -> validated config -> run.

- ``pyvirtio serve <device> --socket PATH [options]`` serves one device over
  vhost-user until SIGINT/SIGTERM; each device type of the registry
  (:mod:`pyvirtio.devices.registry`) adds its sub-command and options;
- ``pyvirtio stats SOCKET [--json]`` shows a running daemon's per-queue counters:
  the current connection's, the last finished one's and the totals;
- ``pyvirtio link SOCKET [up|down]`` takes a net daemon's link down or up;
- the device types' own commands for a running daemon
  (:class:`~pyvirtio.devices.registry.ClientCommand`): ``pyvirtio resize SOCKET
  SIZE`` (blk), ``pyvirtio balloon SOCKET [SIZE]``, ``pyvirtio console SOCKET``;
- ``pyvirtio probe --device TYPE SOCKET`` shows what a back-end offers;
- ``pyvirtio devices [--json]`` lists the device types ``serve`` and ``probe`` know
  (:mod:`pyvirtio.devices.registry`: the built-in ones and third-party ones);
- ``pyvirtio bench blk SOCKET [options]`` measures a vhost-user-blk back-end,
  ``pyvirtio bench net SOCK_TX SOCK_RX [options]`` forwarding between net ports,
  ``pyvirtio bench fs SOCKET [options]`` FUSE requests against a virtio-fs back-end;
- ``pyvirtio vm [--blk IMAGE] [--rng] [--net SWITCH] [--run CMD]`` boots a
  throwaway Linux guest on pyvirtio devices (:mod:`pyvirtio.vmcmd`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyvirtio import __version__, benchcmd, vmcmd
from pyvirtio.client import ask, command_failed, control_path, send_control
from pyvirtio.devices.base import QueueStats
from pyvirtio.devices.registry import (
    ENTRY_POINT_GROUP,
    DeviceRegistry,
    DeviceType,
    Registration,
    device_types,
    parse_size,
)
from pyvirtio.errors import NoDaemon, PyVirtioError
from pyvirtio.frontend.probe import probe
from pyvirtio.runtime import Server, serve_together

__all__ = ["main", "parse_size"]

log = logging.getLogger("pyvirtio")


#: Device types whose daemon serves several sockets, a device each (``serve net
#: --socket A --socket B``: ports of one switch in one process).
_SEVERAL_SOCKETS = frozenset({"net"})


class _Sockets(argparse.Action):
    """``--socket``: ``args.socket`` is the first, ``args.sockets`` all of them in order."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        sockets = [*(getattr(namespace, "sockets", None) or []), values]
        namespace.sockets = sockets
        namespace.socket = sockets[0]


def _serve_arguments(parser: argparse.ArgumentParser, device_type: DeviceType) -> None:
    """``--socket``, then the device type's own options."""
    several = device_type.name in _SEVERAL_SOCKETS
    parser.add_argument("--socket", required=True, type=Path, action=_Sockets,
                        help="Unix socket to listen on" + (
                            "; repeat it to serve several devices from this process (one "
                            "per socket)" if several else ""))
    device_type.add_arguments(parser)


def _add_serve_parser(
    devices: argparse._SubParsersAction[argparse.ArgumentParser],
    registration: Registration,
    parents: list[argparse.ArgumentParser],
) -> None:
    """Add ``pyvirtio serve NAME`` for a registered device type.

    A third-party type's options are first tried on a scratch parser: if they cannot
    be added (an option that clashes with another, a bug), the device is left out of
    ``serve`` with a warning instead of breaking every command.
    """
    device_type = registration.device_type
    if not registration.builtin:
        try:
            _serve_arguments(argparse.ArgumentParser(add_help=False, parents=parents),
                             device_type)
        except Exception as exc:  # whatever a third party's add_arguments raises
            log.warning("device type %r (%s): cannot add its serve options: %s: %s; "
                        "left out of 'pyvirtio serve'", device_type.name,
                        registration.source, type(exc).__name__, exc)
            return
    parser = devices.add_parser(
        device_type.name,
        parents=parents,
        help=device_type.summary,
        description=device_type.description or device_type.summary,
    )
    _serve_arguments(parser, device_type)


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help=f"how much to log on stderr (default: {default})",
    )


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    serve_common = argparse.ArgumentParser(add_help=False)
    serve_common.add_argument(
        "--strict",
        action="store_true",
        help="on the first driver violation, enter DEVICE_NEEDS_RESET and stop serving "
        "(default: report it, return the bad buffer, go on)",
    )
    serve_common.add_argument(
        "--inband-notifications",
        action="store_true",
        help="also offer vhost-user INBAND_NOTIFICATIONS: a front-end that takes it kicks "
        "with VRING_KICK messages and gets VRING_CALL messages on the back-end channel "
        "instead of eventfds (for simulations such as user-mode Linux time travel; slower)",
    )
    serve_common.add_argument(
        "--no-packed",
        action="store_true",
        help="do not offer VIRTIO_F_RING_PACKED: the front-end uses split rings "
        "(default: offer both layouts, the front-end chooses)",
    )
    _add_log_level(common, "info")
    parser = argparse.ArgumentParser(
        prog="pyvirtio",
        description="VirtIO devices in Python, served over vhost-user.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"pyvirtio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a device over vhost-user", parents=[common])
    devices = serve.add_subparsers(dest="device", required=True)

    registry = device_types()
    for registration in registry.registrations:
        _add_serve_parser(devices, registration, [common, serve_common])

    probe_cmd = sub.add_parser(
        "probe",
        parents=[common],
        help="show what a vhost-user back-end offers",
        description="Connect to a vhost-user back-end (pyvirtio's or any other) and print "
        "its features, protocol features, queue count, memory slots and config space.",
    )
    probe_cmd.add_argument("socket", type=Path, help="the back-end's Unix socket")
    probe_cmd.add_argument("--device", required=True, choices=sorted(registry),
                           help="device type, to decode feature names and config")
    probe_cmd.add_argument("--json", action="store_true", help="print JSON")

    devices_cmd = sub.add_parser(
        "devices",
        parents=[common],
        help="list the device types pyvirtio can serve",
        description="List the device types 'pyvirtio serve' and 'pyvirtio probe' know: the "
        "built-in ones and those installed packages register in the entry-point group "
        f"{ENTRY_POINT_GROUP!r}. An entry point that cannot be loaded is left out, with a "
        "warning on stderr.",
    )
    devices_cmd.add_argument("--json", action="store_true", help="print JSON")

    link = sub.add_parser(
        "link",
        parents=[common],
        help="take a net device's link down or up",
        description="Talk to a running 'pyvirtio serve net' daemon. 'down' closes its vhost-user "
        "socket: QEMU marks the NIC's link down and the guest sees carrier loss. 'up' listens "
        "again; QEMU reconnects when its chardev has reconnect=N. Without a state, print it.",
    )
    link.add_argument("socket", type=Path, help="the daemon's --socket")
    link.add_argument("state", nargs="?", choices=["up", "down"], help="the new link state")

    stats = sub.add_parser(
        "stats",
        parents=[common],
        help="show a running daemon's per-queue counters",
        description="Ask a running 'pyvirtio serve' daemon for its counters: per queue the "
        "requests (packets), bytes each way, errors (drops), driver violations and counts by "
        "kind (drop reasons, filtered frames, switch and tap counters...): for the current "
        "connection, for the last one that ended, and since the daemon started.",
    )
    stats.add_argument("socket", type=Path, help="the daemon's --socket")
    stats.add_argument("--json", action="store_true", help="print JSON")

    _add_client_commands(sub, common, set(sub.choices) | {"vm", "bench"})

    # Its own --log-level: a default set on a shared parent's option would change every
    # sub-command's (argparse shares the option objects of parent parsers).
    vm_common = argparse.ArgumentParser(add_help=False)
    _add_log_level(vm_common, "warning")
    vmcmd.add_parser(sub, [vm_common], parse_size)

    benchcmd.add_parser(sub, [common])
    return parser




def _link(args: argparse.Namespace) -> int:
    command = "link" if args.state is None else f"link {args.state}"
    try:
        answer = send_control(control_path(args.socket), command)
    except OSError as exc:
        return command_failed("link", f"no daemon at {control_path(args.socket)}: {exc}")
    if not answer.startswith("link"):
        return command_failed("link", answer.removeprefix("error: "))
    print(answer)
    return 0


def _stats(args: argparse.Namespace) -> int:
    try:
        snapshot = ask(args.socket, "stats")
    except NoDaemon as exc:
        return command_failed("stats", str(exc))
    if args.json:
        print(json.dumps(snapshot, indent=2))
        return 0
    print("\n".join(render_stats(snapshot)))
    return 0


def render_stats(snapshot: dict[str, Any]) -> list[str]:
    """``pyvirtio stats`` for people: this connection, the last one, the totals.

    Each queue's line is the one ``SIGUSR1`` and a disconnect log.
    """

    def queues(title: str, entries: list[dict[str, Any]]) -> list[str]:
        return [title, *(f"  queue {q['queue']}: {QueueStats.from_json(q)}" for q in entries)]

    count, up = snapshot["connections"], f"daemon up {snapshot['uptime_seconds']:.1f} s"
    current = snapshot["queues"]
    if snapshot["connected"]:
        lines = [f"{snapshot['socket']}: connected (connection #{count}, "
                 f"{snapshot['connected_seconds']:.1f} s so far; {up})",
                 *queues("this connection:", current)]
    else:
        lines = [f"{snapshot['socket']}: no front-end connected ({count} connection"
                 f"{'' if count == 1 else 's'} so far; {up})"]
        if any(QueueStats.from_json(q) != QueueStats() for q in current):
            lines += queues("since the last connection ended:", current)
    last = snapshot["last_connection"]
    if last is not None:
        lines += queues(f"last connection (#{last['connection']}, {last['seconds']:.1f} s, "
                        f"{last['ended']}):", last["queues"])
    return (lines + queues("since the daemon started:", snapshot["totals"])
            + _device_details(snapshot.get("device") or {}))


def _device_details(details: dict[str, Any]) -> list[str]:
    """The device's own figures (``stats_details``): a line per value, a line per row
    of a table (a list of dicts)."""
    lines = ["device:"] if details else []
    for key, value in details.items():
        if isinstance(value, list):
            lines.append(f"  {key}: {len(value)}")
            lines += [("    " + " ".join(f"{k}={v}" for k, v in row.items()))
                      if isinstance(row, dict) else f"    {row}" for row in value]
        else:
            lines.append(f"  {key}: {value}")
    return lines


def _probe(args: argparse.Namespace) -> int:
    try:
        report = probe(args.socket, args.device)
    except PyVirtioError as exc:
        return command_failed("probe", str(exc))
    for warning in report.warnings:
        print(f"pyvirtio probe: warning: {warning}", file=sys.stderr)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return 0


def _devices(args: argparse.Namespace) -> int:
    registry = device_types()
    if args.json:
        print(json.dumps(_devices_json(registry), indent=2))
        return 0
    rows = [("name", "virtio id", "QEMU", "source")]
    for registration in registry.registrations:
        device_type = registration.device_type
        qemu = f"-device {device_type.qemu_device}"
        if device_type.qemu_netdev:
            qemu = f"-netdev vhost-user {qemu}"
        source = registration.source
        rows.append((device_type.name, str(device_type.device_id), qemu,
                     f"built-in ({source})" if registration.builtin else f"entry point {source}"))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + "  " + row[3])
    return 0


def _devices_json(registry: DeviceRegistry) -> dict[str, Any]:
    """``pyvirtio devices --json``: each device type, and the entry points left out."""
    return {
        "devices": [
            {
                "name": r.device_type.name,
                "summary": r.device_type.summary,
                "virtio_id": int(r.device_type.device_id),
                "qemu_device": r.device_type.qemu_device,
                "qemu_netdev": r.device_type.qemu_netdev,
                "qemu_args": r.device_type.qemu_args("SOCKET", "ID"),
                "source": r.source,
                "builtin": r.builtin,
            }
            for r in registry.registrations
        ],
        "problems": list(registry.problems),
    }


def _serve(args: argparse.Namespace) -> int:
    """One device per ``--socket`` (several only for :data:`_SEVERAL_SOCKETS`), one loop."""
    sockets: list[Path] = getattr(args, "sockets", None) or [args.socket]
    if len(sockets) > 1 and args.device not in _SEVERAL_SOCKETS:
        return command_failed("serve", f"{args.device} serves one --socket", 2)
    if len({path.absolute() for path in sockets}) != len(sockets):
        return command_failed("serve", "a --socket is given twice", 2)
    servers: list[Server] = []
    for index, path in enumerate(sockets):
        port_args = argparse.Namespace(**vars(args))
        port_args.socket = path
        port_args.port_index, port_args.ports = index, len(sockets)
        try:
            device, options = device_types()[args.device].factory(port_args)
        except (OSError, ValueError) as exc:
            for server in servers:
                server.close()
            return command_failed("serve", str(exc), 2)
        server = Server(path, device, strict=args.strict,
                        control_path=control_path(path),
                        link_commands=options.link_commands,
                        inband_notifications=args.inband_notifications,
                        packed_rings=not args.no_packed)
        servers.append(server)
        try:
            server.listen()
        except OSError as exc:
            for server in servers:
                server.close()
            return command_failed("serve", f"cannot listen on {path}: {exc}", 2)
    servers[0].install_signal_handlers(*servers[1:])
    serve_together(servers)
    log.info("stopped")
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve,
    "probe": _probe,
    "devices": _devices,
    "link": _link,
    "stats": _stats,
    "bench": benchcmd.main,
    "vm": vmcmd.main,
}


def _add_client_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    taken: set[str],
) -> None:
    """The device types' own commands (:class:`ClientCommand`): ``pyvirtio resize``..."""
    for registration in device_types().registrations:
        for command in registration.device_type.commands:
            if command.name in taken:
                log.warning("device type %s: command %r is taken; left out",
                            registration.device_type.name, command.name)
                continue
            taken.add(command.name)
            parser = sub.add_parser(command.name, parents=[common], help=command.help,
                                    description=command.description or command.help)
            command.add_arguments(parser)


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function of command ``name``: pyvirtio's own, or a device type's."""
    if name in _COMMANDS:
        return _COMMANDS[name]
    for registration in device_types().registrations:
        for command in registration.device_type.commands:
            if command.name == name:
                return command.run
    raise KeyError(name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyvirtio`` console script.

    Every error message starts ``pyvirtio COMMAND:`` (argparse's own:
    ``pyvirtio COMMAND [DEVICE]: error:``); a failure pyvirtio foresaw never
    ends in a traceback.
    """
    # Building the parser loads the device types, and a third-party one may warn then,
    # before --log-level is known: log warnings until the arguments are parsed.
    configure = not logging.getLogger().handlers  # (else the embedding program has)
    if configure:
        logging.basicConfig(
            level=logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    args = _build_parser().parse_args(argv)
    if configure:
        logging.getLogger().setLevel(args.log_level.upper())
    try:
        return _command(args.command)(args)
    except (PyVirtioError, OSError) as exc:  # one a command did not expect to meet
        return command_failed(args.command, str(exc))
    except KeyboardInterrupt:
        return command_failed(args.command, "interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
