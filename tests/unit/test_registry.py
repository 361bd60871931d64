"""One registry of device types (pyvirtio.devices.registry): the built-in ones, and
third-party ones found through the ``pyvirtio.devices`` entry-point group, which
``pyvirtio serve``, ``probe``, ``devices`` and the guest kit all read."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtio.cli import _build_parser, main
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.registry import (
    ClientCommand,
    DeviceType,
    ServeOptions,
    device_types,
    discover,
)
from pyvirtio.guestkit.backends import vhost_user_device_args, vhost_user_net_args
from pyvirtio.spec.blk import BlkFeature
from pyvirtio.spec.net import NetFeature
from pyvirtio.virtqueue.chain import DescriptorChain

ROOT = Path(__file__).resolve().parents[2]
THIS = "tests.unit.test_registry"
#: The built-in device types, in the order of ``BUILTIN`` (``pyvirtio serve --help``).
BUILTIN_NAMES = ["blk", "scsi", "fs", "net", "vsock", "console", "rng", "balloon", "input",
                 "gpu"]


class EchoDevice(VirtioDevice):
    """The third-party device of these tests: it answers nothing."""

    device_id = 0x3FFE
    num_queues = 1

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        return 0


#: What the toy factory was called with.
MADE: list[argparse.Namespace] = []


def _toy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shout", action="store_true", help="answer in upper case")


def _make_toy(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    MADE.append(args)
    return EchoDevice(), ServeOptions()


def _poke_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("socket", type=Path)


def _poke(args: argparse.Namespace) -> int:
    POKED.append(args.socket)
    return 7


#: The sockets ``pyvirtio poke`` was run with.
POKED: list[Path] = []

POKE = ClientCommand(name="poke", help="poke a toy daemon", add_arguments=_poke_arguments,
                     run=_poke)
#: A command whose name pyvirtio's own ``stats`` has: left out.
STATS_AGAIN = ClientCommand(name="stats", help="not pyvirtio's stats",
                            add_arguments=_poke_arguments, run=_poke)

TOY_TYPE = DeviceType(
    name="toy",
    summary="a toy device of the registry's tests",
    device_id=EchoDevice.device_id,
    qemu_device="vhost-user-device-pci",
    add_arguments=_toy_arguments,
    factory=_make_toy,
    commands=(POKE, STATS_AGAIN),
)
#: A third-party type that takes blk's name: the built-in must win.
FAKE_BLK = DeviceType(name="blk", summary="not the real blk", device_id=2,
                      qemu_device="vhost-user-blk-pci", factory=_make_toy)
#: An entry point naming something that is not a DeviceType.
NOT_A_TYPE = "a string"


def _clashing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket")  # already there: argparse refuses it


#: A third-party type whose serve options cannot be added.
CLASHING = DeviceType(name="clash", summary="its --socket clashes", device_id=0x3FFD,
                      qemu_device="vhost-user-device-pci", factory=_make_toy,
                      add_arguments=_clashing_arguments)


Install = Callable[[dict[str, str]], Path]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """Install a throwaway distribution with the given ``pyvirtio.devices`` entry points:
    a ``.dist-info`` folder on ``sys.path``, as pip would leave it; return that folder."""

    def install_dist(entry_points: dict[str, str]) -> Path:
        info = tmp_path / "site" / "pyvirtio_toy-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pyvirtio-toy\n"
                                       "Version: 0.1\n")
        (info / "entry_points.txt").write_text(
            "[pyvirtio.devices]\n"
            + "".join(f"{name} = {value}\n" for name, value in entry_points.items()))
        monkeypatch.syspath_prepend(str(info.parent))
        device_types.cache_clear()
        return info.parent

    yield install_dist
    device_types.cache_clear()


def test_the_built_in_device_types_carry_their_virtio_ids_and_qemu_devices() -> None:
    registry = device_types()
    # the order of `pyvirtio serve --help`
    assert [r.device_type.name for r in registry.registrations if r.builtin] == BUILTIN_NAMES
    blk, rng, net = registry["blk"], registry["rng"], registry["net"]
    assert (blk.device_id, rng.device_id, net.device_id) == (2, 4, 1)  # VIRTIO 1.4 §5
    assert (blk.qemu_device, rng.qemu_device, net.qemu_device) == (
        "vhost-user-blk-pci", "vhost-user-rng-pci", "virtio-net-pci")
    assert net.qemu_netdev and not blk.qemu_netdev and not rng.qemu_netdev
    assert (blk.feature_names, rng.feature_names, net.feature_names) == (
        BlkFeature, None, NetFeature)
    assert blk.has_config and net.has_config and not rng.has_config  # §5.4.4
    balloon, console = registry["balloon"], registry["console"]
    assert (balloon.device_id, console.device_id) == (5, 3)
    # QEMU has no vhost-user balloon or console: the generic device (QEMU 8.2 and later)
    assert balloon.qemu_device == console.qemu_device == "vhost-user-device-pci"
    assert registry.problems == ()


#: The options a device type requires besides ``--socket``.
REQUIRED_OPTIONS = {
    "scsi": ["--disk", "d.img"],
    "fs": ["--shared-dir", "share", "--tag", "t"],
    "vsock": ["--guest-cid", "3", "--uds-path", "v.uds"],
}


def test_the_serve_sub_commands_are_the_registry_s() -> None:
    parser = _build_parser()
    assert set(REQUIRED_OPTIONS) <= set(device_types())
    for name in device_types():
        args = parser.parse_args(["serve", name, "--socket", "x.sock",
                                  *REQUIRED_OPTIONS.get(name, [])])
        assert args.device == name and args.socket == Path("x.sock")


def test_qemu_arguments_come_from_the_device_type() -> None:
    assert vhost_user_device_args("blk", Path("b.sock"), "b0", reconnect=1, num_queues=2) == [
        "-chardev", "socket,id=b0,path=b.sock,reconnect=1",
        "-device", "vhost-user-blk-pci,chardev=b0,num-queues=2"]
    assert vhost_user_net_args(Path("n.sock"), "n0", "02:00:00:00:00:01") == [
        "-chardev", "socket,id=n0,path=n.sock",
        "-netdev", "vhost-user,id=n0n,chardev=n0",
        "-device", "virtio-net-pci,netdev=n0n,vectors=0,mac=02:00:00:00:00:01"]


@pytest.mark.parametrize("field, value", [
    ("name", "Blk"), ("name", "two words"), ("name", ""), ("summary", "two\nlines"),
    ("device_id", 0), ("device_id", 1 << 16), ("config_read", -1),
])
def test_a_device_type_is_checked_on_construction(field: str, value: object) -> None:
    fields: dict[str, object] = {"name": "toy", "summary": "s", "device_id": 1,
                                 "qemu_device": "d", "factory": _make_toy}
    with pytest.raises(ValueError, match="device type"):
        DeviceType(**{**fields, field: value})  # type: ignore[arg-type]


def test_a_third_party_entry_point_is_listed_served_and_probed(
    install: Install, capsys: pytest.CaptureFixture[str]
) -> None:
    install({"toy": f"{THIS}:TOY_TYPE"})
    assert main(["devices", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    toy = next(entry for entry in listed["devices"] if entry["name"] == "toy")
    assert toy == {
        "name": "toy", "summary": "a toy device of the registry's tests", "virtio_id": 0x3FFE,
        "qemu_device": "vhost-user-device-pci", "qemu_netdev": False,
        "qemu_args": ["-chardev", "socket,id=ID,path=SOCKET",
                      "-device", "vhost-user-device-pci,chardev=ID"],
        "source": f"toy = {THIS}:TOY_TYPE (pyvirtio-toy 0.1)", "builtin": False,
    }
    assert [entry["name"] for entry in listed["devices"]] == [*BUILTIN_NAMES, "toy"]
    assert listed["problems"] == []

    assert main(["devices"]) == 0
    assert f"entry point toy = {THIS}:TOY_TYPE" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    assert "a toy device of the registry's tests" in capsys.readouterr().out

    # `serve toy` parses its own option and builds the device with the factory; the
    # socket's folder is missing, so the daemon stops there.
    MADE.clear()
    missing = ROOT / "no-such-folder" / "toy.sock"
    assert main(["serve", "toy", "--socket", str(missing), "--shout"]) == 2
    assert [(args.socket, args.shout) for args in MADE] == [(missing, True)]
    assert "cannot listen on" in capsys.readouterr().err

    args = _build_parser().parse_args(["probe", "--device", "toy", "x.sock"])
    assert args.device == "toy"


def test_a_device_type_s_client_commands_are_pyvirtio_commands(
    install: Install, caplog: pytest.LogCaptureFixture
) -> None:
    """A device type adds `pyvirtio NAME` commands without an edit of the CLI; a name
    pyvirtio's own commands have is left out, with a warning."""
    install({"toy": f"{THIS}:TOY_TYPE"})
    POKED.clear()
    with caplog.at_level(logging.WARNING, logger="pyvirtio"):
        assert main(["poke", "t.sock"]) == 7
    assert [Path("t.sock")] == POKED
    assert any("command 'stats' is taken" in record.getMessage() for record in caplog.records)
    assert _build_parser().parse_args(["stats", "x.sock"]).command == "stats"  # pyvirtio's
    assert "json" in vars(_build_parser().parse_args(["stats", "x.sock"]))


