"""virtio-input under QEMU 10 (vhost-user-input-pci) with a Linux guest reading evdev.

One guest boot with four ``pyvirtio serve input`` daemons, one of each kind (the
keyboard and the touch screen on split rings, the tablet and the mouse on packed ones):

- the guest's input core lists them under their configured names;
- ``pyvirtio input KBD --text ab`` reaches the guest's ``/dev/input/eventN`` as
  EV_KEY 30 down, up, then 48 down, up, each followed by SYN_REPORT;
- ``pyvirtio input TAB --abs X Y`` gives EV_ABS ABS_X=X and ABS_Y=Y;
- ``--move 5 -3 --click left`` moves the mouse and clicks; ``--abs`` on the
  multitouch screen touches it at that point (slot positions and ABS_X/ABS_Y);
- an LED the guest sets on the keyboard (an EV_LED written to its event device)
  comes back on the statusq and shows in the daemon's stats;
- QEMU's built-in ``virtio-keyboard-pci`` and ``virtio-tablet-pci`` (the reference) in
  the same guest: the keyboard and tablet have the same event types, LEDs, axes and
  properties, and their keys and buttons are a subset of QEMU's.

QEMU 7.2 refuses vhost-user-input under TCG, hence QEMU 10 (bookworm-backports).
"""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Callable

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args

Serve = Callable[..., BackendProcess]

#: ``struct input_event`` on x86-64: timeval (two longs), type, code, value.
GUEST_EVENT = struct.Struct("<qqHHi")
EV_SYN, EV_KEY, EV_REL, EV_ABS = 0, 1, 2, 3
BTN_LEFT, BTN_TOUCH = 0x110, 0x14A
ABS_MT_POSITION_X, ABS_MT_POSITION_Y = 0x35, 0x36
KBD_NAME = "pyvirtio test keyboard"
TAB_NAME = "pyvirtio test tablet"
MOUSE_NAME = "pyvirtio test mouse"
TOUCH_NAME = "pyvirtio test touch"
X, Y = 1234, 23456

# The guest finds each device's event node by name, records what arrives there,
# says INPUT-READY and waits for 8 keyboard, 3 tablet, 7 mouse and at least 7 touch
# events (24 bytes each), then sets CapsLock's LED through the keyboard's event node: EV_LED (0x11)
# LED_CAPSL (1) value 1, then SYN_REPORT.
GUEST_SCRIPT = r"""
node() {
    awk -v name="$1" '/^N: Name=/ { found = index($0, "\"" name "\"") > 0 }
        found && /^H: Handlers=/ { for (i = 1; i <= NF; i++) if ($i ~ /^event/) print $i; found = 0 }' \
        /proc/bus/input/devices
}
caps() {
    awk -v name="$1" '/^N: Name=/ { found = index($0, "\"" name "\"") > 0 }
        found && /^B: / { sub(/^B: /, ""); printf "%s;", $0 } /^$/ { found = 0 }' \
        /proc/bus/input/devices
}
echo "RESULT caps_kbd=$(caps "KBD_NAME")"
echo "RESULT caps_qemu_kbd=$(caps "QEMU Virtio Keyboard")"
echo "RESULT caps_tab=$(caps "TAB_NAME")"
echo "RESULT caps_qemu_tab=$(caps "QEMU Virtio Tablet")"
K=$(node "KBD_NAME"); T=$(node "TAB_NAME"); M=$(node "MOUSE_NAME"); W=$(node "TOUCH_NAME")
echo RESULT nodes=$K,$T,$M,$W
echo RESULT kbd_sysfs_name=$(cat /sys/class/input/$K/device/name)
echo RESULT tab_sysfs_name=$(cat /sys/class/input/$T/device/name)
echo RESULT packed=$(for n in $K $T $M $W; do cut -c35 /sys/class/input/$n/device/device/features; done | tr -d '\n')
cat /dev/input/$K > /tmp/k & KP=$!
cat /dev/input/$T > /tmp/t & TP=$!
cat /dev/input/$M > /tmp/m & MP=$!
cat /dev/input/$W > /tmp/w & WP=$!
sleep 0.5
echo INPUT-READY
i=0
while [ $(wc -c < /tmp/k) -lt 192 ] || [ $(wc -c < /tmp/t) -lt 72 ] ||
      [ $(wc -c < /tmp/m) -lt 168 ] || [ $(wc -c < /tmp/w) -lt 168 ]; do
    i=$((i + 1)); [ $i -gt 600 ] && break; sleep 0.1
done
sleep 0.5
kill $KP $TP $MP $WP
echo RESULT kbd=$(od -An -v -tx1 /tmp/k | tr -d ' \n')
echo RESULT tab=$(od -An -v -tx1 /tmp/t | tr -d ' \n')
echo RESULT mouse=$(od -An -v -tx1 /tmp/m | tr -d ' \n')
echo RESULT touch=$(od -An -v -tx1 /tmp/w | tr -d ' \n')
printf '\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\021\0\001\0\001\0\0\0' > /tmp/led
printf '\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0' >> /tmp/led
echo RESULT led_bytes=$(wc -c < /tmp/led)
cat /tmp/led > /dev/input/$K
sleep 1
""".replace("KBD_NAME", KBD_NAME).replace("TAB_NAME", TAB_NAME).replace(
    "MOUSE_NAME", MOUSE_NAME).replace("TOUCH_NAME", TOUCH_NAME)


