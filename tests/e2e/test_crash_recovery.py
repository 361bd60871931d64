"""Crash recovery: the blk back-end is killed with SIGKILL mid-I/O and started again.

QEMU reconnects (``reconnect=1``), hands the inflight buffer back
(vhost-user INFLIGHT_SHMFD), the new back-end resubmits what the dead one left
in flight, and the guest goes on with no I/O error and no lost or torn write.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args

MiB = 1 << 20
ITERATIONS = 48
BLOCKS = 8  # 64 KiB blocks written per iteration

GUEST_SCRIPT = f"""
i=0
while [ $i -lt {ITERATIONS} ]; do
    dd if=/dev/urandom of=/tmp/src bs=65536 count={BLOCKS} 2>/dev/null
    if ! dd if=/tmp/src of=/dev/vda bs=65536 seek=$((i * {BLOCKS})) conv=fsync 2>/tmp/err; then
        echo "RESULT error=write $i $(tail -n1 /tmp/err)"; exit 1
    fi
    echo 3 > /proc/sys/vm/drop_caches
    want=$(md5sum < /tmp/src | cut -d' ' -f1)
    got=$(dd if=/dev/vda bs=65536 skip=$((i * {BLOCKS})) count={BLOCKS} 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$want" != "$got" ]; then echo "RESULT error=mismatch $i"; exit 1; fi
    echo "SUM $i $want"
    i=$((i + 1))
done
echo RESULT iterations=$i
"""


def test_guest_io_survives_repeated_sigkill_of_the_backend(
    kit: GuestKit, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    socket_path = tmp_path / "blk.sock"
    options = ["--image", str(image), "--log-level", "debug"]
    backend = BackendProcess("blk", socket_path, options)
    kills = 0
    try:
        with kit.start(
            GUEST_SCRIPT, ["virtio_blk"],
            vhost_user_device_args("blk", socket_path, "b0", reconnect=1),
        ) as vm:
            for at, delay in ((4, 0.02), (14, 0.06), (24, 0.1), (34, 0.14)):
                vm.wait_for(f"SUM {at} ", timeout=120)
                time.sleep(delay)  # into the next iteration's write
                backend.kill()  # SIGKILL: no chance to flush or say goodbye
                kills += 1
                time.sleep(0.3)
                backend = BackendProcess("blk", socket_path, options)
            result = vm.wait(timeout=300)
    finally:
        backend.stop()
    console = result.console
    assert result.exit_code == 0, console
    assert result.results["iterations"] == str(ITERATIONS), console
    assert "error" not in result.results
    assert "I/O error" not in console and "blk_update_request" not in console
    # Every block the guest wrote is on the image as the guest last wrote it.
    sums = dict(re.findall(r"SUM (\d+) ([0-9a-f]{32})", console))
    assert len(sums) == ITERATIONS
    data = image.read_bytes()
    for i, want in sums.items():
        start = int(i) * BLOCKS * 65536
        assert hashlib.md5(data[start : start + BLOCKS * 65536]).hexdigest() == want, i
    log = backend.log
    assert kills == 4
    assert log.count("listening on") == 5  # the first daemon and four restarts
    assert "Traceback" not in log
