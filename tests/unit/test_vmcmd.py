"""``pyvirtio vm``'s options and command lines, without booting (tests/e2e boots)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
from pathlib import Path

import pytest

from pyvirtio.cli import _build_parser
from pyvirtio.errors import VmError
from pyvirtio.vmcmd import NetSpec, VmConfig, _shell_line


def config(*argv: str, tty: bool = False) -> VmConfig:
    return VmConfig.from_args(_build_parser().parse_args(["vm", *argv]), tty)


def test_net_spec_takes_a_switch_an_address_and_a_mac() -> None:
    assert NetSpec.parse("lab") == NetSpec("lab")
    assert NetSpec.parse("lab,ip=10.0.0.2/24,mac=02:00:00:00:00:0A") == NetSpec(
        "lab", "10.0.0.2/24", "02:00:00:00:00:0a")


@pytest.mark.parametrize("text", ["", "lab,ip=10.0.0.2", "lab,ip=10.0.0.300/24",
                                  "lab,mac=zz", "lab,mtu=9000", "lab,ip"])
def test_net_spec_refuses_what_it_cannot_use(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        NetSpec.parse(text)


def test_devices_get_their_modules_sockets_and_guest_addresses(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 512)
    vm = config("--blk", str(image), "--rng", "--net", "a,ip=10.0.0.2/24", "--net", "b",
                "--run", "true")
    attachments = vm.attachments(tmp_path)
    assert [(a.device, a.name) for a in attachments] == [
        ("blk", "blk0"), ("rng", "rng0"), ("net", "net0"), ("net", "net1")]
    assert attachments[0].socket_path == tmp_path / "blk0.sock"
    assert attachments[2].mac != attachments[3].mac
    assert "virtio_blk" in vm.modules() and "virtio-rng" in vm.modules()
    assert vm.kernel_args() == ["PYVIRTIO_IP_eth0=10.0.0.2/24"]
    assert "vectors=0" in " ".join(attachments[2].qemu_args())


def test_a_missing_image_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="no such image file"):
        config("--blk", str(tmp_path / "missing.img"), "--run", "true")


def test_without_run_or_shell_a_terminal_is_needed() -> None:
    with pytest.raises(VmError, match="give --run"):
        config()
    assert config(tty=True).run is None
    assert config("--shell").run is None


def test_export_alone_boots_nothing(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="boots nothing"):
        config("--export", str(tmp_path), "--run", "true")
    assert config("--export", str(tmp_path), "--run", "true", "--print-cmdline").run == "true"


def test_qemu_args_are_split_as_a_shell_would() -> None:
    assert config("--qemu-args=-smp 2 -name 'a b'", "--run", "true").qemu_args == (
        "-smp", "2", "-name", "a b")


def test_printed_socket_paths_expand_the_folder_variable() -> None:
    line = _shell_line(["serve", "--socket", "/PYVIRTIO-VM-SOCKETS/blk0.sock",
                        "path=/PYVIRTIO-VM-SOCKETS/x y", "", "it's"])
    assert line.startswith('serve --socket "$D"/blk0.sock path="$D"\'/x y\'')
    echoed = subprocess.run(["sh", "-c", f"D=/run/d; printf '%s|' {line}"],
                            capture_output=True, text=True, check=True).stdout
    assert echoed == "serve|--socket|/run/d/blk0.sock|path=/run/d/x y||it's|"
    assert shlex.split(line)[-1] == "it's"
