"""The chip-controller driver: the `hwctl.backend.Backend` interface over a VISA or serial link.

Each apply and read is one sequenced batch and one round trip, and a wait travels with the next
batch. A request carries the driver's client id, a sequence number and a CRC-32 of its blocks.
A retried batch is never applied twice, because the controller returns its stored reply
instead. The reply repeats the sequence number, so a reply to another batch is never taken for
this one. Where the controller offers it, reads arrive as ADC codes, which the driver
multiplies by the LSB the controller states. That gives the controller's float64 values bit for
bit in an eighth of the bytes.

When an exchange times out, the link drops or a reply is malformed, the driver closes its own
session, waits (exponential backoff), reopens it, resynchronises the byte stream, checks that
the identity and geometry are unchanged, replays the limit settings it made, reads the limits
back, and resumes at the batch that was in flight. Every retry loop is bounded by `RetryPolicy`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from drivers import blocks
from drivers import command_set as cs
from drivers.command_set import ErrorCode
from drivers.errors import (
    ConnectionLost,
    InstrumentBusy,
    InstrumentError,
    ProtocolError,
    RecoveryFailed,
    TransportTimeout,
)
from drivers.limits import check_limits, validate_device_ids, validate_pulses
from drivers.scpi import Block, FramingError, read_message, split_fields, unquote
from drivers.transports import Transport
from hwctl.backend import Backend, Geometry, Identity, LimitError, Limits

logger = logging.getLogger(__name__)

#: Errors after which the session is reopened and the exchange retried.
TRANSIENT_ERRORS = (TransportTimeout, ConnectionLost, ProtocolError)

#: Maximum number of entries the driver pops from the controller's error queue in one go.
ERROR_QUEUE_MAX = 64

#: Maximum number of lines discarded while resynchronising before the driver gives up.
SYNC_MAX_LINES = 1_000_000

_Parsed = TypeVar("_Parsed")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds on retries and reconnects.

    ``attempts`` counts tries of one exchange, the first included. ``reconnects`` counts session
    reopenings per recovery. The wait before each reopening starts at ``backoff_s`` and doubles
    up to ``backoff_max_s``.
    """

    attempts: int = 3
    reconnects: int = 5
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.reconnects < 1:
            raise ValueError(
                f"attempts ({self.attempts}) and reconnects ({self.reconnects}) must be >= 1"
            )
        if not 0 <= self.backoff_s <= self.backoff_max_s:
            raise ValueError(
                f"need 0 <= backoff_s ({self.backoff_s}) <= backoff_max_s ({self.backoff_max_s})"
            )


@dataclass
class WireStats:
    """Traffic counters of one driver: round trips and bytes each way, retries, reconnects."""

    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    retries: int = 0
    reconnects: int = 0


@dataclass(frozen=True)
class _Ack:
    code: int
    clock_s: float
    errors_queued: int
    values: np.ndarray | None


