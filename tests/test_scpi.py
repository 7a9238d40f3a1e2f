"""Binary blocks, record layouts and message framing (drivers.blocks, drivers.scpi)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from drivers import blocks
from drivers import command_set as cs
from drivers.scpi import Block, FramingError, quote, read_message, split_fields, unquote
from hwctl.backend import Geometry, Limits
from sim_backend import physics
from sim_backend.chip import EmulatedChip


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
    assert blocks.pack_column(np.array([1.0, 3.0]), blocks.AMPLITUDES_V) == struct.pack("<2d", 1.0, 3.0)


def test_constant_column_travels_once():
    amplitudes_v = np.full(1000, 2.5)
    payload = blocks.pack_column(amplitudes_v, blocks.AMPLITUDES_V)
    assert payload == struct.pack("<d", 2.5)
    restored = blocks.unpack_column(payload, blocks.AMPLITUDES_V, 1000)
    assert restored.tobytes() == amplitudes_v.tobytes()


def test_column_with_wrong_count_rejected():
    with pytest.raises(blocks.BlockError, match="contains 2 values, expected 3 or 1"):
        blocks.unpack_column(struct.pack("<2d", 1.0, 2.0), blocks.AMPLITUDES_V, 3)
    with pytest.raises(blocks.BlockError, match="whole number of 8-byte values"):
        blocks.unpack_column(bytes(12), blocks.AMPLITUDES_V, 1)


@pytest.mark.parametrize(
    "device_ids, expected",
    [
        # Ascending, steps below 256: layout 1, the first id as uint32, then one byte per step.
        ([3, 4, 9, 264], b"\x01" + struct.pack("<I3B", 3, 1, 5, 255)),
        # The example in docs/protocol.md: a bitmap is one byte shorter than the steps.
        ([3, 4, 9], b"\x08" + struct.pack("<I", 3) + bytes([0b01000011])),
        # A step of 256: layout 2, steps as uint16.
        ([70000, 70000, 70256], b"\x02" + struct.pack("<I2H", 70000, 0, 256)),
        # A step beyond 65,535: layout 4, every id as uint32.
        ([1, 65537], b"\x04" + struct.pack("<2I", 1, 65537)),
        # Not ascending: layout 4.
        ([258, 1], b"\x04" + struct.pack("<2I", 258, 1)),
        # Strictly ascending and dense: layout 8, the first id, then one bit per id from it on.
        ([10, 11, 13, *range(20, 36)], b"\x08" + struct.pack("<I", 10) + bytes([0b00001011, 0b11111100, 0xFF, 0b11])),
        # Ascending with a repeat: no bitmap.
        ([10, 11, 11], b"\x01" + struct.pack("<I2B", 10, 1, 0)),
        ([2**32 - 1], b"\x01" + struct.pack("<I", 2**32 - 1)),
        ([], b"\x04"),
    ],
)
def test_device_id_layouts_bytes(device_ids, expected):
    payload = blocks.pack_device_ids(np.array(device_ids, dtype=np.int64))
    assert payload == expected
    assert blocks.unpack_device_ids(payload).tolist() == device_ids


def test_device_ids_round_trip_any_order():
    rng = np.random.default_rng(4)
    for device_ids in (
        np.sort(rng.choice(723_444, 5000, replace=False)),
        np.sort(rng.choice(65_536, 30_000, replace=False)),  # dense: a bitmap
        rng.permutation(723_444)[:5000],
        np.array([5, 3], dtype=np.uint8),  # a descending pair of unsigned ids must not wrap
    ):
        restored = blocks.unpack_device_ids(blocks.pack_device_ids(device_ids))
        assert restored.dtype == np.int64
        assert restored.tolist() == device_ids.tolist()


def test_device_ids_beyond_uint32_rejected():
    with pytest.raises(blocks.BlockError, match="must lie in \\[0, 4294967296\\)"):
        blocks.pack_device_ids(np.array([2**32]))
    with pytest.raises(blocks.BlockError, match="got -1"):
        blocks.pack_device_ids(np.array([-1, 4]))


@pytest.mark.parametrize(
    "payload, problem",
    [
        (b"", "needs at least its layout byte"),
        (b"\x03" + bytes(4), "unknown device id layout 3"),
        (b"\x08\x00\x00", "lacks its first id"),
        (b"\x08" + struct.pack("<I", 2**32 - 2) + b"\x04", "beyond 4294967295"),
        (b"\x01\x00\x00", "expected 4 plus a multiple of 1"),
        (b"\x02" + bytes(5), "expected 4 plus a multiple of 2"),
        (b"\x04" + bytes(6), "not a multiple of 4"),
        (b"\x01" + struct.pack("<I", 2**32 - 1) + b"\x01", "beyond 4294967295"),
    ],
)
def test_device_id_block_malformed_rejected(payload, problem):
    with pytest.raises(blocks.BlockError, match=problem):
        blocks.unpack_device_ids(payload)


def test_one_pulse_shape_travels_once():
    table, index = blocks.pack_pulse_shapes(np.ones(1000, dtype=np.uint8), np.full(1000, 250.0))
    assert table == struct.pack("<Bd", 1, 250.0)
    assert index == b""
    kinds, widths_ns = blocks.unpack_pulse_shapes(table, index, 1000)
    assert kinds.dtype == np.uint8
    assert kinds.tolist() == [1] * 1000
    assert widths_ns.tolist() == [250.0] * 1000


def test_two_pulse_shapes_take_a_bit_each():
    kinds = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=np.uint8)
    widths_ns = np.array([250.0, 50.0, 250.0, 250.0, 50.0, 250.0, 250.0, 250.0, 50.0])
    table, index = blocks.pack_pulse_shapes(kinds, widths_ns)
    assert table == struct.pack("<BdBd", 1, 250.0, 0, 50.0), "shapes in order of first appearance"
    assert index == bytes([0b00010010, 0b1]), "bit i is the shape of pulse i, least significant first"
    restored_kinds, restored_widths = blocks.unpack_pulse_shapes(table, index, 9)
    assert restored_kinds.tolist() == kinds.tolist()
    assert restored_widths.tobytes() == widths_ns.tobytes()


def test_three_pulse_shapes_take_a_byte_each():
    kinds = np.array([1, 0, 1, 1], dtype=np.uint8)
    widths_ns = np.array([250.0, 50.0, 500.0, 250.0])
    table, index = blocks.pack_pulse_shapes(kinds, widths_ns)
    assert table == struct.pack("<BdBdBd", 1, 250.0, 0, 50.0, 1, 500.0)
    assert index == bytes([0, 1, 2, 0])
    restored_kinds, restored_widths = blocks.unpack_pulse_shapes(table, index, 4)
    assert restored_kinds.tolist() == kinds.tolist()
    assert restored_widths.tobytes() == widths_ns.tobytes()


def test_many_pulse_shapes_widen_the_index():
    rng = np.random.default_rng(6)
    kinds = rng.integers(0, 2, 3000).astype(np.uint8)
    widths_ns = rng.uniform(10.0, 1000.0, 3000)  # every pulse its own width: 3000 shapes
    table, index = blocks.pack_pulse_shapes(kinds, widths_ns)
    assert len(table) == 3000 * 9
    assert len(index) == 3000 * 2, "more than 256 shapes take uint16 indices"
    restored_kinds, restored_widths = blocks.unpack_pulse_shapes(table, index, 3000)
    assert restored_kinds.tolist() == kinds.tolist()
    assert restored_widths.tobytes() == widths_ns.tobytes()


@pytest.mark.parametrize(
    "table, index, count, problem",
    [
        (bytes(10), b"", 3, "not a whole number of 9-byte records"),
        (b"", b"", 3, "empty shape table for 3 pulses"),
        (struct.pack("<Bd", 1, 50.0), b"\x00", 1, "one-entry shape table takes an empty index"),
        (struct.pack("<BdBd", 1, 50.0, 0, 50.0), b"\x00\x01", 3, "bitmap of 2 bytes for 3 pulses"),
        (struct.pack("<BdBdBd", 1, 50.0, 0, 50.0, 1, 9.0), b"\x00\x01", 3, "expected 3"),
        (struct.pack("<BdBdBd", 1, 50.0, 0, 50.0, 1, 9.0), b"\x00\x03", 2, "shape index 3 outside a table of 3"),
    ],
)
def test_pulse_shape_blocks_malformed_rejected(table, index, count, problem):
    with pytest.raises(blocks.BlockError, match=problem):
        blocks.unpack_pulse_shapes(table, index, count)


def test_adc_codes_reproduce_emulator_reads_bit_for_bit():
    params = EmulatedChip(seed=0, geometry=Geometry(1, 1, 1)).params
    g_us = physics.adc_quantise_us(params, np.random.default_rng(7).normal(10.0, 12.0, 20_000))
    scale = blocks.AdcScale(params.read_adc_bits, physics.adc_lsb_us(params))

    payload = scale.encode(g_us)
    assert len(payload) == g_us.size * (1 if params.read_adc_bits <= 8 else 2)
    assert payload == np.rint(g_us / physics.adc_lsb_us(params)).astype(scale.code_dtype).tobytes()
    assert scale.decode(payload, g_us.size).tobytes() == g_us.tobytes()


def test_adc_codes_of_sixteen_bits_take_two_bytes():
    scale = blocks.AdcScale(12, 25.0 / 4096)
    g_us = np.array([0.0, 25.0 / 4096 * 4095, 25.0 / 4096 * 300])
    payload = scale.encode(g_us)
    assert payload == struct.pack("<3H", 0, 4095, 300)
    assert scale.decode(payload, 3).tobytes() == g_us.tobytes()
    with pytest.raises(blocks.BlockError, match="ADC code 4096 above the 12-bit maximum 4095"):
        scale.decode(struct.pack("<H", 4096), 1)


@pytest.mark.parametrize(
    "value",
    [0.05, -0.0, float("nan"), 32.0],
    ids=["between-codes", "negative-zero", "nan", "above-top-code"],
)
def test_adc_encode_rejects_values_no_code_gives(value):
    scale = blocks.AdcScale(8, 0.125)
    with pytest.raises(blocks.BlockError, match="is not an ADC code in \\[0, 255\\]"):
        scale.encode(np.array([1.0, value]))


@pytest.mark.parametrize("bits, lsb_us", [(0, 0.1), (17, 0.1), (8, 0.0), (8, float("inf"))])
def test_adc_scale_rejects_invalid(bits, lsb_us):
    with pytest.raises(ValueError, match="ADC"):
        blocks.AdcScale(bits, lsb_us)


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
