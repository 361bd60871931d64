"""The sans-I/O vhost-user message layer (vhost-user.rst "Message Specification")."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import BadPayloadSize, TruncatedMessage, UnknownRequest, VhostUserError
from pyvirtio.memory import RegionSpec
from pyvirtio.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION,
    Message,
    MessageDecoder,
    Request,
    VringAddr,
    VringState,
    decode_config,
    decode_mem_table,
    decode_region,
    decode_u64,
    decode_vring_addr,
    decode_vring_state,
    encode,
    encode_config,
    encode_mem_table,
    encode_region,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)

u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def eventfds() -> Iterator[Callable[[], int]]:
    """Factory of real eventfds (stand-ins for kick/call fds), closed at teardown if still open."""
    made: list[int] = []

    def make() -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        if is_open(fd):
            os.close(fd)


def frame(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


# -- framing ----------------------------------------------------------------------------------


def test_message_split_across_feeds_is_decoded_once_complete() -> None:
    raw = frame(Request.SET_FEATURES, encode_u64(0x1234))
    decoder = MessageDecoder()
    for i, byte in enumerate(raw[:-1]):
        # Until the header is in, only the header is asked for.
        assert decoder.wanted == (HEADER.size - i if i < HEADER.size else len(raw) - i)
        decoder.feed(bytes([byte]))
        assert decoder.next_message() is None
    decoder.feed(raw[-1:])
    msg = decoder.next_message()
    assert msg is not None
    assert (msg.request, msg.flags, msg.payload, msg.fds) == (
        Request.SET_FEATURES,
        VERSION,
        encode_u64(0x1234),
        [],
    )
    assert decoder.next_message() is None
    assert decoder.wanted == HEADER.size


def test_several_messages_in_one_feed_are_decoded_in_order() -> None:
    decoder = MessageDecoder()
    decoder.feed(
        frame(Request.GET_FEATURES)
        + frame(Request.SET_OWNER)
        + frame(Request.SET_VRING_NUM, encode_vring_state(1, 256))
    )
    requests = [m.request for m in iter(decoder.next_message, None)]
    assert requests == [Request.GET_FEATURES, Request.SET_OWNER, Request.SET_VRING_NUM]


def test_wanted_never_asks_past_the_message_in_progress() -> None:
    """The runtime reads ``wanted`` bytes so a read never swallows the next message's fds."""
    decoder = MessageDecoder()
    raw = frame(Request.SET_VRING_ADDR, bytes(40))
    decoder.feed(raw[:5])
    assert decoder.wanted == 7
    decoder.feed(raw[5:12])
    assert decoder.wanted == 40
    decoder.feed(raw[12:30])
    assert decoder.wanted == 22


def test_fds_are_attached_to_the_message_they_arrived_with(eventfds: Callable[[], int]) -> None:
    kick = eventfds()
    decoder = MessageDecoder()
    decoder.feed(frame(Request.SET_OWNER))
    decoder.feed(frame(Request.SET_VRING_KICK, encode_u64(0)), [kick])
    first, second = decoder.next_message(), decoder.next_message()
    assert first is not None
    assert second is not None
    assert (first.request, first.fds) == (Request.SET_OWNER, [])
    assert (second.request, second.fds) == (Request.SET_VRING_KICK, [kick])


def test_fds_sent_with_a_header_stay_with_its_message_across_feeds(
    eventfds: Callable[[], int],
) -> None:
    a, b = eventfds(), eventfds()
    raw = frame(Request.SET_MEM_TABLE, encode_mem_table([RegionSpec(0, 0x1000, 0x1000, 0)] * 2))
    decoder = MessageDecoder()
    decoder.feed(raw[:12], [a, b])
    assert decoder.next_message() is None
    decoder.feed(raw[12:])
    decoder.feed(frame(Request.GET_FEATURES))
    msg = decoder.next_message()
    assert msg is not None
    assert msg.fds == [a, b]
    after = decoder.next_message()
    assert after is not None
    assert after.fds == []


