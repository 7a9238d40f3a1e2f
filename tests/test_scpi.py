"""Binary blocks, record layouts and message framing (drivers.blocks, drivers.scpi)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from drivers import blocks
from drivers import command_set as cs
from drivers.scpi import Block, FramingError, quote, read_message, split_fields, unquote
from hwctl.backend import Limits


class ChunkedStream:
    """Feeds bytes to read_message the way a transport does: lines through 0x0A, exact counts."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0
        self.line_reads = 0
        self.exact_reads: list[int] = []

    def read_line(self) -> bytes:
        self.line_reads += 1
        end = self.data.index(b"\n", self.position) + 1
        chunk, self.position = self.data[self.position : end], end
        return chunk

    def read_exact(self, count: int) -> bytes:
        self.exact_reads.append(count)
        chunk = self.data[self.position : self.position + count]
        assert len(chunk) == count, "read past the end of the test stream"
        self.position += count
        return chunk


def test_block_encoding_header_digits():
    assert blocks.encode_block(b"") == b"#10"
    assert blocks.encode_block(b"abc") == b"#13abc"
    assert blocks.encode_block(bytes(12)) == b"#212" + bytes(12)
    assert blocks.parse_block_header(b"#212" + bytes(12)) == (4, 12)


@pytest.mark.parametrize(
    "header, problem",
    [(b"#0abc", "indefinite"), (b"#a12", "digit count"), (b"#3 12", "length field"), (b"#9123", "truncated")],
)
def test_block_header_rejects_malformed(header, problem):
    with pytest.raises(blocks.BlockError, match=problem):
        blocks.parse_block_header(header)


def test_column_layouts_bytes():
    assert blocks.pack_device_ids(np.array([1, 258])) == struct.pack("<2I", 1, 258)
    assert blocks.pack_column(np.array([1, 0], dtype=np.uint8), blocks.KINDS) == b"\x01\x00"
    assert blocks.pack_column(np.array([1.0, 3.0]), blocks.AMPLITUDES_V) == struct.pack("<2d", 1.0, 3.0)


def test_constant_column_travels_once():
    widths = np.full(1000, 250.0)
    payload = blocks.pack_column(widths, blocks.WIDTHS_NS)
    assert payload == struct.pack("<d", 250.0)
    restored = blocks.unpack_column(payload, blocks.WIDTHS_NS, 1000)
    assert restored.tobytes() == widths.tobytes()


def test_column_with_wrong_count_rejected():
    with pytest.raises(blocks.BlockError, match="contains 2 values, expected 3 or 1"):
        blocks.unpack_column(struct.pack("<2d", 1.0, 2.0), blocks.AMPLITUDES_V, 3)
    with pytest.raises(blocks.BlockError, match="whole number of 8-byte values"):
        blocks.unpack_column(bytes(12), blocks.AMPLITUDES_V, 1)


def test_device_ids_beyond_uint32_rejected():
    with pytest.raises(blocks.BlockError, match="uint32"):
        blocks.pack_device_ids(np.array([2**32]))


def test_conductance_vector_round_trips_bit_for_bit():
    values = np.random.default_rng(1).random(1000) * 25.0
    payload = np.ascontiguousarray(values, dtype=blocks.CONDUCTANCES_US).tobytes()
    assert payload == struct.pack("<1000d", *values)
    assert np.array_equal(blocks.unpack_column(payload, blocks.CONDUCTANCES_US, 1000), values)


def test_read_message_keeps_line_feeds_inside_block():
    # 1.0000000000000022 has the bytes 0a 00 00 00 00 00 f0 3f: a line feed inside a value.
    values = np.array([1.0000000000000022, 2.5, np.frombuffer(b"\n" * 8, "<f8")[0]])
    payload = values.astype("<f8").tobytes()
    assert payload.count(b"\n") >= 9
    message = b"7,0,1.5,0,123," + blocks.encode_block(payload) + b"\n"
    stream = ChunkedStream(message + b"NEXT\n")

    assert read_message(stream.read_line, stream.read_exact, max_block_bytes=24) == message
    assert stream.exact_reads, "the payload must be completed with an exact read"
    assert read_message(stream.read_line, stream.read_exact, max_block_bytes=0) == b"NEXT\n"


def test_read_message_two_blocks_and_quoted_hash():
    message = b'CMD "a#5,b",#13a\nb,#12\n\n\n'
    stream = ChunkedStream(message)
    assert read_message(stream.read_line, stream.read_exact, max_block_bytes=3) == message


def test_read_message_rejects_oversized_block_before_reading():
    stream = ChunkedStream(b"1,0,0.0,0,5,#9999999999\n")
    with pytest.raises(FramingError, match="exceeds the limit of 80 bytes"):
        read_message(stream.read_line, stream.read_exact, max_block_bytes=80)
    assert stream.exact_reads == []


def test_read_message_rejects_bytes_after_line_feed():
    def read_line() -> bytes:
        return b"A\nB\n"

    with pytest.raises(FramingError, match="follow the line feed"):
        read_message(read_line, lambda count: b"", max_block_bytes=0)


def test_split_fields_text_quoted_and_block():
    fields = split_fields(b'12, -222,"Data ""out"" of range, really",#14\n,#\x01')
    assert fields[0] == b"12"
    assert fields[1] == b"-222"
    assert unquote(fields[2]) == 'Data "out" of range, really'
    assert isinstance(fields[3], Block)
    assert bytes(fields[3].payload) == b"\n,#\x01"


def test_split_fields_rejects_truncated_block():
    with pytest.raises(FramingError, match="past the end"):
        split_fields(b"1,#15abc")


def test_quote_keeps_message_on_one_line():
    assert quote('bad "x"\nnext') == b'"bad ""x"" next"'


def test_limits_reply_round_trips():
    limits = Limits(0.2, 2.0, 3.5, 10000.0, 1000, 604800.0, 25.0, 0.1 + 0.2)
    body = cs.format_limits(limits)
    assert body == b"0.2,2.0,3.5,10000.0,1000,604800.0,25.0,0.30000000000000004"
    assert cs.parse_limits(body) == limits


def test_limits_reply_with_missing_value_is_rejected():
    with pytest.raises(ValueError, match="returned 7 values, expected 8"):
        cs.parse_limits(b"0.2,2.0,3.5,10000.0,1000,604800.0,25.0")