def _events(hexdump: str) -> list[tuple[int, int, int]]:
    """(type, code, value) of the guest's ``struct input_event`` records."""
    raw = bytes.fromhex(hexdump)
    return [(t, c, v) for _, _, t, c, v in GUEST_EVENT.iter_unpack(raw[:len(raw) // 24 * 24])]


def _caps(line: str) -> dict[str, int]:
    """A device's ``B:`` lines of /proc/bus/input/devices (PROP, EV, KEY, REL, ABS,
    LED...) as integers; the kernel prints each bitmap as hex longs, highest first."""
    assert line, "the guest found no such device"
    bitmaps = {}
    for part in filter(None, line.split(";")):
        kind, _, words = part.partition("=")
        bitmaps[kind] = int("".join(w.rjust(16, "0") for w in words.split()), 16)
    return bitmaps


def _pyvirtio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirtio.cli", *args], capture_output=True,
                          text=True, timeout=30, check=False)


def test_qemu10_guest_gets_typed_keys_tablet_coordinates_and_reports_leds(
    kit10: GuestKit, serve: Serve
) -> None:
    # QEMU 10's vhost-user-input passes the back-end's ring features through (its
    # packed= property has no effect): --no-packed gives split rings.
    kbd = serve("input", "--kind", "keyboard", "--name", KBD_NAME, "--no-packed", name="kbd")
    tab = serve("input", "--kind", "tablet", "--name", TAB_NAME, name="tab")
    mouse = serve("input", "--kind", "mouse", "--name", MOUSE_NAME, name="mouse")
    touch = serve("input", "--kind", "multitouch", "--name", TOUCH_NAME, "--no-packed",
                  name="touch")
    args = ["-device", "virtio-keyboard-pci", "-device", "virtio-tablet-pci",
            *vhost_user_device_args("input", kbd.socket_path, "k0"),
            *vhost_user_device_args("input", tab.socket_path, "t0"),
            *vhost_user_device_args("input", mouse.socket_path, "m0"),
            *vhost_user_device_args("input", touch.socket_path, "w0")]
    with kit10.start(GUEST_SCRIPT, ["virtio_input", "evdev"], args) as vm:
        vm.wait_for("INPUT-READY", timeout=120)
        typed = _pyvirtio("input", str(kbd.socket_path), "--text", "ab")
        assert typed.returncode == 0, typed.stderr
        assert "8 events queued" in typed.stdout, typed.stdout
        moved = _pyvirtio("input", str(tab.socket_path), "--abs", str(X), str(Y))
        assert moved.returncode == 0, moved.stderr
        clicked = _pyvirtio("input", str(mouse.socket_path), "--move", "5", "-3",
                            "--click", "left")
        assert clicked.returncode == 0, clicked.stderr
        touched = _pyvirtio("input", str(touch.socket_path), "--abs", "100", "200")
        assert touched.returncode == 0, touched.stderr
        result = vm.wait(timeout=120)
    assert result.exit_code == 0, result.console
    r = result.results
    assert r["kbd_sysfs_name"] == KBD_NAME, result.console
    assert r["tab_sysfs_name"] == TAB_NAME, result.console
    assert r["led_bytes"] == "48", result.console
    for kind in ("kbd", "tab"):
        mine, reference = _caps(r[f"caps_{kind}"]), _caps(r[f"caps_qemu_{kind}"])
        assert mine.keys() == reference.keys(), (mine, reference)
        for bitmap in mine:
            if bitmap == "KEY":
                assert mine["KEY"] & ~reference["KEY"] == 0, (mine, reference)
            else:
                assert mine[bitmap] == reference[bitmap], (bitmap, mine, reference)
    assert r["packed"] == "0110", result.console  # VIRTIO_F_RING_PACKED (bit 34) as asked
    # Key repeats (value 2) are the guest's own (EV_REP: it repeats held keys).
    keys = [e for e in _events(r["kbd"]) if e[0] != EV_KEY or e[2] != 2]
    assert keys == [(EV_KEY, 30, 1), (EV_SYN, 0, 0), (EV_KEY, 30, 0), (EV_SYN, 0, 0),
                    (EV_KEY, 48, 1), (EV_SYN, 0, 0), (EV_KEY, 48, 0), (EV_SYN, 0, 0)], r["kbd"]
    assert _events(r["tab"]) == [(EV_ABS, 0, X), (EV_ABS, 1, Y), (EV_SYN, 0, 0)], r["tab"]
    assert _events(r["mouse"]) == [(EV_REL, 0, 5), (EV_REL, 1, -3), (EV_SYN, 0, 0),
                                   (EV_KEY, BTN_LEFT, 1), (EV_SYN, 0, 0),
                                   (EV_KEY, BTN_LEFT, 0), (EV_SYN, 0, 0)], r["mouse"]
    touched_events = _events(r["touch"])
    for event in ((EV_ABS, ABS_MT_POSITION_X, 100), (EV_ABS, ABS_MT_POSITION_Y, 200),
                  (EV_KEY, BTN_TOUCH, 1), (EV_ABS, 0, 100), (EV_ABS, 1, 200),
                  (EV_KEY, BTN_TOUCH, 0)):
        assert event in touched_events, touched_events
    status = kbd.stats()["totals"][1]
    assert status["kinds"].get("led capslock") == 1, status
    info = _pyvirtio("input", str(kbd.socket_path), "--json")
    assert '"capslock": 1' in info.stdout, info.stdout
    assert tab.stats()["totals"][0]["requests"] == 3
    for daemon in (kbd, tab, mouse, touch):
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log and "violation:" not in daemon.log, daemon.log