def test_eof_between_messages_is_a_clean_close() -> None:
    decoder = MessageDecoder()
    decoder.feed(frame(Request.GET_FEATURES))
    assert decoder.next_message() is not None
    decoder.eof()  # no exception: nothing was pending
    assert decoder.wanted == HEADER.size


@pytest.mark.parametrize("cut", [1, 11, 12, 19])
def test_eof_inside_a_message_raises_truncated_message_and_closes_its_fds(
    eventfds: Callable[[], int], cut: int
) -> None:
    fd = eventfds()
    decoder = MessageDecoder()
    decoder.feed(frame(Request.SET_VRING_CALL, encode_u64(0))[:cut], [fd])
    assert decoder.next_message() is None
    with pytest.raises(TruncatedMessage, match=f"{cut} bytes into a message"):
        decoder.eof()
    assert not is_open(fd)
    assert decoder.wanted == HEADER.size


def test_size_field_beyond_max_payload_is_refused_without_waiting_for_the_payload(
    eventfds: Callable[[], int],
) -> None:
    fd = eventfds()
    decoder = MessageDecoder()
    decoder.feed(HEADER.pack(Request.SET_CONFIG, VERSION, MAX_PAYLOAD + 1), [fd])
    with pytest.raises(BadPayloadSize) as info:
        decoder.next_message()
    assert info.value.request == "SET_CONFIG"
    assert str(MAX_PAYLOAD + 1) in str(info.value)
    assert not is_open(fd)
    # The decoder starts afresh.
    decoder.feed(frame(Request.GET_FEATURES))
    msg = decoder.next_message()
    assert msg is not None
    assert msg.request == Request.GET_FEATURES


def test_payload_of_exactly_max_payload_is_accepted() -> None:
    decoder = MessageDecoder()
    decoder.feed(frame(Request.SET_CONFIG, bytes(MAX_PAYLOAD)))
    msg = decoder.next_message()
    assert msg is not None
    assert len(msg.payload) == MAX_PAYLOAD


@pytest.mark.parametrize("code", [0, 44, 999, 0xFFFF_FFFF])
def test_unknown_request_code_is_refused(code: int) -> None:
    decoder = MessageDecoder()
    decoder.feed(frame(code, b"abc"))
    with pytest.raises(UnknownRequest, match=f"unknown request code {code}"):
        decoder.next_message()
    assert decoder.wanted == HEADER.size  # the garbage is gone


@pytest.mark.parametrize("flags", [0, 2, 3, FLAG_NEED_REPLY])
def test_wrong_version_bits_are_refused(flags: int) -> None:
    decoder = MessageDecoder()
    decoder.feed(frame(Request.GET_FEATURES, flags=flags))
    with pytest.raises(UnknownRequest, match="protocol version") as info:
        decoder.next_message()
    assert info.value.request == "GET_FEATURES"


def test_need_reply_flag_is_exposed() -> None:
    decoder = MessageDecoder()
    decoder.feed(frame(Request.SET_FEATURES, encode_u64(0), VERSION | FLAG_NEED_REPLY))
    msg = decoder.next_message()
    assert msg is not None
    assert msg.need_reply
    assert msg.name == "SET_FEATURES"


def test_message_names_unknown_codes_by_number() -> None:
    assert Message(999, VERSION, b"").name == "request 999"
    assert not Message(Request.GET_FEATURES, VERSION, b"").need_reply


def test_message_close_fds_closes_and_forgets_them(eventfds: Callable[[], int]) -> None:
    fd = eventfds()
    msg = Message(Request.SET_VRING_CALL, VERSION, encode_u64(0), [fd])
    msg.close_fds()
    assert msg.fds == []
    assert not is_open(fd)


def test_replies_carry_version_1_and_the_reply_flag() -> None:
    raw = encode(Request.GET_FEATURES, encode_u64(7), reply=True)
    assert HEADER.unpack_from(raw) == (Request.GET_FEATURES, VERSION | FLAG_REPLY, 8)
    assert raw[12:] == encode_u64(7)
    assert HEADER.unpack_from(encode(Request.SET_OWNER)) == (Request.SET_OWNER, VERSION, 0)


