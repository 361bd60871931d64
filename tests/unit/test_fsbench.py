"""What `pyvirtio bench fs` counts as a failed request: the reply comes from any
back-end, so a short or malformed one is counted, never a crash."""

from __future__ import annotations

import pytest

from pyvirtio.frontend.fs import Reply
from pyvirtio.frontend.fsbench import _failed
from pyvirtio.spec.fuse import WRITE_OUT


def _reply(payload: bytes, error: int = 0) -> Reply:
    return Reply(unique=2, error=error, payload=payload, length=16 + len(payload))


@pytest.mark.parametrize(("op", "reply", "failed"), [
    ("getattr", _reply(bytes(104)), False),
    ("getattr", _reply(b"", -2), True),
    ("read", _reply(bytes(4096)), False),
    ("read", _reply(bytes(4095)), True),  # short
    ("read", _reply(b"", -5), True),
    ("write", _reply(WRITE_OUT.pack(4096, 0)), False),
    ("write", _reply(WRITE_OUT.pack(4095, 0)), True),  # fewer written
    ("write", _reply(b"\x00\x10"), True),  # a reply too short for fuse_write_out
    ("write", _reply(b""), True),
])
def test_a_reply_counts_as_failed_when_it_should(op: str, reply: Reply, failed: bool) -> None:
    assert _failed(op, 4096, reply) is failed
