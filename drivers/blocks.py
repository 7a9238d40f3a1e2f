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

#: One pulse request: 25 bytes, packed, little-endian.
PULSE_RECORD = np.dtype(
    [("device", "<i8"), ("kind", "u1"), ("amplitude_v", "<f8"), ("width_ns", "<f8")]
)
#: Device index vectors (read requests).
DEVICE_IDS = np.dtype("<i8")
#: Conductance vectors (read replies), µS. float64 so that values cross the wire bit for bit.
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


def pack_pulses(
    device_ids: np.ndarray, kinds: np.ndarray, amplitudes_v: np.ndarray, widths_ns: np.ndarray
) -> bytes:
    """Pack one pulse per device into `PULSE_RECORD` records."""
    count = len(device_ids)
    for name, values in (("kinds", kinds), ("amplitudes_v", amplitudes_v), ("widths_ns", widths_ns)):
        if len(values) != count:
            raise ValueError(
                f"{name} has {len(values)} entries but device_ids has {count}; "
                "give one value per device"
            )
    records = np.empty(count, dtype=PULSE_RECORD)
    records["device"] = device_ids
    records["kind"] = kinds
    records["amplitude_v"] = amplitudes_v
    records["width_ns"] = widths_ns
    return records.tobytes()


def unpack_pulses(payload: bytes | memoryview) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unpack `PULSE_RECORD` records into contiguous native arrays.

    Returns ``(device_ids int64, kinds uint8, amplitudes_v float64, widths_ns float64)``.
    """
    if len(payload) % PULSE_RECORD.itemsize:
        raise BlockError(
            f"pulse block of {len(payload)} bytes is not a whole number of "
            f"{PULSE_RECORD.itemsize}-byte records"
        )
    records = np.frombuffer(payload, dtype=PULSE_RECORD)
    return (
        records["device"].astype(np.int64),
        records["kind"].astype(np.uint8),
        records["amplitude_v"].astype(np.float64),
        records["width_ns"].astype(np.float64),
    )


def pack_vector(values: np.ndarray, dtype: np.dtype) -> bytes:
    """Return ``values`` as little-endian bytes of ``dtype``."""
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def unpack_vector(payload: bytes | memoryview, dtype: np.dtype) -> np.ndarray:
    """Return a native-order copy of the ``dtype`` vector in ``payload``."""
    if len(payload) % dtype.itemsize:
        raise BlockError(
            f"block of {len(payload)} bytes is not a whole number of {dtype.itemsize}-byte values"
        )
    return np.frombuffer(payload, dtype=dtype).astype(dtype.newbyteorder("="))
