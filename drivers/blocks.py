"""IEEE 488.2 definite-length arbitrary blocks and the binary record layouts of the chip protocol.

A block is ``#`` followed by one digit ``n`` (1 to 9), then ``n`` decimal digits giving the
payload length in bytes, then the payload. The payload may contain any byte, 0x0A included, so a
reader must take the length from the header and never split a message at a line feed inside a
block. The indefinite form ``#0`` is not used by this protocol and is rejected.

Every multi-byte value travels little-endian. The layouts are fixed here and documented in
docs/protocol.md; the server and the drivers both use these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Device indices. An id travels as uint32 or as a step from an earlier one (`pack_device_ids`),
#: so one controller addresses at most 2**32 devices.
DEVICE_ID = np.dtype("<u4")
MAX_DEVICES = 2**32
#: Pulse kinds (`hwctl.backend.PulseKind` values).
KINDS = np.dtype("u1")
#: Pulse amplitudes in V and widths in ns.
AMPLITUDES_V = np.dtype("<f8")
WIDTHS_NS = np.dtype("<f8")
#: One entry of a pulse batch's shape table: a kind and a width in ns, 9 bytes, no padding.
PULSE_SHAPE = np.dtype([("kind", KINDS), ("width_ns", WIDTHS_NS)])
#: Conductances in µS in the float64 read format, so that values cross the wire bit for bit.
CONDUCTANCES_US = np.dtype("<f8")

#: The largest payload a nine-digit length field can state.
MAX_BLOCK_BYTES = 999_999_999

#: Id block layouts (the payload's first byte): ascending ids as steps of 1 or 2 bytes after
#: the first id, every id as uint32, or a bitmap after the first id.
_STEP_LAYOUTS = {1: (np.dtype("u1"), 0xFF), 2: (np.dtype("<u2"), 0xFFFF)}
_ABSOLUTE_LAYOUT = 4
_BITMAP_LAYOUT = 8

#: Shapes tried one at a time before the rest of a batch is sorted with np.unique, which costs
#: more than a few vector comparisons for the one or two shapes program-and-verify sends.
_SHAPES_PEELED_MAX = 8


class BlockError(ValueError):
    """A binary block header or payload does not follow IEEE 488.2 definite-length form."""


def encode_block(payload: bytes | bytearray | memoryview) -> bytes:
    """Return ``payload`` wrapped in a definite-length block header."""
    length = len(payload)
    if length > MAX_BLOCK_BYTES:
        raise BlockError(
            f"payload of {length} bytes is too long for a definite-length block "
            f"(at most {MAX_BLOCK_BYTES}); split it into smaller batches"
        )
    digits = str(length)
    return b"#" + str(len(digits)).encode("ascii") + digits.encode("ascii") + bytes(payload)


def parse_block_header(data: bytes | bytearray | memoryview, start: int = 0) -> tuple[int, int]:
    """Parse the block header that begins at ``data[start]``.

    Returns ``(payload_start, payload_length)``, with ``payload_start`` an index into ``data``.
    Raises `BlockError` if the header is malformed or truncated.
    """
    view = memoryview(data)
    if start >= len(view) or view[start] != ord("#"):
        raise BlockError(f"expected a block header '#' at byte {start}")
    if start + 1 >= len(view):
        raise BlockError("block header truncated after '#'")
    digit_count_byte = view[start + 1]
    if digit_count_byte == ord("0"):
        raise BlockError("indefinite-length blocks (#0) are not supported; send a definite length")
    if not ord("1") <= digit_count_byte <= ord("9"):
        raise BlockError(f"invalid block length digit count {bytes([digit_count_byte])!r}")
    digit_count = digit_count_byte - ord("0")
    length_end = start + 2 + digit_count
    if length_end > len(view):
        raise BlockError(f"block header truncated: expected {digit_count} length digits")
    length_text = bytes(view[start + 2 : length_end])
    if not length_text.isdigit():
        raise BlockError(f"invalid block length field {length_text!r}")
    return length_end, int(length_text)


# ---- columns -------------------------------------------------------------------------------


def pack_column(values: np.ndarray, dtype: np.dtype) -> bytes:
    """Return ``values`` as little-endian ``dtype`` bytes, or one value if all are equal.

    A RESET batch has one amplitude, so a constant column travels as a single value that
    `unpack_column` repeats. The values stay exact.
    """
    values = np.asarray(values)
    if values.size > 1 and bool(np.all(values == values[0])):
        values = values[:1]
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def unpack_column(payload: bytes | memoryview, dtype: np.dtype, count: int) -> np.ndarray:
    """Return ``count`` native-order values from ``payload`` (one value means all equal)."""
    if len(payload) % dtype.itemsize:
        raise BlockError(
            f"block of {len(payload)} bytes is not a whole number of {dtype.itemsize}-byte values"
        )
    values = np.frombuffer(payload, dtype=dtype).astype(dtype.newbyteorder("="))
    if values.size == count:
        return values
    if values.size == 1:
        return np.full(count, values[0])
    raise BlockError(f"block contains {values.size} values, expected {count} or 1")


# ---- device ids ----------------------------------------------------------------------------


def pack_device_ids(device_ids: np.ndarray) -> bytes:
    """Return device indices as an id block payload: a layout byte, then the ids.

    Layout 1 or 2: the first id as uint32, then each following id as its step from the one
    before, in 1 or 2 bytes (unsigned). Layout 8: the first id as uint32, then a bitmap in which
    bit ``i`` (least significant bit first) marks id ``first + i`` as listed. Layout 4: every
    id as uint32. A list that is not ascending takes layout 4. An ascending one takes the
    shortest layout it fits, so program-and-verify's batches take one bit to one byte per id.
    """
    # int64, so that a descending pair of unsigned ids cannot wrap to a positive step.
    device_ids = np.asarray(device_ids).astype(np.int64, copy=False)
    if device_ids.size == 0:
        return bytes([_ABSOLUTE_LAYOUT])
    steps = np.diff(device_ids)
    smallest_step = int(steps.min()) if steps.size else 1
    ascending = smallest_step >= 0
    lowest, highest = (
        (int(device_ids[0]), int(device_ids[-1]))
        if ascending
        else (int(device_ids.min()), int(device_ids.max()))
    )
    if lowest < 0 or highest >= MAX_DEVICES:
        raise BlockError(f"device ids must lie in [0, {MAX_DEVICES}); got {lowest} .. {highest}")
    if not ascending:
        return bytes([_ABSOLUTE_LAYOUT]) + device_ids.astype(DEVICE_ID).tobytes()

    first = np.array(device_ids[:1], dtype=DEVICE_ID).tobytes()
    layout, body_bytes = _ABSOLUTE_LAYOUT, device_ids.size * DEVICE_ID.itemsize
    largest_step = int(steps.max()) if steps.size else 0
    for step_layout, (step_dtype, step_max) in _STEP_LAYOUTS.items():
        if largest_step <= step_max:
            layout, body_bytes = step_layout, DEVICE_ID.itemsize + steps.size * step_dtype.itemsize
            break
    bitmap_bytes = DEVICE_ID.itemsize + (highest - lowest) // 8 + 1
    if smallest_step > 0 and bitmap_bytes < body_bytes:
        # Repeated ids cannot be marked twice, so only strictly ascending lists get a bitmap.
        listed = np.zeros(highest - lowest + 1, dtype=bool)
        listed[device_ids - lowest] = True
        return bytes([_BITMAP_LAYOUT]) + first + np.packbits(listed, bitorder="little").tobytes()
    if layout == _ABSOLUTE_LAYOUT:
        return bytes([_ABSOLUTE_LAYOUT]) + device_ids.astype(DEVICE_ID).tobytes()
    return bytes([layout]) + first + steps.astype(_STEP_LAYOUTS[layout][0]).tobytes()


def unpack_device_ids(payload: bytes | memoryview) -> np.ndarray:
    """Return the device indices in a `pack_device_ids` payload as int64."""
    if len(payload) == 0:
        raise BlockError("empty device id block; it needs at least its layout byte")
    layout, body = payload[0], memoryview(payload)[1:]
    if layout == _ABSOLUTE_LAYOUT:
        if len(body) % DEVICE_ID.itemsize:
            raise BlockError(
                f"device id block of {len(body)} bytes after the layout byte is not a multiple of 4"
            )
        device_ids = np.frombuffer(body, dtype=DEVICE_ID).astype(np.int64)
    elif layout == _BITMAP_LAYOUT:
        device_ids = _unpack_bitmap(body)
    elif layout in _STEP_LAYOUTS:
        device_ids = _unpack_steps(layout, body)
    else:
        raise BlockError(f"unknown device id layout {layout}; expected 1, 2, 4 or 8")

    if device_ids.size and device_ids[-1] >= MAX_DEVICES:
        raise BlockError(
            f"device id block decodes to id {device_ids[-1]}, beyond {MAX_DEVICES - 1}"
        )
    return device_ids


def _unpack_steps(layout: int, body: memoryview) -> np.ndarray:
    step_dtype = _STEP_LAYOUTS[layout][0]
    if len(body) < DEVICE_ID.itemsize or (len(body) - DEVICE_ID.itemsize) % step_dtype.itemsize:
        raise BlockError(
            f"device id block of layout {layout} has {len(body)} bytes after the layout byte; "
            f"expected 4 plus a multiple of {step_dtype.itemsize}"
        )
    count = (len(body) - DEVICE_ID.itemsize) // step_dtype.itemsize + 1
    device_ids = np.empty(count, dtype=np.int64)
    device_ids[0] = np.frombuffer(body[: DEVICE_ID.itemsize], dtype=DEVICE_ID)[0]
    # A step is at most 65,535 and a block at most 10**9 bytes, so the sum stays far below 2**63.
    np.cumsum(np.frombuffer(body[DEVICE_ID.itemsize :], dtype=step_dtype), out=device_ids[1:])
    device_ids[1:] += device_ids[0]
    return device_ids


def _unpack_bitmap(body: memoryview) -> np.ndarray:
    if len(body) < DEVICE_ID.itemsize:
        raise BlockError(f"device id bitmap block of {len(body)} bytes lacks its first id")
    first = int(np.frombuffer(body[: DEVICE_ID.itemsize], dtype=DEVICE_ID)[0])
    bitmap = np.frombuffer(body[DEVICE_ID.itemsize :], dtype=np.uint8)
    # Viewed as bool, because np.flatnonzero took about a tenth as long on bool as on uint8
    # here (numpy 2.4).
    listed = np.unpackbits(bitmap, bitorder="little").view(bool)
    return first + np.flatnonzero(listed).astype(np.int64)


# ---- pulse shapes --------------------------------------------------------------------------


def pack_pulse_shapes(kinds: np.ndarray, widths_ns: np.ndarray) -> tuple[bytes, bytes]:
    """Return a batch's shape table and per-pulse shape indices as two payloads.

    The table contains each distinct (kind, width) pair once as a `PULSE_SHAPE` record, in order
    of first appearance. The index payload contains one table index per pulse. It is empty for
    one shape, and one bit per pulse for two (least significant bit first, the last byte padded
    with zeros). Larger tables take uint8 indices up to 256 shapes, uint16 up to 65,536 and
    uint32 beyond.
    """
    kinds = np.asarray(kinds, dtype=KINDS)
    # Widths are compared as bit patterns, so that every width, even -0.0 or a NaN, is
    # restored bit for bit (the driver rejects both before packing).
    width_bits = np.ascontiguousarray(widths_ns, dtype=np.float64).view(np.uint64)
    count = kinds.size
    if width_bits.size != count:
        raise BlockError(f"{width_bits.size} widths for {count} pulse kinds")
    if count == 0:
        return b"", b""
    if bool(np.all(kinds == kinds[0])) and bool(np.all(width_bits == width_bits[0])):
        return _shape_table(kinds[:1], width_bits[:1]), b""

    shape_index = np.empty(count, dtype=np.int64)
    table_kinds, table_width_bits = [], []
    unassigned = np.arange(count)
    for _ in range(_SHAPES_PEELED_MAX):
        if unassigned.size == 0:
            break
        first = unassigned[0]
        same = (kinds[unassigned] == kinds[first]) & (width_bits[unassigned] == width_bits[first])
        shape_index[unassigned[same]] = len(table_kinds)
        table_kinds.append(kinds[first])
        table_width_bits.append(width_bits[first])
        unassigned = unassigned[~same]
    if unassigned.size:
        pairs = np.empty(unassigned.size, dtype=[("kind", KINDS), ("width_bits", np.uint64)])
        pairs["kind"], pairs["width_bits"] = kinds[unassigned], width_bits[unassigned]
        rest, rest_index = np.unique(pairs, return_inverse=True)
        shape_index[unassigned] = len(table_kinds) + rest_index.reshape(-1)
        table_kinds.extend(rest["kind"])
        table_width_bits.extend(rest["width_bits"])

    table = _shape_table(np.array(table_kinds), np.array(table_width_bits, dtype=np.uint64))
    if len(table_kinds) == 2:
        return table, np.packbits(shape_index.astype(bool), bitorder="little").tobytes()
    return table, shape_index.astype(shape_index_dtype(len(table_kinds))).tobytes()


def unpack_pulse_shapes(
    table_payload: bytes | memoryview, index_payload: bytes | memoryview, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``count`` kinds (uint8) and widths in ns (float64) from a shape table and index."""
    if len(table_payload) % PULSE_SHAPE.itemsize:
        raise BlockError(
            f"shape table of {len(table_payload)} bytes is not a whole number of "
            f"{PULSE_SHAPE.itemsize}-byte records"
        )
    table = np.frombuffer(table_payload, dtype=PULSE_SHAPE)
    if count == 0:
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.float64)
    if table.size == 0:
        raise BlockError(f"empty shape table for {count} pulses")
    table_kinds = table["kind"].astype(np.uint8)
    table_widths = table["width_ns"].astype(np.float64)
    if table.size == 1:
        if len(index_payload):
            raise BlockError("a one-entry shape table takes an empty index block")
        return np.full(count, table_kinds[0]), np.full(count, table_widths[0])

    if table.size == 2:
        if len(index_payload) != (count + 7) // 8:
            raise BlockError(
                f"shape index bitmap of {len(index_payload)} bytes for {count} pulses; "
                f"expected {(count + 7) // 8}"
            )
        bits = np.frombuffer(index_payload, dtype=np.uint8)
        shape_index = np.unpackbits(bits, count=count, bitorder="little")
        return table_kinds[shape_index], table_widths[shape_index]

    index_dtype = shape_index_dtype(table.size)
    if len(index_payload) != count * index_dtype.itemsize:
        raise BlockError(
            f"shape index block of {len(index_payload)} bytes for {count} pulses and "
            f"{table.size} shapes; expected {count * index_dtype.itemsize}"
        )
    shape_index = np.frombuffer(index_payload, dtype=index_dtype)
    if int(shape_index.max()) >= table.size:
        raise BlockError(f"shape index {int(shape_index.max())} outside a table of {table.size}")
    return table_kinds[shape_index], table_widths[shape_index]