class ChipController(Backend):
    """A PCM chip controller reached over a `Transport` that speaks docs/protocol.md.

    ``expected_limits`` maps `Limits` field names to configured values; the controller's limits
    are read back and compared (`drivers.limits.check_limits`) on every connect, before any
    pulse. ``limit_settings`` are limits the driver sets on the controller, only tighter than
    its hardware limits. They are verified the same way and replayed after every reconnect.
    With ``adc_codes`` true (the default) the driver requests reads as ADC codes on every
    connect, and keeps the float64 read format where the controller rejects that.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        expected_limits: Mapping[str, float | int] | None = None,
        limit_settings: Mapping[str, float | int] | None = None,
        retry: RetryPolicy | None = None,
        client_id: int | None = None,
        adc_codes: bool = True,
    ) -> None:
        self._transport = transport
        self._client_id = secrets.randbits(48) + 1 if client_id is None else int(client_id)
        if not 0 < self._client_id < 2**63:
            raise ValueError(f"client_id must be in [1, 2**63), got {client_id!r}")
        self._retry = retry or RetryPolicy()
        self._limit_settings = _validated_settings(limit_settings or {})
        self._expected_limits = _merged_expectations(expected_limits or {}, self._limit_settings)
        self._request_adc_codes = bool(adc_codes)
        self.stats = WireStats()

        self._identity: Identity | None = None
        self._geometry: Geometry | None = None
        self._limits: Limits | None = None
        self._adc: blocks.AdcScale | None = None
        self._clock_virtual = False
        self._clock_cache_s: float | None = None
        self._next_seq = 1
        self._first_seq = 1
        self._in_flight_seq: int | None = None
        self._pending_errors: list[tuple[int, str, int]] = []
        self._deferred_wait_s: float | None = None
        self._broken = True
        self._closed = False
        self._nonces = itertools.count(1)

        self._reconnect(first=True)

    # ---- Backend interface -------------------------------------------------------------

    def identity(self) -> Identity:
        assert self._identity is not None
        return self._identity

    def geometry(self) -> Geometry:
        assert self._geometry is not None
        return self._geometry

    def limits(self) -> Limits:
        """Return the limits the controller reported at the last connect."""
        assert self._limits is not None
        return self._limits

    def clock_s(self) -> float:
        """Return the chip clock in seconds.

        On a virtual clock (the emulator) only this driver's batches move it, so the value from
        the last batch reply is returned without a round trip.
        """
        self._send_deferred_wait()
        if self._clock_virtual and self._clock_cache_s is not None:
            return self._clock_cache_s
        return self._query(cs.CLOCK, _parse_float)

    def temperature_c(self) -> float:
        self._send_deferred_wait()
        return self._query(cs.TEMPERATURE, _parse_float)

    def apply_pulses(
        self,
        device_ids: np.ndarray,
        kinds: np.ndarray,
        amplitudes_v: np.ndarray,
        widths_ns: np.ndarray,
    ) -> None:
        self._raise_pending_errors()
        validate_pulses(
            self.limits(), self.geometry().devices, device_ids, kinds, amplitudes_v, widths_ns
        )
        if len(device_ids) == 0:
            return
        shapes, shape_index = blocks.pack_pulse_shapes(kinds, widths_ns)
        columns = (
            blocks.pack_device_ids(device_ids),
            shapes,
            shape_index,
            blocks.pack_column(amplitudes_v, blocks.AMPLITUDES_V),
        )
        arguments = _crc_field(columns) + b"," + b",".join(map(blocks.encode_block, columns))
        self._batch(cs.PULSE, arguments, reply_values=0, carries_wait=True)

    def read(self, device_ids: np.ndarray) -> np.ndarray:
        self._raise_pending_errors()
        validate_device_ids(self.geometry().devices, device_ids, require_unique=False)
        if len(device_ids) == 0:
            return np.empty(0, dtype=np.float64)
        payload = blocks.pack_device_ids(device_ids)
        arguments = _crc_field((payload,)) + b"," + blocks.encode_block(payload)
        ack = self._batch(cs.READ, arguments, reply_values=len(device_ids), carries_wait=True)
        assert ack.values is not None
        return ack.values

    @property
    def adc_scale(self) -> blocks.AdcScale | None:
        """The ADC scale reads arrive in, or None where they arrive as float64 values."""
        return self._adc

    def wait_s(self, duration_s: float) -> None:
        """Let ``duration_s`` pass on the chip clock.

        The wait travels with the next pulse or read batch, which the controller executes after
        waiting, so it costs no round trip of its own. A clock or temperature query, a second
        wait, or `close` sends it alone first.
        """
        self._raise_pending_errors()
        if not (math.isfinite(duration_s) and duration_s >= 0):
            raise ValueError(f"wait duration {duration_s!r} s must be finite and >= 0")
        self._send_deferred_wait()
        self._deferred_wait_s = float(duration_s)

    def close(self) -> None:
        """Send a deferred wait, then close the session; the controller keeps its state."""
        if self._closed:
            return
        try:
            self._send_deferred_wait()
        except (RecoveryFailed, InstrumentError) as error:
            logger.error("could not send the last wait before closing: %s", error)
        self._closed = True
        self._transport.close()

    # ---- extra controller commands -----------------------------------------------------

    def abort(self) -> None:
        """Send ABOR: the controller stops the batch in progress (see docs/protocol.md)."""
        self._transport.write(cs.ABORT + b"\n")

    def controller_errors(self) -> list[tuple[int, str]]:
        """Pop and return every entry of the controller's error queue."""
        return self._drain_errors()

    @property
    def next_sequence(self) -> int:
        """Sequence number the next batch will carry."""
        return self._next_seq

    @property
    def clock_is_virtual(self) -> bool:
        """True when the controller reports a virtual clock (``CHIP:CLOC:MODE?`` returns VIRT)."""
        return self._clock_virtual

    # ---- batches -----------------------------------------------------------------------

    def _send_deferred_wait(self) -> None:
        if self._deferred_wait_s is None:
            return
        self._batch(cs.WAIT, repr(self._deferred_wait_s).encode("ascii"), reply_values=0)
        self._deferred_wait_s = None

    def _batch(
        self, header: bytes, arguments: bytes, reply_values: int, carries_wait: bool = False
    ) -> _Ack:
        seq = self._next_seq
        message = header + b" %d,%d," % (self._client_id, seq)
        if carries_wait:
            message += repr(self._deferred_wait_s or 0.0).encode("ascii") + b","
        message += arguments
        self._in_flight_seq = seq
        ack = self._exchange_batch(message, seq, reply_values)
        self._in_flight_seq = None

        if ack.code == ErrorCode.SEQUENCE_ERROR:
            messages = self._drain_errors()
            raise InstrumentError(
                ack.code,
                f"controller rejected batch {seq} as out of sequence ({_describe(messages)}); "
                "another client may have used the controller; reconnect and resume the run",
            )
        self._next_seq = seq + 1
        self._clock_cache_s = ack.clock_s
        if carries_wait:
            # The controller waited before executing, even if the batch itself was rejected.
            self._deferred_wait_s = None

        if ack.code != ErrorCode.NO_ERROR or ack.errors_queued:
            self._collect_errors(ack, seq)
        return ack

    def _exchange_batch(self, message: bytes, seq: int, reply_values: int) -> _Ack:
        def exchange() -> _Ack:
            # Bound a reply block by the larger format, so a format mix-up is reported as a
            # wrong length, not as an oversized block.
            body = self._round_trip(
                message, max_block_bytes=reply_values * blocks.CONDUCTANCES_US.itemsize
            )
            ack = _parse_ack(body, seq, reply_values, self._decode_reads)
            if ack.code == ErrorCode.CHECKSUM_ERROR:
                # The request was corrupted on the way in and not applied: send it again.
                raise ProtocolError(
                    f"controller reported a CRC mismatch for batch {seq} "
                    f"({_describe(self._drain_errors())})"
                )
            return ack

        return self._retrying(
            f"batch {seq}",
            exchange,
            " No later batch was sent; resume the run once the link works.",
        )

    def _decode_reads(self, payload: memoryview, count: int) -> np.ndarray:
        if self._adc is not None:
            return self._adc.decode(payload, count)
        if len(payload) != count * blocks.CONDUCTANCES_US.itemsize:
            raise blocks.BlockError(
                f"{len(payload)} bytes of float64 reads for {count} devices; expected "
                f"{count * blocks.CONDUCTANCES_US.itemsize}"
            )
        return blocks.unpack_column(payload, blocks.CONDUCTANCES_US, count)

    def _collect_errors(self, ack: _Ack, seq: int) -> None:
        entries = self._drain_errors()
        own = next((entry for entry in entries if entry[0] == ack.code), None)
        others = [entry for entry in entries if entry is not own]
        for code, text in others:
            logger.error("controller reported error %d after batch %d: %s", code, seq, text)
            self._pending_errors.append((code, text, seq))
        if ack.code == ErrorCode.NO_ERROR:
            return
        text = own[1] if own else "no message in the error queue"
        if ack.code == ErrorCode.DATA_OUT_OF_RANGE:
            raise LimitError(f"controller rejected batch {seq}: {text}")
        raise InstrumentError(ack.code, f"controller rejected batch {seq}: {text}")

    def _raise_pending_errors(self) -> None:
        if not self._pending_errors:
            return
        errors, self._pending_errors = self._pending_errors, []
        code, _text, seq = errors[0]
        details = "; ".join(f"{c} {t!r} after batch {s}" for c, t, s in errors)
        raise InstrumentError(
            code,
            f"controller reported {len(errors)} error(s): {details}. Batches up to {seq} "
            "completed and their results are valid; no further batch was sent. Check the "
            "controller, then resume the run",
        )

    # ---- queries -----------------------------------------------------------------------

    def _query(self, message: bytes, parse: Callable[[bytes], _Parsed]) -> _Parsed:
        return self._retrying(
            message.decode("ascii"),
            lambda: _parse_reply(message, self._round_trip(message), parse),
        )

    def _retrying(self, what: str, exchange: Callable[[], _Parsed], hint: str = "") -> _Parsed:
        """Run ``exchange``, reopening the session after each transient failure (bounded)."""
        last_error: Exception | None = None
        for attempt in range(self._retry.attempts):
            if attempt:
                self.stats.retries += 1
            try:
                self._ensure_session()
                return exchange()
            except TRANSIENT_ERRORS as error:
                last_error = error
                self._session_broken(error, what)
        raise RecoveryFailed(
            f"{what} to {self._transport.address} failed after {self._retry.attempts} "
            f"attempts; last error: {last_error}.{hint}"
        )

    def _drain_errors(self) -> list[tuple[int, str]]:
        entries = []
        for _ in range(ERROR_QUEUE_MAX):
            code, text = self._query(cs.ERROR_NEXT, _parse_error_entry)
            if code == ErrorCode.NO_ERROR:
                break
            entries.append((code, text))
        return entries

    def _round_trip(self, message: bytes, max_block_bytes: int = 0) -> bytes:
        transport = self._transport
        transport.write(message + b"\n")
        try:
            reply = read_message(transport.read_line, transport.read_exact, max_block_bytes)
        except FramingError as error:
            raise ProtocolError(f"malformed reply to {message[:20]!r}: {error}") from error
        self.stats.round_trips += 1
        self.stats.bytes_sent += len(message) + 1
        self.stats.bytes_received += len(reply)
        if reply.startswith(cs.BUSY_PREFIX):
            raise InstrumentBusy(ErrorCode.DEVICE_SPECIFIC_ERROR, reply.decode("ascii", "replace").strip())
        return reply[:-1]

    # ---- session recovery --------------------------------------------------------------

    def _ensure_session(self) -> None:
        if self._closed:
            raise ConnectionLost(f"driver for {self._transport.address} is closed")
        if self._broken:
            self._reconnect(first=False)

    def _session_broken(self, error: Exception, what: str) -> None:
        logger.warning(
            "%s on %s failed: %s; reopening the session", what, self._transport.address, error
        )
        self._broken = True
        self._clock_cache_s = None
        self._transport.close()

    def _reconnect(self, first: bool) -> None:
        delay_s = self._retry.backoff_s
        last_error: Exception | None = None
        for attempt in range(self._retry.reconnects):
            if attempt or not first:
                time.sleep(delay_s)
                delay_s = min(2 * delay_s, self._retry.backoff_max_s)
            try:
                self._transport.open()
                self._handshake(first)
            except (*TRANSIENT_ERRORS, InstrumentBusy) as error:
                last_error = error
                logger.warning(
                    "connecting to %s failed (attempt %d of %d): %s",
                    self._transport.address,
                    attempt + 1,
                    self._retry.reconnects,
                    error,
                )
                self._transport.close()
                continue
            except BaseException:
                self._transport.close()
                raise
            self._broken = False
            if not first:
                self.stats.reconnects += 1
                logger.info(
                    "reconnected to %s; next batch %d", self._transport.address, self._next_seq
                )
            return
        raise RecoveryFailed(
            f"could not connect to {self._transport.address} after {self._retry.reconnects} "
            f"attempts; last error: {last_error}"
        )

    def _handshake(self, first: bool) -> None:
        self._resynchronise()

        identity = _parse_reply(cs.IDENTIFY, self._round_trip(cs.IDENTIFY), _parse_identity)
        geometry = _parse_reply(cs.GEOMETRY, self._round_trip(cs.GEOMETRY), _parse_geometry)
        if first:
            self._identity, self._geometry = identity, geometry
            logger.info("connected to %s: %s", self._transport.address, identity.as_idn())
        elif (identity, geometry) != (self._identity, self._geometry):
            raise InstrumentError(
                ErrorCode.DEVICE_SPECIFIC_ERROR,
                f"after reconnecting, {self._transport.address} reports {identity.as_idn()} "
                f"with {geometry}, but the session started on {self.identity().as_idn()} with "
                f"{self.geometry()}; refusing to continue on a different chip",
            )
        mode = self._round_trip(cs.CLOCK_MODE).strip()
        self._clock_virtual = mode == cs.CLOCK_VIRTUAL

        queued = self._drain_errors_raw()
        if queued and first:
            logger.warning("controller error queue held %s before this session", _describe(queued))
        elif queued:
            # Raised after the batch in flight completes, like any error the controller queues.
            logger.error("controller reported %s while the link was down", _describe(queued))
            self._pending_errors += [(code, text, self._next_seq - 1) for code, text in queued]
        if self._limit_settings:
            for name, value in self._limit_settings.items():
                header = cs.SETTABLE_LIMITS[name]
                self._transport.write(header + b" " + _format_limit(name, value) + b"\n")
            errors = self._drain_errors_raw()
            if errors:
                raise LimitError(
                    f"controller rejected the limit settings {dict(self._limit_settings)}: "
                    f"{_describe(errors)}"
                )
        limits = _parse_reply(cs.LIMITS, self._round_trip(cs.LIMITS), cs.parse_limits)
        check_limits(self._expected_limits, limits)
        self._limits = limits
        self._negotiate_read_format(first)

        last_client, last_seq = _parse_reply(cs.SEQUENCE, self._round_trip(cs.SEQUENCE), _parse_integers)
        self._check_sequence(last_client, last_seq, first)
        self._clock_cache_s = None

    def _negotiate_read_format(self, first: bool) -> None:
        """Select ADC-code reads where the controller offers them, else float64 reads.

        The format is set on every connect, because a controller keeps the one an earlier
        session chose. A controller whose reads are not ADC codes rejects CODE, and one that
        does not know ``CHIP:READ:FORM`` rejects the header. Either queues an error and keeps
        F64, the format every controller starts in.
        """
        requested = cs.READ_FORMAT_CODES if self._request_adc_codes else cs.READ_FORMAT_FLOAT
        self._transport.write(cs.READ_FORMAT + b" " + requested + b"\n")
        declined = self._drain_errors_raw()
        adc = None
        if requested == cs.READ_FORMAT_CODES and not declined:
            adc = _parse_reply(cs.ADC_SCALE, self._round_trip(cs.ADC_SCALE), _parse_adc_scale)
        elif declined and first:
            logger.info("%s keeps float64 reads: %s", self._transport.address, _describe(declined))
        if not first and adc != self._adc:
            raise InstrumentError(
                ErrorCode.DEVICE_SPECIFIC_ERROR,
                f"after reconnecting, {self._transport.address} sends reads as "
                f"{_describe_format(adc)} but the session started with "
                f"{_describe_format(self._adc)}; refusing to continue on a changed controller",
            )
        if first:
            logger.info(
                "reads from %s arrive as %s", self._transport.address, _describe_format(adc)
            )
        self._adc = adc

    def _check_sequence(self, last_client: int, last_seq: int, first: bool) -> None:
        if first:
            self._next_seq = self._first_seq = last_seq + 1
            return
        allowed = {self._next_seq - 1}
        if self._in_flight_seq is not None:
            allowed.add(self._in_flight_seq)
        # Before this driver's first batch, the last one on record belongs to an earlier session.
        before_first_batch = last_seq == self._next_seq - 1 == self._first_seq - 1
        ours = last_client == self._client_id or before_first_batch
        if last_seq not in allowed or not ours:
            raise InstrumentError(
                ErrorCode.SEQUENCE_ERROR,
                f"after reconnecting, the controller's last batch is {last_seq} from client "
                f"{last_client} but this driver (client {self._client_id}) expected "
                f"{sorted(allowed)}; another client changed the chip, so the session cannot "
                "resume safely",
            )
        if self._in_flight_seq is not None:
            applied = last_seq == self._in_flight_seq
            logger.info(
                "batch %d was %s before the link failed; %s",
                self._in_flight_seq,
                "applied" if applied else "not applied",
                "fetching its stored reply" if applied else "sending it again",
            )

    def _drain_errors_raw(self) -> list[tuple[int, str]]:
        entries = []
        for _ in range(ERROR_QUEUE_MAX):
            entry = _parse_reply(cs.ERROR_NEXT, self._round_trip(cs.ERROR_NEXT), _parse_error_entry)
            if entry[0] == ErrorCode.NO_ERROR:
                break
            entries.append(entry)
        return entries

    def _resynchronise(self) -> None:
        """Discard stale bytes until the controller echoes a fresh nonce."""
        transport = self._transport
        nonce = f"{os.getpid()}-{next(self._nonces)}".encode("ascii")
        transport.write(cs.SYNC + b" " + nonce + b"\n")
        deadline = time.monotonic() + transport.timeout_s
        discarded = 0
        for _ in range(SYNC_MAX_LINES):
            line = transport.read_line()
            if line.startswith(cs.BUSY_PREFIX):
                raise InstrumentBusy(
                    ErrorCode.DEVICE_SPECIFIC_ERROR, line.decode("ascii", "replace").strip()
                )
            if line.rstrip(b"\r\n") == nonce:
                break
            discarded += len(line)
            if time.monotonic() > deadline:
                raise TransportTimeout(f"{transport.address}: no echo of nonce {nonce!r}")
        else:
            raise ProtocolError(f"{transport.address}: no echo of nonce {nonce!r}")
        if discarded:
            logger.warning("discarded %d stale bytes from %s", discarded, transport.address)