def test_broken_entry_points_warn_and_the_built_ins_still_work(
    install: Install, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    install({
        "missing": "no_such_module_for_pyvirtio:TYPE",
        "typo": f"{THIS}:NO_SUCH_NAME",
        "string": f"{THIS}:NOT_A_TYPE",
        "fake-blk": f"{THIS}:FAKE_BLK",
        "toy": f"{THIS}:TOY_TYPE",
    })
    with caplog.at_level(logging.WARNING, logger="pyvirtio"):
        registry = device_types()
    assert registry["blk"] is not FAKE_BLK  # a built-in wins its name
    assert registry.registration("blk").builtin
    assert registry["toy"] is TOY_TYPE  # the working one is kept
    warned = [record.getMessage() for record in caplog.records
              if record.levelno == logging.WARNING]
    assert len(warned) == len(registry.problems) == 4
    for name, why in [("missing", "No module named 'no_such_module_for_pyvirtio'"),
                      ("typo", "NO_SUCH_NAME"),
                      ("string", "names a str, not a pyvirtio DeviceType"),
                      ("fake-blk", "the name 'blk' is taken by built-in "
                                   "pyvirtio.devices.blk_type:BLK_TYPE, which is kept")]:
        assert any(message.startswith(f"device type entry point {name} = ")
                   and why in message for message in warned), (name, warned)

    assert main(["devices", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in listed["devices"]] == [
        *BUILTIN_NAMES, "toy"]
    assert len(listed["problems"]) == 4


def test_a_device_type_whose_options_cannot_be_added_is_left_out_of_serve(
    install: Install, caplog: pytest.LogCaptureFixture
) -> None:
    install({"clash": f"{THIS}:CLASHING"})
    with caplog.at_level(logging.WARNING, logger="pyvirtio"):
        parser = _build_parser()
    assert any("'clash'" in record.getMessage() and "left out of 'pyvirtio serve'"
               in record.getMessage() for record in caplog.records)
    assert parser.parse_args(["serve", "rng", "--socket", "r.sock"]).device == "rng"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "clash", "--socket", "c.sock"])


def test_the_real_cli_warns_about_a_broken_entry_point_and_goes_on(install: Install) -> None:
    site = install({"missing": "no_such_module_for_pyvirtio:TYPE",
                    "toy": f"{THIS}:TOY_TYPE"})
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pyvirtio.cli", "devices", "--json",
                          "--log-level", "error"],
                         capture_output=True, text=True, timeout=60, check=False, env=env)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    warnings = [line for line in run.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, warnings  # the broken entry point; toy's `stats` command
    assert "device type entry point missing = " in warnings[0]
    assert "command 'stats' is taken" in warnings[1]
    assert [entry["name"] for entry in json.loads(run.stdout)["devices"]] == [
        *BUILTIN_NAMES, "toy"]


def test_discover_takes_the_entry_points_it_is_given() -> None:
    registry = discover(entry_points=[])
    assert list(registry) == BUILTIN_NAMES
    assert registry.problems == ()
