"""virtio-fs device in-process (:class:`~pyvirtio.testing.DeviceHarness`): FUSE requests
on real rings, answered by worker threads, checked on the host folder."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.fs import device as device_mod
from pyvirtio.devices.fs.device import FsDevice, opcode_name
from pyvirtio.devices.fs.server import FsConfig
from pyvirtio.spec.fs import CONFIG
from pyvirtio.spec.fuse import (
    ATTR_OUT,
    CREATE_IN,
    DIRENT,
    ENTRY_OUT,
    FORGET_IN,
    FUSE_ROOT_ID,
    IN_HEADER,
    INIT_IN,
    INIT_OUT,
    KSTATFS,
    LSEEK_IN,
    LSEEK_OUT,
    MKDIR_IN,
    OPEN_IN,
    OPEN_OUT,
    OUT_HEADER,
    READ_IN,
    RELEASE_IN,
    RENAME2_IN,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    SETATTR_IN,
    WRITE_IN,
    WRITE_OUT,
    FattrValid,
    InitFlag,
    Opcode,
    dirent_size,
)
from pyvirtio.testing import DeviceHarness


class Fuse:
    """Requests through the harness; replies split into (error, payload)."""

    def __init__(self, harness: DeviceHarness) -> None:
        self.h = harness
        self.unique = 0

    def raw(self, opcode: int, nodeid: int = 0, args: bytes = b"", out: int = 65536,
            queue: int = 1) -> tuple[int, bytes]:
        self.unique += 1
        header = IN_HEADER.pack(IN_HEADER.size + len(args), opcode, self.unique, nodeid,
                                1000, 1000, 1, 0, 0)
        used = self.h.request(queue, readable=header + args, writable=out)
        if used.length == 0:
            return 0, b""
        length, error, unique = OUT_HEADER.unpack_from(used.data)
        assert (length, unique) == (used.length, self.unique)
        return -error, used.data[OUT_HEADER.size:]

    def ok(self, opcode: int, nodeid: int = 0, args: bytes = b"") -> bytes:
        err, payload = self.raw(opcode, nodeid, args)
        assert err == 0, os.strerror(err)
        return payload

    def lookup(self, name: bytes, parent: int = FUSE_ROOT_ID) -> tuple[int, ...]:
        return ENTRY_OUT.unpack(self.ok(Opcode.LOOKUP, parent, name + b"\0"))


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello world\n")
    (root / "sub").mkdir()
    return root


@pytest.fixture
def fuse(share: Path) -> Iterator[Fuse]:
    device = FsDevice(FsConfig(shared_dir=share, tag="unit", sandbox="none", xattr=True,
                               max_inodes=32))
    with DeviceHarness(device, queue_size=32) as h:
        f = Fuse(h)
        out = f.ok(Opcode.INIT, 0, INIT_IN.pack(7, 38, 1 << 17, 0xFFFFFFFF & ~(1 << 16), 0))
        assert INIT_OUT.unpack(out)[:2] == (7, 38)
        yield f
    device.close()


def test_config_space_carries_the_tag_and_request_queues(share: Path) -> None:
    device = FsDevice(FsConfig(shared_dir=share, tag="unit-tag", sandbox="none",
                               request_queues=2))
    with DeviceHarness(device) as h:
        tag, queues, notify = CONFIG.unpack(h.read_config(0, CONFIG.size))
        assert (tag.rstrip(b"\0"), queues, notify) == (b"unit-tag", 2, 0)
        assert device.num_queues == 3
    device.close()


def test_a_tag_longer_than_36_bytes_is_refused(share: Path) -> None:
    with pytest.raises(ValueError, match="tag"):
        FsDevice(FsConfig(shared_dir=share, tag="t" * 37, sandbox="none"))


def test_init_agrees_on_7_38_and_only_flags_both_sides_have(share: Path) -> None:
    device = FsDevice(FsConfig(shared_dir=share, tag="t", sandbox="none"))
    with DeviceHarness(device) as h:
        f = Fuse(h)
        offered = InitFlag.ASYNC_READ | InitFlag.WRITEBACK_CACHE | InitFlag.POSIX_LOCKS
        out = INIT_OUT.unpack(f.ok(Opcode.INIT, 0, INIT_IN.pack(7, 38, 4096, offered, 0)))
        major, minor, readahead, flags, _, _, max_write, _, max_pages, _, _ = out
        assert (major, minor, readahead) == (7, 38, 4096)
        assert flags == InitFlag.ASYNC_READ | InitFlag.POSIX_LOCKS  # no writeback unless asked
        assert max_write == 1 << 20 and max_pages == 256
        # an old kernel's 16-byte INIT is taken too
        err, _ = f.raw(Opcode.INIT, 0, INIT_IN.pack(7, 31, 4096, 1, 0)[:16])
        assert err == 0
        assert f.raw(Opcode.INIT, 0, INIT_IN.pack(6, 0, 0, 0, 0))[0] == errno.EPROTO
    device.close()


def test_requests_before_init_get_eio(share: Path) -> None:
    device = FsDevice(FsConfig(shared_dir=share, tag="t", sandbox="none"))
    with DeviceHarness(device) as h:
        assert Fuse(h).raw(Opcode.LOOKUP, FUSE_ROOT_ID, b"hello.txt\0")[0] == errno.EIO
    device.close()


def test_lookup_getattr_and_hard_links_share_one_node_id(fuse: Fuse, share: Path) -> None:
    entry = fuse.lookup(b"hello.txt")
    assert entry[0] > FUSE_ROOT_ID and entry[7] == 12  # nodeid, size
    os.link(share / "hello.txt", share / "again.txt")
    assert fuse.lookup(b"again.txt")[0] == entry[0]
    attr = ATTR_OUT.unpack(fuse.ok(Opcode.GETATTR, entry[0], bytes(16)))
    assert attr[3] == (share / "hello.txt").stat().st_ino and attr[13] == 2  # ino, nlink
    assert fuse.raw(Opcode.LOOKUP, FUSE_ROOT_ID, b"missing\0")[0] == errno.ENOENT


def test_an_open_inode_survives_a_rename_on_the_host(fuse: Fuse, share: Path) -> None:
    node = fuse.lookup(b"hello.txt")[0]
    os.rename(share / "hello.txt", share / "sub" / "moved.txt")
    fh = OPEN_OUT.unpack(fuse.ok(Opcode.OPEN, node, OPEN_IN.pack(os.O_RDONLY, 0)))[0]
    assert fuse.ok(Opcode.READ, node, READ_IN.pack(fh, 6, 100, 0, 0, 0, 0)) == b"world\n"


def test_create_write_read_truncate_and_chmod_reach_the_host(fuse: Fuse, share: Path) -> None:
    out = fuse.ok(Opcode.CREATE, FUSE_ROOT_ID, CREATE_IN.pack(os.O_RDWR, 0o100666, 0o022, 0)
                  + b"new.bin\0")
    node = ENTRY_OUT.unpack_from(out)[0]
    fh = OPEN_OUT.unpack_from(out, ENTRY_OUT.size)[0]
    data = os.urandom(200_000)
    written = WRITE_OUT.unpack(fuse.ok(Opcode.WRITE, node,
                                       WRITE_IN.pack(fh, 10, len(data), 0, 0, 0, 0) + data))
    assert written[0] == len(data)
    assert (share / "new.bin").read_bytes()[10:] == data
    assert stat.S_IMODE((share / "new.bin").stat().st_mode) == 0o644
    assert (share / "new.bin").stat().st_uid == 1000  # the caller's, from the header
    assert fuse.ok(Opcode.READ, node, READ_IN.pack(fh, 10, 5000, 0, 0, 0, 0)) == data[:5000]
    setattr_in = SETATTR_IN.pack(FattrValid.SIZE | FattrValid.MODE | FattrValid.MTIME, 0, 0,
                                 1234, 0, 0, 981173106, 0, 0, 5, 0, 0o600, 0, 0, 0, 0)
    attr = ATTR_OUT.unpack(fuse.ok(Opcode.SETATTR, node, setattr_in))
    assert attr[4] == 1234 and stat.S_IMODE(attr[12]) == 0o600
    st = (share / "new.bin").stat()
    assert st.st_size == 1234 and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == 981173106 * 10**9 + 5
    fuse.ok(Opcode.RELEASE, node, RELEASE_IN.pack(fh, 0, 0, 0))
    assert fuse.raw(Opcode.READ, node, READ_IN.pack(fh, 0, 1, 0, 0, 0, 0))[0] == errno.EBADF


def test_sparse_files_stay_sparse_and_lseek_finds_data(fuse: Fuse, share: Path) -> None:
    out = fuse.ok(Opcode.CREATE, FUSE_ROOT_ID, CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0)
                  + b"sparse\0")
    node, fh = ENTRY_OUT.unpack_from(out)[0], OPEN_OUT.unpack_from(out, ENTRY_OUT.size)[0]
    fuse.ok(Opcode.WRITE, node, WRITE_IN.pack(fh, 8 << 20, 4, 0, 0, 0, 0) + b"tail")
    st = (share / "sparse").stat()
    assert st.st_size == (8 << 20) + 4 and st.st_blocks * 512 <= 64 * 1024
    data = LSEEK_OUT.unpack(fuse.ok(Opcode.LSEEK, node, LSEEK_IN.pack(fh, 0, os.SEEK_DATA, 0)))
    assert data[0] >= 4 << 20


def test_mkdir_readdir_readdirplus_rename2_and_rmdir(fuse: Fuse, share: Path) -> None:
    d = ENTRY_OUT.unpack(fuse.ok(Opcode.MKDIR, FUSE_ROOT_ID, MKDIR_IN.pack(0o755, 0)
                                 + b"dir\0"))[0]
    for name in (b"a", b"b"):
        fuse.ok(Opcode.MKNOD, d, (0o100644).to_bytes(4, "little") + bytes(12) + name + b"\0")
    fh = OPEN_OUT.unpack(fuse.ok(Opcode.OPENDIR, d, bytes(8)))[0]
    listing = fuse.ok(Opcode.READDIR, d, READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
    names, pos = [], 0
    while pos < len(listing):
        _, _, namelen, _ = DIRENT.unpack_from(listing, pos)
        names.append(listing[pos + 24 : pos + 24 + namelen])
        pos += dirent_size(namelen)
    assert sorted(names) == [b".", b"..", b"a", b"b"]
    # a small buffer: one entry at a time, resuming at the offset given
    first = fuse.ok(Opcode.READDIR, d, READ_IN.pack(fh, 0, 40, 0, 0, 0, 0))
    assert len(first) == 32 and DIRENT.unpack_from(first)[1] == 1
    plus = fuse.ok(Opcode.READDIRPLUS, d, READ_IN.pack(fh, 2, 4096, 0, 0, 0, 0))
    assert len(plus) == 2 * (ENTRY_OUT.size + 32)
    assert ENTRY_OUT.unpack_from(plus)[0] > FUSE_ROOT_ID
    fuse.ok(Opcode.RELEASEDIR, d, RELEASE_IN.pack(fh, 0, 0, 0))
    exchange = RENAME2_IN.pack(d, RENAME_EXCHANGE, 0) + b"a\0b\0"
    (share / "dir" / "a").write_text("A")
    fuse.ok(Opcode.RENAME2, d, exchange)
    assert (share / "dir" / "b").read_text() == "A"
    noreplace = RENAME2_IN.pack(d, RENAME_NOREPLACE, 0) + b"a\0b\0"
    assert fuse.raw(Opcode.RENAME2, d, noreplace)[0] == errno.EEXIST
    assert fuse.raw(Opcode.RMDIR, FUSE_ROOT_ID, b"dir\0")[0] == errno.ENOTEMPTY
    fuse.ok(Opcode.UNLINK, d, b"a\0")
    fuse.ok(Opcode.UNLINK, d, b"b\0")
    fuse.ok(Opcode.RMDIR, FUSE_ROOT_ID, b"dir\0")
    assert not (share / "dir").exists()


def test_symlink_readlink_statfs_and_xattrs(fuse: Fuse, share: Path) -> None:
    link = ENTRY_OUT.unpack(fuse.ok(Opcode.SYMLINK, FUSE_ROOT_ID, b"ln\0hello.txt\0"))[0]
    assert os.readlink(share / "ln") == "hello.txt"
    assert fuse.ok(Opcode.READLINK, link) == b"hello.txt"
    blocks = KSTATFS.unpack(fuse.ok(Opcode.STATFS, FUSE_ROOT_ID))[0]
    assert blocks == os.statvfs(share).f_blocks
    node = fuse.lookup(b"hello.txt")[0]
    err, _ = fuse.raw(Opcode.SETXATTR, node, (3).to_bytes(4, "little") + bytes(4)
                      + b"user.k\0abc")
    if err == errno.EOPNOTSUPP:
        pytest.skip("the host file system has no user xattrs")
    assert err == 0 and os.getxattr(share / "hello.txt", "user.k") == b"abc"
    size = fuse.ok(Opcode.GETXATTR, node, (0).to_bytes(8, "little") + b"user.k\0")
    assert int.from_bytes(size[:4], "little") == 3
    assert fuse.ok(Opcode.GETXATTR, node, (64).to_bytes(8, "little") + b"user.k\0") == b"abc"
    assert b"user.k\0" in fuse.ok(Opcode.LISTXATTR, node, (4096).to_bytes(8, "little"))
    fuse.ok(Opcode.REMOVEXATTR, node, b"user.k\0")


def test_forget_frees_inodes_and_the_table_is_bounded(fuse: Fuse, share: Path) -> None:
    for i in range(40):
        (share / f"f{i}").write_text("x")
    nodes = []
    for i in range(32):
        nodes.append(fuse.lookup(f"f{i}".encode())[0])
    assert fuse.raw(Opcode.LOOKUP, FUSE_ROOT_ID, b"f39\0")[0] == errno.ENFILE
    for node in nodes:  # FORGET on hiprio: no reply at all
        assert fuse.raw(Opcode.FORGET, node, FORGET_IN.pack(1), out=0, queue=0) == (0, b"")
    assert fuse.lookup(b"f39")[0] not in (0, FUSE_ROOT_ID)
    assert fuse.raw(Opcode.GETATTR, nodes[0], bytes(16))[0] == errno.ESTALE


def test_stats_count_requests_by_opcode(fuse: Fuse) -> None:
    fuse.lookup(b"hello.txt")
    fuse.raw(Opcode.LOOKUP, FUSE_ROOT_ID, b"nope\0")
    fuse.raw(4242, FUSE_ROOT_ID)
    stats = fuse.h.device.stats[1]
    assert stats.kinds["lookup"] == 2 and stats.kinds["init"] == 1
    assert stats.kinds["unknown"] == 1 and stats.errors >= 2
    assert opcode_name(Opcode.READDIRPLUS) == "readdirplus"


def test_readonly_refuses_every_change(share: Path) -> None:
    device = FsDevice(FsConfig(shared_dir=share, tag="t", sandbox="none", readonly=True))
    with DeviceHarness(device) as h:
        f = Fuse(h)
        f.ok(Opcode.INIT, 0, INIT_IN.pack(7, 38, 0, 0, 0))
        node = f.lookup(b"hello.txt")[0]
        assert f.raw(Opcode.MKDIR, FUSE_ROOT_ID, MKDIR_IN.pack(0o755, 0) + b"d\0")[0] == \
            errno.EROFS
        assert f.raw(Opcode.OPEN, node, OPEN_IN.pack(os.O_WRONLY, 0))[0] == errno.EROFS
        assert f.raw(Opcode.UNLINK, FUSE_ROOT_ID, b"hello.txt\0")[0] == errno.EROFS
        fh = OPEN_OUT.unpack(f.ok(Opcode.OPEN, node, OPEN_IN.pack(os.O_RDONLY, 0)))[0]
        assert f.ok(Opcode.READ, node, READ_IN.pack(fh, 0, 5, 0, 0, 0, 0)) == b"hello"
    device.close()
    assert sorted(os.listdir(share)) == ["hello.txt", "sub"]


def test_cached_reads_lookups_and_getattr_are_answered_on_the_loop(fuse: Fuse,
                                                                   share: Path) -> None:
    """They cannot wait for the disk, so no worker hand-over: the kick that brings them
    also uses them."""
    node = fuse.lookup(b"hello.txt")[0]
    fh = OPEN_OUT.unpack(fuse.ok(Opcode.OPEN, node, OPEN_IN.pack(os.O_RDWR, 0)))[0]
    (share / "hello.txt").read_bytes()  # in the page cache now
    h = fuse.h
    for opcode, args in ((Opcode.GETATTR, bytes(16)), (Opcode.LOOKUP, b"hello.txt\0"),
                         (Opcode.READ, READ_IN.pack(fh, 0, 5, 0, 0, 0, 0))):
        header = IN_HEADER.pack(IN_HEADER.size + len(args), opcode, 999, node if opcode
                                != Opcode.LOOKUP else FUSE_ROOT_ID, 0, 0, 0, 0, 0)
        head = h.post(1, readable=header + args, writable=4096)
        used = h.kick(1)
        assert [u.head for u in used] == [head], opcode
        assert OUT_HEADER.unpack_from(used[0].data)[1] == 0
    assert used[0].data[OUT_HEADER.size:used[0].length] == b"hello"
    err, out = fuse.raw(Opcode.WRITE, node, WRITE_IN.pack(fh, 0, 1, 0, 0, 0, 0) + b"H")
    assert err == 0 and WRITE_OUT.unpack(out)[0] == 1
    assert (share / "hello.txt").read_bytes() == b"Hello world\n"


def _count_submits(device: FsDevice, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one per job handed to the workers."""
    submitted: list[int] = []
    submit = device.pool.submit

    def counting(job: Callable[[], None]) -> None:
        submitted.append(1)
        submit(job)

    monkeypatch.setattr(device.pool, "submit", counting)
    return submitted