# ---- reply parsing -----------------------------------------------------------------------


def _parse_reply(message: bytes, body: bytes, parse: Callable[[bytes], _Parsed]) -> _Parsed:
    try:
        return parse(body)
    except (ValueError, FramingError) as error:
        raise ProtocolError(
            f"invalid reply {body[:60]!r} to {message[:20].decode('ascii', 'replace')}: {error}"
        ) from error


def _parse_ack(
    body: bytes,
    seq: int,
    reply_values: int,
    decode: Callable[[memoryview, int], np.ndarray],
) -> _Ack:
    """Parse ``seq,code,clock_s,errors_queued[,crc,block]`` and check it belongs to ``seq``.

    ``decode`` turns the block payload of a read reply into ``reply_values`` conductances.
    """
    try:
        fields = split_fields(body)
        if len(fields) < 4 or any(isinstance(field, Block) for field in fields[:4]):
            raise ValueError(f"expected at least 4 text fields, got {len(fields)}")
        reply_seq, code = int(fields[0]), int(fields[1])
        clock_s, errors_queued = float(fields[2]), int(fields[3])
    except (ValueError, FramingError) as error:
        raise ProtocolError(f"invalid batch reply {body[:60]!r}: {error}") from error
    if reply_seq != seq:
        raise ProtocolError(f"received the reply to batch {reply_seq} while waiting for batch {seq}")

    values = None
    if reply_values and code == ErrorCode.NO_ERROR:
        if len(fields) != 6 or not isinstance(fields[5], Block):
            raise ProtocolError(f"reply to batch {seq} lacks its CRC and data block")
        payload = fields[5].payload
        try:
            stated_crc = int(fields[4])
        except (TypeError, ValueError):
            raise ProtocolError(f"invalid CRC field in the reply to batch {seq}") from None
        if zlib.crc32(payload) != stated_crc:
            raise ProtocolError(f"CRC mismatch in the reply to batch {seq}")
        try:
            values = decode(payload, reply_values)
        except blocks.BlockError as error:
            raise ProtocolError(
                f"invalid read values in the reply to batch {seq}: {error}"
            ) from error
    elif len(fields) != 4:
        raise ProtocolError(f"reply to batch {seq} has {len(fields)} fields, expected 4")
    return _Ack(code, clock_s, errors_queued, values)


