"""SCPI message framing: read one message from a byte stream and split it into fields.

A message is ASCII text ending in a line feed (0x0A). It may carry IEEE 488.2 definite-length
blocks, whose payloads may contain 0x0A. So `read_message` reads text up to a line feed, and at
each block header it reads exactly the payload length that the header states before it looks
for the next line feed. The same framing is used in both
directions, by the drivers and by the emulator server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from drivers.blocks import BlockError, parse_block_header

LF = b"\n"

#: Maximum length of the text part (everything outside blocks) of one message, in bytes.
MAX_TEXT_BYTES = 4096


class FramingError(ValueError):
    """A message does not follow the framing rules (bad block header, text too long)."""


@dataclass(frozen=True)
class Block:
    """The payload of one definite-length block inside a parsed message."""

    payload: memoryview


def read_message(
    read_line: Callable[[], bytes],
    read_exact: Callable[[int], bytes],
    max_block_bytes: int,
) -> bytes:
    """Read one complete message, blocks included, through its final line feed.

    ``read_line`` returns bytes through the next 0x0A (it may stop at a 0x0A inside a block
    payload; this function then reads the rest with ``read_exact``). A block longer than
    ``max_block_bytes`` raises `FramingError` before its payload is read, so a corrupted length
    field cannot make the reader wait for gigabytes.
    """
    message = bytearray(read_line())
    scan_from = 0
    text_bytes = 0

    # Each pass consumes one quoted string or one block, or returns: at most MAX_TEXT_BYTES.
    for _ in range(MAX_TEXT_BYTES):
        special_at, special = _next_special(message, scan_from)
        if special is None:
            raise FramingError("read_line returned text without a line feed")
        text_bytes += special_at - scan_from
        if text_bytes > MAX_TEXT_BYTES:
            raise FramingError(f"message text longer than {MAX_TEXT_BYTES} bytes")

        if special == LF:
            if special_at != len(message) - 1:
                raise FramingError("bytes follow the line feed that ends the message")
            return bytes(message)

        if special == b'"':
            scan_from = _closing_quote(memoryview(message), special_at) + 1
            continue

        # A block header: its digits contain no 0x0A, so read_line returned all of them.
        try:
            payload_start, payload_length = parse_block_header(message, special_at)
        except BlockError as error:
            raise FramingError(str(error)) from error
        if payload_length > max_block_bytes:
            raise FramingError(
                f"block of {payload_length} bytes exceeds the limit of {max_block_bytes} bytes"
            )
        payload_end = payload_start + payload_length
        if payload_end > len(message):
            message += read_exact(payload_end - len(message))
        scan_from = payload_end
        if scan_from == len(message):
            message += read_line()

    raise FramingError(f"message has more than {MAX_TEXT_BYTES} blocks")


def _next_special(message: bytearray, start: int) -> tuple[int, bytes | None]:
    """Return the position and value of the first line feed, '#' or '"' at or after ``start``."""
    found = [(message.find(token, start), token) for token in (LF, b"#", b'"')]
    found = [(position, token) for position, token in found if position != -1]
    if not found:
        return -1, None
    return min(found)


def split_fields(body: bytes | memoryview) -> list[bytes | Block]:
    """Split a message body (no header, no final line feed) into comma-separated fields.

    A field is a `Block` if it starts with ``#``, a quoted string (quotes kept, ``""`` inside
    meaning one quote) if it starts with ``"``, and plain text otherwise.
    """
    view = memoryview(body)
    fields: list[bytes | Block] = []
    position = 0
    if len(view) == 0:
        return fields

    while True:
        if position < len(view) and view[position] == ord("#"):
            try:
                payload_start, payload_length = parse_block_header(view, position)
            except BlockError as error:
                raise FramingError(str(error)) from error
            end = payload_start + payload_length
            if end > len(view):
                raise FramingError("block payload runs past the end of the message")
            fields.append(Block(view[payload_start:end]))
        elif position < len(view) and view[position] == ord('"'):
            end = _closing_quote(view, position) + 1
            fields.append(bytes(view[position:end]))
        else:
            # Text fields are short, so search a bounded window instead of copying a block.
            comma = bytes(view[position : position + MAX_TEXT_BYTES]).find(b",")
            end = len(view) if comma == -1 else position + comma
            fields.append(bytes(view[position:end]).strip())

        if end == len(view):
            return fields
        if view[end] != ord(","):
            raise FramingError(f"expected ',' after field at byte {end}")
        position = end + 1


def _closing_quote(view: memoryview, opening: int) -> int:
    position = opening + 1
    while position < len(view):
        if view[position] == ord('"'):
            if position + 1 < len(view) and view[position + 1] == ord('"'):
                position += 2
                continue
            return position
        position += 1
    raise FramingError("quoted string is not closed")


def quote(text: str) -> bytes:
    """Return ``text`` as an SCPI quoted string on one line (non-ASCII characters become '?')."""
    one_line = text.replace("\r", " ").replace("\n", " ").replace('"', '""')
    return b'"' + one_line.encode("ascii", errors="replace") + b'"'


def unquote(field: bytes) -> str:
    """Return the text of an SCPI quoted string field."""
    if len(field) < 2 or not field.startswith(b'"') or not field.endswith(b'"'):
        raise FramingError(f"expected a quoted string, got {field[:40]!r}")
    return field[1:-1].decode("ascii", errors="replace").replace('""', '"')


def format_float(value: float) -> bytes:
    """Return ``value`` as text that parses back to the same float64."""
    return repr(float(value)).encode("ascii")
