"""IEEE 488.2 definite-length arbitrary blocks and the binary record layouts of the chip protocol.

A block is ``#`` followed by one digit ``n`` (1 to 9), then ``n`` decimal digits giving the
payload length in bytes, then the payload. The payload may contain any byte, 0x0A included, so a
reader must take the length from the header and never split a message at a line feed inside a
block. The indefinite form ``#0`` is not used by this protocol and is rejected.

Every vector travels little-endian. The layouts are fixed here and documented in
docs/protocol.md; the server and the drivers both use these dtypes.
"""

from __future__ import annotations

import numpy as np

#: Device indices. Four bytes, so one controller addresses at most 2**32 devices.
DEVICE_IDS = np.dtype("<u4")
MAX_DEVICES = 2**32
#: Pulse kinds (`hwctl.backend.PulseKind` values).
KINDS = np.dtype("u1")
#: Pulse amplitudes in V and widths in ns.
AMPLITUDES_V = np.dtype("<f8")
WIDTHS_NS = np.dtype("<f8")
#: Conductances in µS. float64, so that values cross the wire bit for bit.
CONDUCTANCES_US = np.dtype("<f8")

#: The largest payload a nine-digit length field can state.
MAX_BLOCK_BYTES = 999_999_999


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


def pack_column(values: np.ndarray, dtype: np.dtype) -> bytes:
    """Return ``values`` as little-endian ``dtype`` bytes, or one value if all are equal.

    A pulse batch usually has one width, so a constant column travels as a single value that
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


def pack_device_ids(device_ids: np.ndarray) -> bytes:
    """Return device indices as `DEVICE_IDS` bytes (never collapsed; ids are unique)."""
    device_ids = np.asarray(device_ids)
    if device_ids.size and (device_ids.min() < 0 or device_ids.max() >= MAX_DEVICES):
        raise BlockError(f"device ids must lie in [0, {MAX_DEVICES}) to travel as uint32")
    return np.ascontiguousarray(device_ids, dtype=DEVICE_IDS).tobytes()


def unpack_device_ids(payload: bytes | memoryview) -> np.ndarray:
    """Return the device indices in ``payload`` as int64."""
    if len(payload) % DEVICE_IDS.itemsize:
        raise BlockError(f"device id block of {len(payload)} bytes is not a multiple of 4")
    return np.frombuffer(payload, dtype=DEVICE_IDS).astype(np.int64)