def _parse_identity(body: bytes) -> Identity:
    parts = [part.strip() for part in body.decode("ascii").split(",")]
    if len(parts) != 4:
        raise ValueError(f"*IDN? reply needs 4 comma-separated fields, got {len(parts)}")
    return Identity(*parts)


def _parse_geometry(body: bytes) -> Geometry:
    arrays, rows, cols = (int(part) for part in body.decode("ascii").split(","))
    return Geometry(arrays, rows, cols)


def _parse_adc_scale(body: bytes) -> blocks.AdcScale:
    bits, lsb_us = body.decode("ascii").split(",")
    return blocks.AdcScale(int(bits), float(lsb_us))


def _parse_error_entry(body: bytes) -> tuple[int, str]:
    fields = split_fields(body)
    if len(fields) != 2 or isinstance(fields[0], Block) or isinstance(fields[1], Block):
        raise ValueError("SYST:ERR? reply must be <code>,\"<message>\"")
    return int(fields[0]), unquote(fields[1])


def _parse_integers(body: bytes) -> tuple[int, ...]:
    return tuple(int(part) for part in body.decode("ascii").split(","))


def _parse_float(body: bytes) -> float:
    return float(body.decode("ascii"))


def _crc_field(payloads: tuple[bytes, ...]) -> bytes:
    """Return the CRC-32 of the payloads in order, as the decimal text a request carries."""
    crc = 0
    for payload in payloads:
        crc = zlib.crc32(payload, crc)
    return str(crc).encode("ascii")


