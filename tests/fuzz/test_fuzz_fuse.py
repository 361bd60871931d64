"""Fuzz target: virtio-fs's FUSE request decoder and operations under a hostile driver.

A case is a list of requests: a FUSE opcode (a known one, mostly, or any number), a
node id (the root, one a LOOKUP returned, or any), arguments near the valid ones
(a fixed struct with names from a small set of good and bad ones) or arbitrary
bytes, a header whose ``len`` may lie, the whole cut into descriptors at arbitrary
points, and a writable buffer of any size.  They go, after a valid INIT, through
the real back-end and engine (:class:`~pyvirtio.testing.DeviceHarness`) into
:class:`~pyvirtio.devices.fs.device.FsDevice` serving a scratch folder, with
``--sandbox none`` and small table limits.

Invariants:

- nothing escapes and nothing is logged with a traceback;
- every chain is used, with a length no larger than its writable part; a reply is
  exactly ``fuse_out_header.len`` bytes, carries the request's unique and an error
  that is 0 or a negative errno;
- nothing beside the shared folder changes (a canary file and a folder);
- the device keeps serving: afterwards a LOOKUP of a file the host made answers.

SETLKW is sent as SETLK: a fuzzed lock could wait forever, by design
(``tests/integration/test_fs_hostile.py`` covers waiting).
"""

from __future__ import annotations

import errno
import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from pyvirtio.devices.fs.device import FsDevice
from pyvirtio.devices.fs.server import FsConfig
from pyvirtio.spec.fuse import (
    FUSE_KERNEL_MINOR_VERSION,
    FUSE_KERNEL_VERSION,
    FUSE_ROOT_ID,
    IN_HEADER,
    INIT_IN,
    OUT_HEADER,
    Opcode,
)
from pyvirtio.testing import DeviceHarness

from .conftest import fuzz_target

#: Fixed-argument sizes of the opcodes (``fuse.h``), for arguments near valid ones.
ARG_SIZES: dict[int, int] = {
    Opcode.LOOKUP: 0, Opcode.FORGET: 8, Opcode.GETATTR: 16, Opcode.SETATTR: 88,
    Opcode.READLINK: 0, Opcode.SYMLINK: 0, Opcode.MKNOD: 16, Opcode.MKDIR: 8,
    Opcode.UNLINK: 0, Opcode.RMDIR: 0, Opcode.RENAME: 8, Opcode.LINK: 8, Opcode.OPEN: 8,
    Opcode.READ: 40, Opcode.WRITE: 40, Opcode.STATFS: 0, Opcode.RELEASE: 24,
    Opcode.FSYNC: 16, Opcode.SETXATTR: 8, Opcode.GETXATTR: 8, Opcode.LISTXATTR: 8,
    Opcode.REMOVEXATTR: 0, Opcode.FLUSH: 24, Opcode.INIT: 64, Opcode.OPENDIR: 8,
    Opcode.READDIR: 40, Opcode.RELEASEDIR: 24, Opcode.FSYNCDIR: 16, Opcode.GETLK: 48,
    Opcode.SETLK: 48, Opcode.ACCESS: 8, Opcode.CREATE: 16, Opcode.INTERRUPT: 8,
    Opcode.DESTROY: 0, Opcode.BATCH_FORGET: 8, Opcode.FALLOCATE: 32,
    Opcode.READDIRPLUS: 40, Opcode.RENAME2: 16, Opcode.LSEEK: 24,
    Opcode.COPY_FILE_RANGE: 56, Opcode.SYNCFS: 8,
}
NAMES = [b"f", b"d", b"new", b"..", b".", b"", b"a/b", b"../canary", b"x" * 300, b"link"]


@dataclass(frozen=True)
class FuseRequest:
    opcode: int
    nodeid: int  # < 0: the -nodeid-th node id a reply gave
    fixed: bytes
    names: tuple[bytes, ...]
    raw: bytes  # not empty: the whole argument part instead of fixed + names
    header_len: int  # < 0: the true length
    cuts: tuple[int, ...]
    writable: int


@dataclass(frozen=True)
class FuseCase:
    requests: tuple[FuseRequest, ...]


small = st.one_of(st.integers(0, 16), st.sampled_from([0xFFFFFFFF, 1 << 31, 1 << 63]),
                  st.integers(0, (1 << 64) - 1))