#: Mostly well-framed messages (any request code, flags, payload), some raw garbage.
frames = st.builds(
    lambda code, flags, payload: HEADER.pack(code, flags, len(payload)) + payload,
    st.one_of(st.sampled_from(list(Request)), u32),
    st.sampled_from([VERSION, VERSION | FLAG_NEED_REPLY, 0, 2, 3]),
    st.binary(max_size=48),
)
chunk_streams = st.lists(st.one_of(frames, st.binary(max_size=64)), max_size=8)


@settings(max_examples=150, deadline=None)
@given(chunks=chunk_streams, cuts=st.lists(st.integers(1, 30), max_size=8))
def test_garbage_yields_only_messages_or_protocol_errors(
    chunks: list[bytes], cuts: list[int]
) -> None:
    """h11-style fuzz: whatever the peer sends, however it is split, only Message
    objects or our own protocol errors come out."""
    stream = b"".join(chunks)
    pieces, pos = [], 0
    for cut in cuts:
        pieces.append(stream[pos : pos + cut])
        pos += cut
    pieces.append(stream[pos:])
    decoder = MessageDecoder()
    for piece in pieces:
        decoder.feed(piece)
        try:
            while (msg := decoder.next_message()) is not None:
                assert isinstance(msg, Message)
                assert msg.request in set(Request)
                assert msg.flags & 0x3 == VERSION
                assert len(msg.payload) <= MAX_PAYLOAD
        except VhostUserError as exc:
            assert isinstance(exc, UnknownRequest | BadPayloadSize)
            assert decoder.wanted == HEADER.size  # the decoder resynchronised on nothing
    with contextlib.suppress(TruncatedMessage):
        decoder.eof()
    assert decoder.wanted == HEADER.size


# -- payloads ---------------------------------------------------------------------------------

FIXED_SIZE = [
    (Request.SET_FEATURES, decode_u64, 8),
    (Request.SET_PROTOCOL_FEATURES, decode_u64, 8),
    (Request.SET_VRING_KICK, decode_u64, 8),
    (Request.SET_VRING_CALL, decode_u64, 8),
    (Request.SET_VRING_ERR, decode_u64, 8),
    (Request.SET_VRING_NUM, decode_vring_state, 8),
    (Request.SET_VRING_BASE, decode_vring_state, 8),
    (Request.GET_VRING_BASE, decode_vring_state, 8),
    (Request.SET_VRING_ENABLE, decode_vring_state, 8),
    (Request.SET_VRING_ADDR, decode_vring_addr, 40),
    (Request.ADD_MEM_REG, decode_region, 40),
    (Request.REM_MEM_REG, decode_region, 40),
]


@pytest.mark.parametrize(("request_code", "decode", "size"), FIXED_SIZE)
@pytest.mark.parametrize("delta", [-1, 1, "empty"])
def test_wrong_size_for_a_fixed_size_request_is_bad_payload_size(
    request_code: Request, decode: Callable[[Message], object], size: int, delta: int | str
) -> None:
    length = 0 if delta == "empty" else size + int(delta)
    msg = Message(request_code, VERSION, bytes(length))
    with pytest.raises(BadPayloadSize) as info:
        decode(msg)
    assert info.value.request == request_code.name
    assert f"payload is {length} bytes, expected {size}" in str(info.value)


@pytest.mark.parametrize(("request_code", "decode", "size"), FIXED_SIZE)
def test_right_size_for_a_fixed_size_request_decodes(
    request_code: Request, decode: Callable[[Message], object], size: int
) -> None:
    assert decode(Message(request_code, VERSION, bytes(size))) is not None


def test_mem_table_with_more_than_8_regions_is_refused() -> None:
    regions = [RegionSpec(i << 20, 1 << 20, (1 << 40) + (i << 20), 0) for i in range(MAX_FDS + 1)]
    msg = Message(Request.SET_MEM_TABLE, VERSION, encode_mem_table(regions))
    with pytest.raises(BadPayloadSize, match="9 regions, at most 8") as info:
        decode_mem_table(msg)
    assert info.value.request == "SET_MEM_TABLE"