def _describe(entries: list[tuple[int, str]]) -> str:
    return "; ".join(f"{code} {text!r}" for code, text in entries) or "error queue empty"


def _describe_format(adc: blocks.AdcScale | None) -> str:
    if adc is None:
        return "float64 values"
    return f"{adc.bits}-bit ADC codes of {adc.lsb_us!r} µS"


def _format_limit(name: str, value: float | int) -> bytes:
    text = str(int(value)) if name in cs.INTEGER_LIMITS else repr(float(value))
    return text.encode("ascii")


def _validated_settings(settings: Mapping[str, float | int]) -> dict[str, float | int]:
    unknown = sorted(set(settings) - set(cs.SETTABLE_LIMITS))
    if unknown:
        raise ValueError(
            f"cannot set limit(s) {', '.join(unknown)} on the controller; settable limits are "
            f"{', '.join(cs.SETTABLE_LIMITS)}"
        )
    for name, value in settings.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"limit setting {name}={value!r} must be finite")
        if name in cs.INTEGER_LIMITS and float(value) != int(value):
            raise ValueError(f"limit setting {name}={value!r} must be an integer")
    return dict(settings)


def _merged_expectations(
    expected: Mapping[str, float | int], settings: Mapping[str, float | int]
) -> dict[str, float | int]:
    for name in set(expected) & set(settings):
        if float(expected[name]) != float(settings[name]):
            raise ValueError(
                f"limit {name} is expected to be {expected[name]!r} but set to "
                f"{settings[name]!r}; give one value"
            )
    return {**expected, **settings}
