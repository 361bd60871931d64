"""A real guest draws on ``pyvirtio serve gpu`` (VIRTIO 1.4 §5.7) through QEMU 10's
``vhost-user-gpu-pci`` under TCG, and QEMU's own ``virtio-gpu-pci`` draws the same.

The Debian 6.1 guest loads ``virtio-gpu`` (with its DRM helpers); fbcon takes the
virtio-gpu framebuffer; the guest clears ``/dev/tty1``, hides the cursor and prints
a few lines of text.  Then, while the guest waits:

- QMP ``screendump`` (QEMU's console surface, which only the vhost-user-gpu UPDATE
  messages fill) and ``pyvirtio screenshot`` (the daemon's own copy of the scanout)
  are the same picture, of the configured size, with the text in its first lines and
  nothing elsewhere;
- QEMU's built-in virtio-gpu, given the same size and the same guest steps, gives a
  screendump identical to the pixel;
- the guest's framebuffer is 1280x800 by default and ``--width/--height`` otherwise
  (and the same sizes for the built-in device, ``xres``/``yres``).

The default-size boot uses split rings, the 1024x640 one packed rings (``packed=on``).

Four boots, two at a time: pyvirtio and built-in side by side, at the default size
and at 1024x640.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirtio.devices.gpu.png import decode_png, decode_ppm
from pyvirtio.guestkit import GuestKit, GuestVM
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.guestkit.qmp import Qmp

Serve = Callable[..., BackendProcess]
Image = tuple[int, int, bytes]

TEXT = ("Hello from pyvirtio gpu", "fbcon on virtio-gpu, 2D", "0123456789 !#$%&()*+,-./:;<=>?@[]^_{|}~")
GUEST_SCRIPT = f"""
    echo 0 > /sys/class/graphics/fbcon/cursor_blink
    echo RESULT fb=$(cat /sys/class/graphics/fb0/virtual_size)
    echo RESULT fbname=$(cat /sys/class/graphics/fb0/name)
    echo RESULT packed=$(cut -c35 /sys/bus/virtio/devices/virtio0/features)
    printf '\\033[2J\\033[H\\033[?25l{chr(10).join(TEXT)}\\n' > /dev/tty1
    sleep 2
    echo DRAWN
    sleep 60
"""
KERNEL_ARGS = ["logo.nologo", "vt.global_cursor_default=0"]


def _start(kit: GuestKit, device_args: list[str], tmp: Path, name: str) -> tuple[GuestVM, Path]:
    """Boot a guest that draws, with a QMP socket; return it and the socket's path."""
    qmp_path = tmp / f"{name}.qmp"
    vm = kit.start(GUEST_SCRIPT, ["virtio-gpu"],
                   [*device_args, "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                   kernel_args=KERNEL_ARGS)
    return vm, qmp_path


def _finish(vm: GuestVM, qmp_path: Path, tmp: Path, name: str,
            socket_path: Path | None = None) -> tuple[Image, Image | None, dict[str, str]]:
    """Once the guest drew: its screendump (and ``pyvirtio screenshot``), then quit."""
    with vm:
        vm.wait_for("DRAWN", 120)
        with Qmp(qmp_path) as qmp:
            dump = _steady_screendump(qmp, tmp / f"{name}.ppm")
            shot = None
            if socket_path is not None:
                png = tmp / f"{name}.png"
                done = subprocess.run(
                    [sys.executable, "-c", "import sys; from pyvirtio.cli import main; "
                     "sys.exit(main())", "screenshot", str(socket_path), str(png)],
                    capture_output=True, text=True, timeout=30, check=False)
                assert done.returncode == 0, done.stderr
                assert f"{png}: scanout 0," in done.stdout, done.stdout
                shot = decode_png(png.read_bytes())
            qmp.execute("quit")
        result = vm.wait(30)
    return dump, shot, result.results


def _steady_screendump(qmp: Qmp, path: Path, timeout: float = 30.0) -> Image:
    """QMP screendumps until two in a row are the same and not black: the guest's last
    flush has reached QEMU's console (a loaded host may take a while)."""
    previous = None
    deadline = time.monotonic() + timeout
    while True:
        qmp.execute("screendump", filename=str(path))
        image = decode_ppm(path.read_bytes())
        if image == previous and image[2].strip(b"\0"):
            return image
        assert time.monotonic() < deadline, "the screen did not settle"
        previous = image
        time.sleep(0.5)


def _check_text(image: Image) -> None:
    """The text is in the first lines (16-pixel font rows), the rest of the screen black."""
    width, height, pixels = image
    row = width * 3
    lit_rows = [y for y in range(height) if pixels[y * row:(y + 1) * row].strip(b"\0")]
    assert lit_rows, "the screen is black"
    assert max(lit_rows) < 16 * len(TEXT), f"pixels lit below the text: rows {lit_rows[-5:]}"
    lit = sum(1 for i in range(0, 16 * len(TEXT) * row, 3) if pixels[i:i + 3] != b"\0\0\0")
    assert lit > 500, f"only {lit} pixels of text"


@pytest.mark.parametrize("size", [None, (1024, 640)], ids=["default-1280x800", "1024x640"])
def test_guest_fbcon_text_on_pyvirtio_gpu_matches_builtin_virtio_gpu(
    kit10: GuestKit, serve: Serve, tmp_path: Path, size: tuple[int, int] | None
) -> None:
    width, height = size or (1280, 800)
    options = [] if size is None else ["--width", str(width), "--height", str(height)]
    packed = "" if size is None else ",packed=on"  # the second boot on packed rings
    daemon = serve("gpu", *options)
    builtin_args = ["-device", "virtio-gpu-pci" + ("" if size is None else
                                                   f",xres={width},yres={height}")]
    # Both guests boot at once: the same steps, one on pyvirtio, one on QEMU's own device.
    ours_vm = _start(kit10, ["-chardev", f"socket,id=g0,path={daemon.socket_path}",
                             "-device", f"vhost-user-gpu-pci,chardev=g0{packed}"],
                     tmp_path, "pyvirtio")
    with contextlib.ExitStack() as stack:
        stack.callback(ours_vm[0].close)
        theirs_vm = _start(kit10, builtin_args, tmp_path, "builtin")
        stack.callback(theirs_vm[0].close)
        ours, shot, results = _finish(*ours_vm, tmp_path, "pyvirtio", daemon.socket_path)
        theirs, _, builtin_results = _finish(*theirs_vm, tmp_path, "builtin")
    assert results.get("fb") == f"{width},{height}", results
    assert results.get("fbname") == "virtio_gpudrmfb", results
    assert results.get("packed") == ("1" if packed else "0"), results
    assert ours[:2] == (width, height)
    assert shot is not None and shot == ours, "pyvirtio screenshot differs from QMP screendump"
    _check_text(ours)
    controlq = daemon.stats()["totals"][0]
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log and "violation:" not in daemon.log, daemon.log
    assert builtin_results.get("fb") == f"{width},{height}", builtin_results
    assert theirs[:2] == ours[:2]
    differing = sum(1 for i in range(0, len(ours[2]), 3) if ours[2][i:i + 3] != theirs[2][i:i + 3])
    assert differing == 0, f"{differing} pixels differ from QEMU's built-in virtio-gpu"
    assert controlq["errors"] == 0 and controlq["violations"] == 0, controlq
    assert controlq["kinds"]["resource_flush"] >= 1, controlq
    assert controlq["kinds"]["get_edid"] >= 1, controlq
