"""Fuzz target: virtio-scsi requests and task management from a hostile driver.

A case is a list of chains for the request queue or the control queue.  A request
has a ``lun`` field (a valid LUN, a missing one, another target, garbage), any tag,
a CDB that is either one of the served commands with random fields or random bytes,
data-out bytes, and writable space from none to more than the data; its bytes are
cut into descriptors at arbitrary points.  Control chains are task management
functions with any subtype and LUN, or random bytes.  The target has a writable
disk (LUN 0), a CD-ROM (LUN 1) and a read-only disk added after them (LUN 2).

Invariants, for every chain:

- nothing escapes ``handle_chain`` and nothing is logged with a traceback;
- the used length never exceeds the writable length;
- a request with room for its response gets a response code of §5.6.6.1, and a
  CHECK CONDITION carries sense data that parses;
- no image changes size; the read-only disk and the ISO never change;
- afterwards the device still answers an INQUIRY and (after a REQUEST SENSE that clears
  a unit attention a reset left) a READ correctly.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from pyvirtio.devices.scsi import ScsiDevice, ScsiOptions
from pyvirtio.devices.scsi.cdb import COMMANDS
from pyvirtio.devices.scsi.lun import LunSpec
from pyvirtio.devices.scsi.sense import Sense, Status
from pyvirtio.spec.scsi import (
    CTRL_TMF_REQ,
    REQ_HEADER,
    RESP_HEADER,
    SENSE_SIZE,
    ControlType,
    Response,
    encode_lun,
)
from pyvirtio.testing import DeviceHarness

from .conftest import fuzz_target

DISK_BYTES = 256 * 1024
HEAD = RESP_HEADER.size + SENSE_SIZE
CTRL, REQ = 0, 2


@dataclass(frozen=True)
class ScsiChain:
    """One chain: ``control`` or a request; its bytes cut at ``cuts``."""

    control: bool
    data: bytes
    cuts: tuple[int, ...]
    writable: int


@dataclass(frozen=True)
class ScsiCase:
    packed: bool
    chains: tuple[ScsiChain, ...]


def _lun_field() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.integers(0, 3).map(lambda lun: encode_lun(0, lun)),
        st.integers(0, 3).map(lambda lun: bytes((1, 0, 0x40, lun, 0, 0, 0, 0))),
        st.integers(1, 255).map(lambda target: encode_lun(target, 0)),
        st.binary(min_size=8, max_size=8),
    )


def _cdb() -> st.SearchStrategy[bytes]:
    served = sorted({op for op, _ in COMMANDS})

    def near(op: int, sa: int, body: bytes) -> bytes:
        raw = bytearray(body.ljust(31, b"\0"))
        if op in (0x9E, 0xA3):
            raw[0] = (raw[0] & 0xE0) | sa
        return bytes((op,)) + bytes(raw)

    return st.one_of(
        st.builds(near, st.sampled_from(served), st.sampled_from([0x10, 0x0C, 0x11]),
                  st.binary(max_size=15)),
        st.binary(max_size=32),
    )


def _request() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda lun, tag, cdb, data: REQ_HEADER.pack(lun, tag, 0, 0, 0) + cdb.ljust(32, b"\0")
        + data,
        _lun_field(), st.integers(0, 2**64 - 1), _cdb(),
        st.one_of(st.just(b""), st.binary(max_size=64), st.binary(min_size=512, max_size=1100)),
    ).flatmap(lambda raw: st.one_of(st.just(raw), st.integers(0, len(raw)).map(lambda n: raw[:n])))


def _control() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(lambda subtype, lun, tag: CTRL_TMF_REQ.pack(ControlType.TMF, subtype, lun, tag),
                  st.integers(0, 9), _lun_field(), st.integers(0, 3)),
        st.binary(max_size=30),
    )


def _chain() -> st.SearchStrategy[ScsiChain]:
    def build(control: bool) -> st.SearchStrategy[ScsiChain]:
        data = _control() if control else _request()
        writable = st.sampled_from([0, 1, 5, 10, HEAD - 1, HEAD, HEAD + 36, HEAD + 512,
                                    HEAD + 4096])
        return data.flatmap(lambda raw: st.builds(
            ScsiChain, st.just(control), st.just(raw),
            st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=3, unique=True).map(
                lambda cuts: tuple(sorted(cuts))),
            writable))

    return st.booleans().flatmap(build)


def scsi_cases() -> st.SearchStrategy[ScsiCase]:
    return st.builds(ScsiCase, st.booleans(), st.lists(_chain(), max_size=10).map(tuple))


def _pieces(chain: ScsiChain) -> list[bytes]:
    bounds = [0, *[c for c in chain.cuts if c < len(chain.data)], len(chain.data)]
    return [chain.data[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [b""]


@fuzz_target("scsi", scsi_cases(), types=[ScsiCase, ScsiChain], quick_examples=60)
def test_scsi_target_survives_a_hostile_driver(case: ScsiCase) -> None:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-fuzz-scsi-") as tmp:
        folder = Path(tmp)
        disk, ro, iso = folder / "disk.img", folder / "ro.img", folder / "cd.iso"
        content = os.urandom(DISK_BYTES)
        for path in (disk, ro, iso):
            path.write_bytes(content)
        device = ScsiDevice(ScsiOptions(disks=(disk,), cdrom=iso, workers=1))
        device.add_lun(LunSpec(ro, readonly=True))  # LUN 2
        try:
            with DeviceHarness(device, packed=case.packed, queue_size=64,
                               buffer_space=0x40000) as harness:
                for chain in case.chains:
                    queue = CTRL if chain.control else REQ
                    writable = chain.writable if chain.writable else 0
                    used = harness.request(queue, _pieces(chain), writable)
                    assert used.length <= writable
                    if not chain.control and writable >= HEAD and used.length >= HEAD:
                        sense_len, _resid, _q, status, response = RESP_HEADER.unpack_from(
                            used.data)
                        assert response in set(Response)
                        assert sense_len <= SENSE_SIZE
                        if response == Response.OK and status == Status.CHECK_CONDITION:
                            sense = used.data[RESP_HEADER.size : RESP_HEADER.size + sense_len]
                            assert Sense.parse(sense) is not None
                # Still serving.
                inquiry = REQ_HEADER.pack(encode_lun(0, 0), 1, 0, 0, 0) \
                    + bytes((0x12, 0, 0, 0, 36)).ljust(32, b"\0")
                used = harness.request(REQ, inquiry, HEAD + 36)
                assert used.data[HEAD + 8 : HEAD + 16] == b"PYVIRTIO"
                # A reset the case sent left a unit attention: REQUEST SENSE clears it.
                sense = REQ_HEADER.pack(encode_lun(0, 2), 3, 0, 0, 0) \
                    + bytes((0x03, 0, 0, 0, 18)).ljust(32, b"\0")
                harness.request(REQ, sense, HEAD + 18)
                read = REQ_HEADER.pack(encode_lun(0, 2), 2, 0, 0, 0) \
                    + bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0)).ljust(32, b"\0")
                used = harness.request(REQ, read, HEAD + 512)
                assert used.data[HEAD:] == content[:512]
        finally:
            device.close()
        for path in (disk, ro, iso):
            assert path.stat().st_size == DISK_BYTES
        assert ro.read_bytes() == content
        assert iso.read_bytes() == content