def test_short_operations_on_a_local_share_run_on_the_loop_until_one_is_slow(
        fuse: Fuse, share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WRITE, CREATE, UNLINK... on the share's own local file system skip the workers;
    one slower than LOOP_SLOW sends them to the workers for a while, and so does a
    share that is not on a local file system."""
    device = fuse.h.device
    assert isinstance(device, FsDevice)
    assert device.server.local  # pytest's tmp_path: ext4, xfs, btrfs or tmpfs
    submitted = _count_submits(device, monkeypatch)
    entry = ENTRY_OUT.unpack_from(fuse.ok(Opcode.CREATE, FUSE_ROOT_ID,
                                          CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + b"new\0"))
    fh = OPEN_OUT.unpack_from(
        fuse.ok(Opcode.OPEN, entry[0], OPEN_IN.pack(os.O_RDWR | os.O_TRUNC, 0)))[0]
    write = WRITE_IN.pack(fh, 0, 3, 0, 0, 0, 0) + b"abc"
    assert WRITE_OUT.unpack(fuse.ok(Opcode.WRITE, entry[0], write))[0] == 3
    assert submitted == []
    assert (share / "new").read_bytes() == b"abc"

    monkeypatch.setattr(device_mod, "LOOP_SLOW", -1.0)  # every operation is "slow"
    fuse.ok(Opcode.WRITE, entry[0], write)
    assert submitted == [] and device._loop_paused_until > time.monotonic()
    fuse.ok(Opcode.WRITE, entry[0], write)  # paused: a worker's
    assert submitted == [1]

    monkeypatch.setattr(device_mod, "LOOP_SLOW", 10.0)
    device._loop_paused_until = 0.0
    device.server.local = False  # NFS, FUSE...: everything that may wait goes to workers
    fuse.ok(Opcode.UNLINK, FUSE_ROOT_ID, b"new\0")
    assert submitted == [1, 1] and not (share / "new").exists()


def test_a_write_through_a_handle_of_another_device_goes_to_a_worker(
        fuse: Fuse, share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The object's device decides (a mount inside the share may be anything); the
    file handle, not the guest's node id, names a WRITE's object."""
    device = fuse.h.device
    assert isinstance(device, FsDevice)
    node = fuse.lookup(b"hello.txt")[0]
    fh = OPEN_OUT.unpack(fuse.ok(Opcode.OPEN, node, OPEN_IN.pack(os.O_RDWR, 0)))[0]
    submitted = _count_submits(device, monkeypatch)
    inode = device.server.inodes.get(node)
    device.server.inodes.release(inode)
    monkeypatch.setattr(inode, "dev", -2)
    write = WRITE_IN.pack(fh, 0, 1, 0, 0, 0, 0) + b"J"
    fuse.ok(Opcode.WRITE, FUSE_ROOT_ID, write)  # the root's node id does not fool it
    assert submitted == [1]
    assert (share / "hello.txt").read_bytes() == b"Jello world\n"