@st.composite
def fixed_args(draw: st.DrawFn, size: int) -> bytes:
    """A fixed struct of ``size`` bytes whose fields are small numbers (file handles,
    offsets, sizes, modes), now and then huge ones."""
    words = [draw(small) & 0xFFFFFFFFFFFFFFFF for _ in range((size + 7) // 8)]
    data = b"".join(w.to_bytes(8, "little") for w in words)[:size]
    return data if draw(st.integers(0, 5)) else data[: draw(st.integers(0, size))]


@st.composite
def fuse_requests(draw: st.DrawFn) -> FuseRequest:
    opcode = draw(st.one_of(st.sampled_from(sorted(ARG_SIZES)), st.sampled_from(sorted(ARG_SIZES)),
                            st.integers(0, 60), st.integers(0, (1 << 32) - 1)))
    fixed = draw(fixed_args(ARG_SIZES.get(opcode, draw(st.integers(0, 64)))))
    return FuseRequest(
        opcode=opcode,
        nodeid=draw(st.one_of(st.just(FUSE_ROOT_ID), st.integers(-4, -1), st.integers(0, 40),
                              st.integers(0, (1 << 64) - 1))),
        fixed=fixed,
        names=tuple(draw(st.lists(st.sampled_from(NAMES), max_size=2))),
        raw=draw(st.one_of(st.just(b""), st.just(b""), st.binary(max_size=120))),
        header_len=draw(st.one_of(st.just(-1), st.just(-1), st.integers(0, (1 << 32) - 1))),
        cuts=tuple(sorted(draw(st.lists(st.integers(0, 200), max_size=4)))),
        writable=draw(st.one_of(st.sampled_from([0, 8, 16, 17, 120, 4096, 70000]),
                                st.integers(0, 9000))),
    )


def _pieces(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    points = [0, *(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a] or [b""]


def _encode(req: FuseRequest, unique: int, nodes: list[int]) -> bytes:
    nodeid = nodes[-req.nodeid % len(nodes)] if req.nodeid < 0 and nodes else abs(req.nodeid)
    opcode = Opcode.SETLK if req.opcode == Opcode.SETLKW else req.opcode
    args = req.raw or (req.fixed + b"".join(n + b"\0" for n in req.names))
    length = IN_HEADER.size + len(args) if req.header_len < 0 else req.header_len
    return IN_HEADER.pack(length, opcode, unique, nodeid, 0, 0, 1, 0, 0) + args


@fuzz_target("fuse", st.builds(FuseCase, requests=st.lists(fuse_requests(), max_size=14).map(
    tuple)), types=[FuseCase, FuseRequest], quick_examples=60)
def test_fuse_requests_from_a_hostile_driver_get_well_formed_answers(case: FuseCase) -> None:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-fuzz-fs-") as top:
        host = Path(top)
        share = host / "share"
        (share / "d").mkdir(parents=True)
        (share / "f").write_bytes(b"0123456789" * 100)
        (share / "link").symlink_to("../canary")
        canary = host / "canary"
        canary.write_bytes(b"canary")
        (host / "outside").mkdir()
        os.utime(canary, ns=(10**18, 10**18))
        config = FsConfig(shared_dir=share, tag="fuzz", sandbox="none", thread_pool_size=2,
                          max_inodes=16, max_handles=8, xattr=True)
        device = FsDevice(config)
        try:
            with DeviceHarness(device, queue_size=64) as h:
                init = INIT_IN.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, 65536,
                                    0xFFFFFFFF, 0)
                done = h.request(1, readable=IN_HEADER.pack(104, Opcode.INIT, 1, 0, 0, 0, 0, 0,
                                                             0) + init, writable=80)
                assert done.length == 80 and OUT_HEADER.unpack_from(done.data)[1] == 0
                nodes: list[int] = []
                for i, req in enumerate(case.requests):
                    unique = 100 + i
                    used = h.request(1, readable=_pieces(_encode(req, unique, nodes), req.cuts),
                                     writable=req.writable, timeout=5)
                    assert used.length <= req.writable
                    if used.length:
                        length, error, got_unique = OUT_HEADER.unpack_from(used.data)
                        assert length == used.length
                        assert got_unique == unique or req.raw or req.header_len >= 0
                        assert -4096 < error <= 0
                        if (req.opcode in (Opcode.LOOKUP, Opcode.MKDIR, Opcode.CREATE)
                                and error == 0 and used.length >= 24):
                            nodes.append(int.from_bytes(used.data[16:24], "little"))
                # still serving: forget what was looked up, then look up a host file
                h.request(0, readable=IN_HEADER.pack(48, Opcode.DESTROY, 7, 0, 0, 0, 0, 0, 0),
                          writable=16, timeout=5)
                h.request(1, readable=IN_HEADER.pack(104, Opcode.INIT, 3, 0, 0, 0, 0, 0, 0)
                          + init, writable=80)
                found = h.request(1, readable=IN_HEADER.pack(42, Opcode.LOOKUP, 5,
                                                             FUSE_ROOT_ID, 0, 0, 0, 0, 0)
                                  + b"f\0", writable=200)
                _, error, _ = OUT_HEADER.unpack_from(found.data)
                assert error in (0, -errno.ENOENT, -errno.ENFILE), error
        finally:
            device.close()
        assert canary.read_bytes() == b"canary"
        assert canary.stat().st_mtime_ns == 10**18
        assert list((host / "outside").iterdir()) == []
        assert sorted(p.name for p in host.iterdir()) == ["canary", "outside", "share"]
