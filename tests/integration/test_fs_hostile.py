"""A hostile guest against `pyvirtio serve fs`: raw FUSE requests through pyvirtio's own
front-end (:class:`pyvirtio.frontend.fs.FuseDriver`).

Names with ``/`` and ``..``, host symlinks that point out of the share (and are
swapped in and out during lookups), huge lengths and offsets, unknown opcodes,
FORGET floods and a guest that never forgets.  Beside the shared directory lies a
canary file and an ``outside`` folder: nothing there may ever be read, written or
created, and after each attack the daemon still answers.  The daemons run with
``--sandbox none`` (no chroot to hide behind: only the per-request rules protect the
host), except the last test, which checks the default sandbox.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.errors import BackendError, FuseError
from pyvirtio.frontend.fs import FuseDriver
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.spec.fuse import (
    FUSE_ROOT_ID,
    IN_HEADER,
    INTERRUPT_IN,
    LINK_IN,
    READ_IN,
    RENAME_IN,
    SETXATTR_IN,
    WRITE_IN,
    Opcode,
)

CANARY = b"canary: never to be touched by the guest\n"


class Share:
    """The shared dir, the canary beside it, and a daemon serving the share."""

    def __init__(self, tmp_path: Path) -> None:
        host = tmp_path / "host"  # the share and its neighbours; the daemon's files elsewhere
        self.root = host / "share"
        self.root.mkdir(parents=True)
        (self.root / "file.txt").write_bytes(b"inside data\n")
        self.canary = host / "canary.txt"
        self.canary.write_bytes(CANARY)
        os.chmod(self.canary, 0o600)
        os.utime(self.canary, ns=(10**18, 10**18))
        self.outside = host / "outside"
        self.outside.mkdir()
        self.tmp_path = tmp_path
        self.daemon: BackendProcess | None = None

    def serve(self, *options: str) -> BackendProcess:
        self.daemon = BackendProcess("fs", self.tmp_path / "fs.sock",
                                     ["--shared-dir", str(self.root), "--tag", "hostile",
                                      *options])
        return self.daemon

    def intact(self) -> None:
        """The canary and the outside folder are as they were."""
        st = self.canary.stat()
        assert (st.st_atime_ns, st.st_mtime_ns) == (10**18, 10**18), "canary touched"
        assert st.st_mode & 0o777 == 0o600 and st.st_nlink == 1
        assert self.canary.read_bytes() == CANARY
        os.utime(self.canary, ns=(10**18, 10**18))
        assert list(self.outside.iterdir()) == []
        assert sorted(p.name for p in self.root.parent.iterdir()) == sorted(
            ["share", "canary.txt", "outside"])

    def connect(self) -> FuseDriver:
        """The driver on the daemon's socket (which may be bound a moment before it
        listens)."""
        assert self.daemon is not None
        deadline = time.monotonic() + 10
        while True:
            try:
                return FuseDriver.open(self.daemon.socket_path)
            except BackendError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def fds(self) -> int:
        assert self.daemon is not None
        return len(os.listdir(f"/proc/{self.daemon.process.pid}/fd"))


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Share]:
    s = Share(tmp_path)
    yield s
    if s.daemon is not None:
        assert s.daemon.stop() == 0
        assert "Traceback" not in s.daemon.log, s.daemon.log


def _errno(fs: FuseDriver, opcode: int, nodeid: int, args: bytes) -> int:
    return -fs.request(opcode, nodeid, args).error


def _still_serving(fs: FuseDriver) -> None:
    assert fs.lookup(FUSE_ROOT_ID, b"file.txt").size == 12


BAD_NAMES = [b"..", b".", b"", b"../canary.txt", b"a/b", b"/etc", b"../outside",
             b"x" * 256]


def test_names_with_slash_dotdot_empty_or_too_long_are_refused_everywhere(
        share: Share) -> None:
    share.serve("--sandbox", "none")
    with share.connect() as fs:
        fs.init()
        file_id = fs.lookup(FUSE_ROOT_ID, b"file.txt").nodeid
        for name in BAD_NAMES:
            z = name + b"\0"
            want = {errno.EINVAL, errno.ENAMETOOLONG}
            assert _errno(fs, Opcode.LOOKUP, FUSE_ROOT_ID, z) in want, name
            assert _errno(fs, Opcode.MKDIR, FUSE_ROOT_ID, bytes(8) + z) in want, name
            assert _errno(fs, Opcode.CREATE, FUSE_ROOT_ID, bytes(16) + z) in want, name
            assert _errno(fs, Opcode.SYMLINK, FUSE_ROOT_ID, z + b"/etc/passwd\0") in want
            assert _errno(fs, Opcode.UNLINK, FUSE_ROOT_ID, z) in want, name
            assert _errno(fs, Opcode.RMDIR, FUSE_ROOT_ID, z) in want, name
            assert _errno(fs, Opcode.RENAME, FUSE_ROOT_ID,
                          RENAME_IN.pack(FUSE_ROOT_ID) + b"file.txt\0" + z) in want, name
            assert _errno(fs, Opcode.LINK, FUSE_ROOT_ID, LINK_IN.pack(file_id) + z) in want
            assert _errno(fs, Opcode.MKNOD, FUSE_ROOT_ID, bytes(16) + z) in want, name
        # a name without its NUL terminator
        assert _errno(fs, Opcode.LOOKUP, FUSE_ROOT_ID, b"file.txt") == errno.EINVAL
        # device nodes are not created unless asked
        dev = (0o20644).to_bytes(4, "little") + (0x0103).to_bytes(4, "little") + bytes(8)
        assert _errno(fs, Opcode.MKNOD, FUSE_ROOT_ID, dev + b"null\0") == errno.EPERM
        assert not (share.root / "null").exists()
        _still_serving(fs)
    share.intact()
    assert sorted(os.listdir(share.root)) == ["file.txt"]


def test_host_symlinks_out_of_the_share_are_never_followed(share: Share) -> None:
    (share.root / "esc").symlink_to(share.canary)
    (share.root / "escdir").symlink_to(share.outside)
    (share.root / "rel").symlink_to("../canary.txt")
    share.serve("--sandbox", "none", "--xattr")
    with share.connect() as fs:
        fs.init()
        for name in (b"esc", b"rel"):
            link = fs.lookup(FUSE_ROOT_ID, name)
            assert link.mode & 0o170000 == 0o120000  # the link itself, not the canary
            assert link.size != len(CANARY) or name == b"esc"
            for flags in (os.O_RDONLY, os.O_RDWR | os.O_TRUNC):
                with pytest.raises(FuseError) as exc:
                    fs.open_file(link.nodeid, flags)
                assert exc.value.errno == errno.ELOOP
            assert fs.call(Opcode.READLINK, link.nodeid) in (
                os.fsencode(share.canary), b"../canary.txt")
            setattr_size = bytearray(88)
            setattr_size[0] = 1 << 3  # FATTR_SIZE
            assert _errno(fs, Opcode.SETATTR, link.nodeid, bytes(setattr_size)) == errno.EPERM
            setattr_mode = bytearray(88)
            setattr_mode[0] = 1
            setattr_mode[68:72] = (0o777).to_bytes(4, "little")
            assert _errno(fs, Opcode.SETATTR, link.nodeid, bytes(setattr_mode)) == \
                errno.EOPNOTSUPP
            assert _errno(fs, Opcode.GETXATTR, link.nodeid,
                          SETXATTR_IN.pack(0, 0) + b"user.x\0") == errno.EPERM
            assert _errno(fs, Opcode.OPENDIR, link.nodeid, bytes(8)) == errno.ENOTDIR
        escdir = fs.lookup(FUSE_ROOT_ID, b"escdir").nodeid
        assert _errno(fs, Opcode.LOOKUP, escdir, b"x\0") == errno.ENOTDIR
        assert _errno(fs, Opcode.CREATE, escdir, bytes(16) + b"planted\0") == errno.ENOTDIR
        assert _errno(fs, Opcode.MKDIR, escdir, bytes(8) + b"planted\0") in (
            errno.ENOTDIR, errno.ELOOP)
        assert _errno(fs, Opcode.SYMLINK, escdir, b"planted\0x\0") in (
            errno.ENOTDIR, errno.ELOOP)
        # a hard link to a symlink inode links the symlink, never its target
        esc = fs.lookup(FUSE_ROOT_ID, b"esc").nodeid
        fs.request(Opcode.LINK, FUSE_ROOT_ID, LINK_IN.pack(esc) + b"esc2\0")
        if (share.root / "esc2").exists():
            assert (share.root / "esc2").is_symlink()
        _still_serving(fs)
    share.intact()


def test_a_symlink_swapped_in_during_lookups_never_lets_a_create_out(share: Share) -> None:
    """The host swaps ``share/dir`` between a real folder and a symlink to
    ``outside`` while the guest looks it up and creates in it (the race)."""
    real = share.root / "dir"
    real.mkdir()
    share.serve("--sandbox", "none")
    stop = threading.Event()

    def swapper() -> None:
        spare = share.root / "spare"
        link = share.root / "link.tmp"
        while not stop.is_set():
            if link.is_symlink():
                link.unlink()
            link.symlink_to(share.outside)
            os.rename(real, spare)
            os.rename(link, real)  # dir is now the symlink
            os.unlink(real)
            os.rename(spare, real)  # and a folder again

    thread = threading.Thread(target=swapper)
    thread.start()
    created = refused = 0
    try:
        with share.connect() as fs:
            fs.init()
            for i in range(300):
                try:
                    node = fs.lookup(FUSE_ROOT_ID, b"dir").nodeid
                    fs.create(node, f"f{i}".encode())
                    created += 1
                except FuseError:
                    refused += 1
            _still_serving(fs)
    finally:
        stop.set()
        thread.join()
    assert created + refused == 300 and refused > 0
    share.intact()


def test_huge_lengths_offsets_and_counts_are_refused_or_clamped(share: Share) -> None:
    share.serve("--sandbox", "none", "--xattr")
    with share.connect() as fs:
        fs.init()
        node = fs.lookup(FUSE_ROOT_ID, b"file.txt").nodeid
        fh = fs.open_file(node, os.O_RDWR)
        # a READ asking 4 GiB gets what the buffer holds
        reply = fs.request(Opcode.READ, node, READ_IN.pack(fh, 0, 0xFFFFFFFF, 0, 0, 0, 0))
        assert reply.error == 0 and reply.payload == b"inside data\n"
        for offset in ((1 << 64) - 1, 1 << 63):
            assert _errno(fs, Opcode.READ, node, READ_IN.pack(fh, offset, 16, 0, 0, 0, 0)) \
                == errno.EINVAL
            assert _errno(fs, Opcode.WRITE, node,
                          WRITE_IN.pack(fh, offset, 1, 0, 0, 0, 0) + b"x") == errno.EINVAL
        # a WRITE claiming more than it sends
        assert _errno(fs, Opcode.WRITE, node,
                      WRITE_IN.pack(fh, 0, 1 << 30, 0, 0, 0, 0) + b"short") == errno.EINVAL
        # arguments longer than any request has
        assert _errno(fs, Opcode.LOOKUP, FUSE_ROOT_ID, b"a" * 100_000 + b"\0") == errno.EINVAL
        # an xattr value size beyond what was sent / beyond XATTR_SIZE_MAX
        for size in (1 << 20, 0xFFFFFFFF, 100):
            assert _errno(fs, Opcode.SETXATTR, node,
                          SETXATTR_IN.pack(size, 0) + b"user.k\0v") in (errno.E2BIG,
                                                                         errno.EINVAL)
        # a header whose len lies, a request cut inside its header, a reply buffer too small
        liar = IN_HEADER.pack(0xFFFFFFFF, Opcode.GETATTR, 77, FUSE_ROOT_ID, 0, 0, 0, 0, 0)
        assert fs.wait(fs.submit(0, raw=liar + bytes(16))).error == 0
        assert fs.wait(fs.submit(0, raw=liar[:20])).length == 0
        assert fs.wait(fs.submit(Opcode.GETATTR, FUSE_ROOT_ID, bytes(16), out_len=20)).error \
            == -errno.ERANGE
        assert fs.wait(fs.submit(Opcode.GETATTR, FUSE_ROOT_ID, bytes(16), out_len=8)).length \
            == 0
        # a BATCH_FORGET whose count is far beyond what it carries
        fs.batch_forget([(node, 1)], count=0xFFFFFFFF)
        fs.release(fh)
        _still_serving(fs)
    share.intact()
    assert (share.root / "file.txt").read_bytes() == b"inside data\n"


def test_unknown_and_unsupported_opcodes_get_enosys_and_the_daemon_goes_on(
        share: Share) -> None:
    share.serve("--sandbox", "none")
    with share.connect() as fs:
        assert _errno(fs, Opcode.LOOKUP, FUSE_ROOT_ID, b"file.txt\0") == errno.EIO  # no INIT
        fs.init()
        for opcode in (0, 7, 19, Opcode.BMAP, Opcode.IOCTL, Opcode.POLL, Opcode.SETUPMAPPING,
                       Opcode.TMPFILE, 52, 4096, 0xFFFFFFFF):
            assert _errno(fs, opcode, FUSE_ROOT_ID, bytes(64)) == errno.ENOSYS, opcode
        # xattrs are off without --xattr: ENOSYS, so the guest stops asking
        assert _errno(fs, Opcode.GETXATTR, FUSE_ROOT_ID, bytes(8) + b"user.a\0") == \
            errno.ENOSYS
        assert _errno(fs, Opcode.GETATTR, 999_999, bytes(16)) == errno.ESTALE
        _still_serving(fs)
    share.intact()


def test_a_guest_that_never_forgets_is_bounded_and_forget_floods_are_harmless(
        share: Share) -> None:
    for i in range(150):
        (share.root / f"n{i}").write_text(str(i))
    share.serve("--sandbox", "none", "--max-inodes", "64", "--max-handles", "16")
    with share.connect() as fs:
        fs.init()
        before = share.fds()
        got, full = [], 0
        for _ in range(3):  # looking up again and again, never forgetting
            for i in range(150):
                try:
                    got.append(fs.lookup(FUSE_ROOT_ID, f"n{i}".encode()).nodeid)
                except FuseError as exc:
                    assert exc.errno == errno.ENFILE
                    full += 1
        assert len(set(got)) == 64 and full == 3 * (150 - 64)
        assert share.fds() <= before + 64
        # open files are bounded too
        node = got[0]
        handles = []
        with pytest.raises(FuseError) as refused:
            for _ in range(40):
                handles.append(fs.open_file(node))
        assert refused.value.errno == errno.EMFILE and len(handles) == 16
        for fh in handles:
            fs.release(fh)
        # a flood of FORGETs: unknown ids, huge counts, the root, twice over
        for burst in range(250):
            sent = [fs.submit(Opcode.FORGET, 10**9 + burst * 8 + i,
                              ((1 << 64) - 1).to_bytes(8, "little"), out_len=0, hiprio=True)
                    for i in range(8)]
            for unique in sent:
                assert fs.wait(unique).length == 0
        fs.forget(FUSE_ROOT_ID, 1 << 40)
        fs.batch_forget([(n, 3) for n in set(got)] + [(FUSE_ROOT_ID, 5)] * 10)
        assert share.fds() <= before
        # the root survives, new lookups have room again
        for i in range(64, 127):  # 63, and file.txt below makes 64
            fs.lookup(FUSE_ROOT_ID, f"n{i}".encode())
        _still_serving(fs)
    share.intact()


def test_setlkw_waits_without_holding_the_only_worker_and_interrupt_ends_it(
        share: Share) -> None:
    share.serve("--sandbox", "none", "--thread-pool-size", "1")
    with share.connect() as fs:
        fs.init()
        node = fs.lookup(FUSE_ROOT_ID, b"file.txt").nodeid
        fh1, fh2 = fs.open_file(node, os.O_RDWR), fs.open_file(node, os.O_RDWR)
        assert fs.wait(fs.setlk(fh1, 1, fcntl.F_WRLCK)).error == 0
        assert fs.wait(fs.setlk(fh2, 2, fcntl.F_WRLCK)).error == -errno.EAGAIN
        waiter = fs.setlk(fh2, 2, fcntl.F_WRLCK, wait=True)
        for _ in range(20):  # the one worker still serves everything else
            assert fs.write(fh1, 0, b"i") == 1  # (a WRITE always goes to a worker)
            assert fs.lookup(FUSE_ROOT_ID, b"file.txt").nodeid == node
            assert fs.read(fh1, 0, 5) == b"insid"
        assert not fs.answered(waiter)
        assert fs.wait(fs.setlk(fh1, 1, fcntl.F_UNLCK)).error == 0
        assert fs.wait(waiter).error == 0  # granted once the lock was dropped
        # now fh1 waits for fh2's lock, and the guest gives up (INTERRUPT)
        blocked = fs.setlk(fh1, 1, fcntl.F_WRLCK, wait=True)
        assert not fs.answered(blocked)
        fs.submit(Opcode.INTERRUPT, 0, INTERRUPT_IN.pack(blocked), out_len=0)
        assert fs.wait(blocked).error == -errno.EINTR
        fs.release(fh1)
        fs.release(fh2)
        _still_serving(fs)
    share.intact()


def test_the_default_sandbox_serves_and_keeps_the_host_safe(share: Share) -> None:
    share.serve()  # as root: chroot into the share
    with share.connect() as fs:
        fs.init()
        for name in BAD_NAMES:
            assert _errno(fs, Opcode.LOOKUP, FUSE_ROOT_ID, name + b"\0") in (
                errno.EINVAL, errno.ENAMETOOLONG)
        _entry, fh = fs.create(FUSE_ROOT_ID, b"new.txt")
        assert fs.write(fh, 0, b"written in the sandbox") == 22
        fs.release(fh)
        _still_serving(fs)
    assert (share.root / "new.txt").read_bytes() == b"written in the sandbox"
    assert "sandbox chroot" in share.daemon.log  # type: ignore[union-attr]
    share.intact()
