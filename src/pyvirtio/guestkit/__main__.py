"""``python -m pyvirtio.guestkit``: install QEMU and friends, fetch the guest kernel."""

from __future__ import annotations

import logging
import sys

from pyvirtio.errors import GuestError
from pyvirtio.guestkit import GuestKit


def main() -> int:
    """Make sure the guest kit is ready and say what it has."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        kit = GuestKit.ensure()
    except GuestError as exc:
        print(f"guest kit: {exc}", file=sys.stderr)
        return 1
    print(f"guest kit ready: {kit.qemu}, kernel {kit.version} ({kit.kernel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
