"""The chip-controller command set shared by the drivers and the emulator server.

docs/protocol.md describes each command with its exact bytes. This module defines the names,
error codes and field orders that both ends must agree on.
"""

from __future__ import annotations

from dataclasses import fields
from enum import IntEnum

from hwctl.backend import Limits

IDENTIFY = b"*IDN?"
RESET = b"*RST"
CLEAR_STATUS = b"*CLS"
OPERATION_COMPLETE = b"*OPC?"
ERROR_NEXT = b"SYST:ERR?"
ERROR_COUNT = b"SYST:ERR:COUN?"
SYNC = b"SYST:SYNC?"
CLOCK = b"CHIP:CLOC?"
CLOCK_MODE = b"CHIP:CLOC:MODE?"
GEOMETRY = b"CHIP:GEOM?"
LIMITS = b"CHIP:LIM?"
TEMPERATURE = b"CHIP:TEMP?"
SEQUENCE = b"CHIP:SEQ?"
PULSE = b"CHIP:PULS?"
READ = b"CHIP:READ?"
WAIT = b"CHIP:WAIT?"
ABORT = b"ABOR"
READ_FORMAT = b"CHIP:READ:FORM"
READ_FORMAT_QUERY = b"CHIP:READ:FORM?"
ADC_SCALE = b"CHIP:ADC?"

#: Commands that change the chip and so carry a batch sequence number.
SEQUENCED = (PULSE, READ, WAIT)

#: Start of the line a server sends to a second client before closing its connection.
BUSY_PREFIX = b"BUSY "

#: Clock modes reported by ``CHIP:CLOC:MODE?``. On a VIRT clock only this client's pulses, reads
#: and waits move the clock, so a driver may reuse the clock value each batch reply carries.
CLOCK_VIRTUAL = b"VIRT"
CLOCK_REAL = b"REAL"

#: Read reply formats set with ``CHIP:READ:FORM``. F64: one float64 conductance per read, the
#: format after power-up and ``*RST``. CODE: one ADC code per read (``CHIP:ADC?`` states the
#: scale), offered only by a controller whose reads are ADC codes times an LSB.
READ_FORMAT_FLOAT = b"F64"
READ_FORMAT_CODES = b"CODE"

#: `hwctl.backend.Limits` fields in the order ``CHIP:LIM?`` returns them.
LIMIT_FIELDS: tuple[str, ...] = tuple(field.name for field in fields(Limits))

#: Limits a client may set (only tighter than the controller's hardware limits), with headers.
#: ``g_max_us`` and ``read_voltage_v`` are properties of the chip and read-only.
SETTABLE_LIMITS: dict[str, bytes] = {
    "set_amplitude_min_v": b"CHIP:LIM:SET:AMPL:MIN",
    "set_amplitude_max_v": b"CHIP:LIM:SET:AMPL:MAX",
    "reset_amplitude_max_v": b"CHIP:LIM:RES:AMPL:MAX",
    "width_max_ns": b"CHIP:LIM:WIDT:MAX",
    "pulses_per_device_max": b"CHIP:LIM:PULS:MAX",
    "total_time_max_s": b"CHIP:LIM:TIME:MAX",
}

#: Integer-valued limit fields (the others are floats).
INTEGER_LIMITS = frozenset({"pulses_per_device_max"})


class ErrorCode(IntEnum):
    """SCPI error codes (negative: standard SCPI-99 numbers; positive: this controller's)."""

    NO_ERROR = 0
    COMMAND_ERROR = -100
    SYNTAX_ERROR = -102
    DATA_TYPE_ERROR = -104
    MISSING_PARAMETER = -109
    UNDEFINED_HEADER = -113
    INVALID_BLOCK_DATA = -161
    EXECUTION_ERROR = -200
    SETTINGS_CONFLICT = -221
    DATA_OUT_OF_RANGE = -222
    TOO_MUCH_DATA = -223
    ILLEGAL_PARAMETER_VALUE = -224
    DEVICE_SPECIFIC_ERROR = -300
    QUEUE_OVERFLOW = -350
    SEQUENCE_ERROR = 201
    CHECKSUM_ERROR = 202
    INJECTED_FAULT = 301


def format_limits(limits: Limits) -> bytes:
    """Return the ``CHIP:LIM?`` reply body for ``limits`` (floats round-trip exactly)."""
    values = []
    for name in LIMIT_FIELDS:
        value = getattr(limits, name)
        values.append(str(int(value)) if name in INTEGER_LIMITS else repr(float(value)))
    return ",".join(values).encode("ascii")


def parse_limits(body: bytes) -> Limits:
    """Parse a ``CHIP:LIM?`` reply body into `Limits`."""
    parts = body.decode("ascii").strip().split(",")
    if len(parts) != len(LIMIT_FIELDS):
        raise ValueError(
            f"CHIP:LIM? returned {len(parts)} values, expected {len(LIMIT_FIELDS)} "
            f"({', '.join(LIMIT_FIELDS)})"
        )
    values = {
        name: int(text) if name in INTEGER_LIMITS else float(text)
        for name, text in zip(LIMIT_FIELDS, parts)
    }
    return Limits(**values)