def shape_index_dtype(table_size: int) -> np.dtype:
    """Return the dtype of the per-pulse shape index for a table of more than 2 entries."""
    if table_size <= 1 << 8:
        return np.dtype("u1")
    if table_size <= 1 << 16:
        return np.dtype("<u2")
    return np.dtype("<u4")


def _shape_table(kinds: np.ndarray, width_bits: np.ndarray) -> bytes:
    table = np.empty(kinds.size, dtype=PULSE_SHAPE)
    table["kind"], table["width_ns"] = kinds, width_bits.view(np.float64)
    return table.tobytes()


# ---- read replies --------------------------------------------------------------------------


@dataclass(frozen=True)
class AdcScale:
    """A read ADC: codes 0 .. 2**bits - 1, code ``c`` meaning ``c * lsb_us`` µS in float64.

    A controller whose reads come from such an ADC can send the codes instead of float64
    conductances: one byte per read up to 8 bits, two up to 16. The receiver computes
    ``float64(code) * lsb_us``, the same product the controller formed, so the values stay
    bit-identical.
    """

    bits: int
    lsb_us: float

    def __post_init__(self) -> None:
        is_integer = isinstance(self.bits, int) and not isinstance(self.bits, bool)
        if not is_integer or not 1 <= self.bits <= 16:
            raise ValueError(f"ADC bits must be an integer in [1, 16], got {self.bits!r}")
        if not (math.isfinite(self.lsb_us) and self.lsb_us > 0):
            raise ValueError(f"ADC LSB must be a finite number of µS above 0, got {self.lsb_us!r}")

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype("u1") if self.bits <= 8 else np.dtype("<u2")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def encode(self, g_us: np.ndarray) -> bytes:
        """Return the codes of ``g_us``; raise `BlockError` if a value is not ``code * lsb_us``."""
        g_us = np.ascontiguousarray(g_us, dtype=np.float64)
        codes = np.rint(g_us / self.lsb_us)
        in_range = (codes >= 0) & (codes <= self.max_code)
        # Adding 0.0 turns -0.0 into 0.0. Comparing bit patterns below then rejects a read of
        # -0.0 or NaN, which no code reproduces.
        codes = np.where(in_range, codes, 0.0) + 0.0
        exact = in_range & ((codes * self.lsb_us).view(np.uint64) == g_us.view(np.uint64))
        if not exact.all():
            index = int(np.flatnonzero(~exact)[0])
            raise BlockError(
                f"read value {float(g_us[index])!r} µS (position {index}) is not an ADC code in "
                f"[0, {self.max_code}] times the LSB {self.lsb_us!r} µS"
            )
        return codes.astype(self.code_dtype).tobytes()

    def decode(self, payload: bytes | memoryview, count: int) -> np.ndarray:
        """Return ``count`` conductances in µS (float64) from a payload of codes."""
        if len(payload) != count * self.code_dtype.itemsize:
            raise BlockError(
                f"code block of {len(payload)} bytes for {count} reads; expected "
                f"{count * self.code_dtype.itemsize}"
            )
        codes = np.frombuffer(payload, dtype=self.code_dtype)
        if self.bits % 8 and codes.size and int(codes.max()) > self.max_code:
            raise BlockError(
                f"ADC code {int(codes.max())} above the {self.bits}-bit maximum {self.max_code}"
            )
        return codes.astype(np.float64) * self.lsb_us