def test_mem_table_of_8_regions_decodes_in_order() -> None:
    regions = [RegionSpec(i << 20, 1 << 20, (1 << 40) + (i << 20), i * 7) for i in range(MAX_FDS)]
    msg = Message(Request.SET_MEM_TABLE, VERSION, encode_mem_table(regions))
    assert decode_mem_table(msg) == regions


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # not even the count
        b"\x01\0\0",  # short count
        encode_mem_table([RegionSpec(0, 0x1000, 0, 0)] * 2)[:-32],  # says 2, carries 1
        encode_mem_table([RegionSpec(0, 0x1000, 0, 0)]) + bytes(8),  # trailing junk
    ],
)
def test_mem_table_whose_size_does_not_match_its_count_is_refused(payload: bytes) -> None:
    with pytest.raises(BadPayloadSize):
        decode_mem_table(Message(Request.SET_MEM_TABLE, VERSION, payload))


@pytest.mark.parametrize(
    ("offset", "size", "data_len"),
    [
        (0, MAX_CONFIG_SIZE + 1, MAX_CONFIG_SIZE + 1),  # window too big
        (200, 100, 100),  # window runs past the config space limit
        (0, 8, 4),  # size field says 8, payload carries 4
    ],
)
def test_config_window_beyond_limits_or_size_is_refused(
    offset: int, size: int, data_len: int
) -> None:
    msg = Message(Request.GET_CONFIG, VERSION, encode_config(offset, size, 0, bytes(data_len)))
    with pytest.raises(BadPayloadSize):
        decode_config(msg)


def test_config_header_shorter_than_12_bytes_is_refused() -> None:
    with pytest.raises(BadPayloadSize):
        decode_config(Message(Request.SET_CONFIG, VERSION, bytes(11)))


@settings(max_examples=40, deadline=None)
@given(
    addr=st.builds(
        VringAddr,
        index=u32,
        flags=u32,
        desc_user_addr=u64,
        used_user_addr=u64,
        avail_user_addr=u64,
        log_guest_addr=u64,
    )
)
def test_vring_addr_round_trips(addr: VringAddr) -> None:
    msg = Message(Request.SET_VRING_ADDR, VERSION, encode_vring_addr(addr))
    assert decode_vring_addr(msg) == addr


@settings(max_examples=40, deadline=None)
@given(index=u32, num=u32)
def test_vring_state_round_trips(index: int, num: int) -> None:
    msg = Message(Request.SET_VRING_BASE, VERSION, encode_vring_state(index, num))
    assert decode_vring_state(msg) == VringState(index, num)


@settings(max_examples=40, deadline=None)
@given(
    regions=st.lists(
        st.builds(RegionSpec, guest_addr=u64, size=u64, user_addr=u64, mmap_offset=u64),
        max_size=MAX_FDS,
    )
)
def test_memory_regions_round_trip(regions: list[RegionSpec]) -> None:
    table = Message(Request.SET_MEM_TABLE, VERSION, encode_mem_table(regions))
    assert decode_mem_table(table) == regions
    for region in regions:
        single = Message(Request.ADD_MEM_REG, VERSION, encode_region(region))
        assert decode_region(single) == region


@settings(max_examples=40, deadline=None)
@given(offset=st.integers(0, MAX_CONFIG_SIZE), data=st.binary(max_size=MAX_CONFIG_SIZE), flags=u32)
def test_config_payload_round_trips(offset: int, data: bytes, flags: int) -> None:
    data = data[: MAX_CONFIG_SIZE - offset]
    msg = Message(Request.SET_CONFIG, VERSION, encode_config(offset, len(data), flags, data))
    decoded = decode_config(msg)
    assert (decoded.offset, decoded.size, decoded.flags, decoded.data) == (
        offset,
        len(data),
        flags,
        data,
    )
