"""Serve a `Backend` (normally the emulated chip) as an instrument that speaks docs/protocol.md.

`InstrumentProtocol` executes messages against the backend. `TcpInstrumentServer` serves it on
a TCP port, and `PtyInstrumentServer` on a pseudo-terminal, so the drivers are tested over the
same byte streams they use on the bench. The TCP server binds to loopback unless remote access
is allowed, and serves one client at a time: a second client gets a ``BUSY`` line. Both servers
stop on `stop()` and at an optional deadline, and the TCP server drops a client that stays
silent past the idle timeout.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import os
import pty
import queue
import select
import socket
import termios
import threading
import time
import tty
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from drivers import blocks
from drivers import command_set as cs
from drivers.command_set import ErrorCode
from drivers.limits import validate_device_ids, validate_pulses
from drivers.scpi import Block, FramingError, quote, read_message, split_fields
from hwctl.backend import Backend, LimitError, Limits
from sim_backend import physics
from sim_backend.chip import EmulatedChip
from sim_backend.faults import Fault, FaultKind, FaultPlan

logger = logging.getLogger(__name__)

#: Error queue length; when it is full the newest entry becomes -350 "Queue overflow".
ERROR_QUEUE_LENGTH = 32

#: Seconds a client may take between the bytes of one message.
MESSAGE_TIMEOUT_S = 30.0

#: Seconds to wait when polling, so that `stop()` takes effect quickly.
POLL_S = 0.1

#: The blocks of a pulse request, in order (docs/protocol.md).
_PULSE_BLOCKS = ("<ids>", "<shapes>", "<shape_index>", "<amplitudes_v>")

_NONCE_CHARACTERS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass
class ServerStats:
    """Counters for tests and logs."""

    batches_received: int = 0
    batches_executed: int = 0
    replies_replayed: int = 0
    sequence_errors: int = 0
    checksum_errors: int = 0


@dataclass(frozen=True)
class _StoredReply:
    seq: int
    request_key: tuple[int, bytes, bytes]
    code: int
    clock_s: float
    data: bytes | None  # read values in the format in force when the batch ran


class InstrumentProtocol:
    """The command interpreter: one message in, at most one reply out.

    It owns the controller state that a real controller board keeps beside the chip: the error
    queue, the limits set by the client (never looser than the backend's), the read format, and
    the last batch sequence number with its stored reply. It does not close the backend.

    ``adc`` is the scale of the backend's reads if they are ADC codes times an LSB, which
    enables the CODE read format; by default it is taken from an `EmulatedChip`'s parameters,
    and other backends get the float64 format only.
    """

    def __init__(
        self,
        backend: Backend,
        faults: FaultPlan | None = None,
        virtual_clock: bool = True,
        adc: blocks.AdcScale | None = None,
    ) -> None:
        self.backend = backend
        self.faults = faults or FaultPlan()
        self.virtual_clock = virtual_clock
        self.stats = ServerStats()

        self.hardware_limits = backend.limits()
        self.limits = self.hardware_limits
        self.device_count = backend.geometry().devices
        if self.device_count > blocks.MAX_DEVICES:
            raise ValueError(
                f"the protocol addresses at most {blocks.MAX_DEVICES} devices, the backend has "
                f"{self.device_count}"
            )
        # The largest request block is a shape table with one 9-byte entry per pulse.
        self.max_request_block_bytes = self.device_count * blocks.PULSE_SHAPE.itemsize
        self.adc = adc if adc is not None else adc_scale_of(backend)
        self.read_codes = False

        self.errors: collections.deque[tuple[int, str]] = collections.deque()
        self.last_seq = 0
        self.last_client = 0
        self._stored: _StoredReply | None = None

        self._handlers: dict[bytes, Callable[[bytes], bytes | None]] = {
            cs.IDENTIFY: lambda _: self.backend.identity().as_idn().encode("ascii"),
            cs.RESET: self._reset,
            cs.CLEAR_STATUS: self._clear_status,
            cs.OPERATION_COMPLETE: lambda _: b"1",
            cs.ERROR_NEXT: self._next_error,
            cs.ERROR_COUNT: lambda _: str(len(self.errors)).encode("ascii"),
            cs.SYNC: self._sync,
            cs.CLOCK: lambda _: repr(self.backend.clock_s()).encode("ascii"),
            cs.CLOCK_MODE: lambda _: cs.CLOCK_VIRTUAL if self.virtual_clock else cs.CLOCK_REAL,
            cs.GEOMETRY: self._geometry,
            cs.LIMITS: lambda _: cs.format_limits(self.limits),
            cs.TEMPERATURE: lambda _: repr(float(self.backend.temperature_c())).encode("ascii"),
            cs.SEQUENCE: lambda _: f"{self.last_client},{self.last_seq}".encode("ascii"),
            cs.ABORT: self._abort,
            cs.READ_FORMAT: self._set_read_format,
            cs.READ_FORMAT_QUERY: self._read_format,
            cs.ADC_SCALE: self._adc_scale,
        }
        for name, header in cs.SETTABLE_LIMITS.items():
            self._handlers[header] = self._limit_setter(name)
            self._handlers[header + b"?"] = self._limit_getter(name)

    # ---- entry point ---------------------------------------------------------------------

    def handle(self, message: bytes) -> tuple[bytes | None, list[Fault]]:
        """Execute one message (ending in a line feed); return the reply and faults to act on.

        A ``drop`` fault is returned before the batch is executed, with no reply.
        """
        header, _, arguments = message[:-1].partition(b" ")
        header = header.strip().upper()
        faults: list[Fault] = []

        if header in cs.SEQUENCED:
            self.stats.batches_received += 1
            faults = self.faults.for_batch(self.stats.batches_received)
            if any(fault.kind is FaultKind.DROP for fault in faults):
                logger.warning("fault: dropping batch request %d unexecuted", self.stats.batches_received)
                return None, faults
            for fault in faults:
                if fault.kind is FaultKind.ERROR:
                    self.push_error(fault.error_code, "injected fault: error-queue entry")
            return self._sequenced(header, arguments) + b"\n", faults

        handler = self._handlers.get(header)
        if handler is None:
            self.push_error(ErrorCode.UNDEFINED_HEADER, f"undefined header {header[:40]!r}")
            return None, faults
        try:
            reply = handler(arguments.strip())
        except _CommandError as error:
            self.push_error(error.code, error.text)
            return None, faults
        return (None if reply is None else reply + b"\n"), faults

    def push_error(self, code: int, text: str) -> None:
        """Append an entry to the error queue (the newest becomes -350 when it is full)."""
        logger.info("error queue: %d %s", code, text)
        if len(self.errors) >= ERROR_QUEUE_LENGTH:
            self.errors[-1] = (int(ErrorCode.QUEUE_OVERFLOW), "Queue overflow")
            return
        self.errors.append((int(code), text))

    # ---- sequenced batches ---------------------------------------------------------------

    def _sequenced(self, header: bytes, arguments: bytes) -> bytes:
        try:
            fields = split_fields(arguments)
            client, seq = int(fields[0]), int(fields[1])
            if seq < 1:
                raise ValueError(f"sequence number {seq} must be >= 1")
        except (ValueError, FramingError, IndexError, TypeError) as error:
            self.push_error(ErrorCode.SYNTAX_ERROR, f"{header.decode()} arguments: {error}")
            return self._ack(0, ErrorCode.SYNTAX_ERROR, self.backend.clock_s(), None)
        arguments_after_seq = fields[2:]

        # A repeat must come from the same client with the same request, not merely reuse a number.
        key = (client, header, b",".join(map(_field_text, arguments_after_seq)))
        stored = self._stored
        if stored is not None and seq == stored.seq and key == stored.request_key:
            self.stats.replies_replayed += 1
            logger.info("batch %d repeated; sending its stored reply without applying it", seq)
            return self._ack(seq, stored.code, stored.clock_s, stored.data)
        if seq != self.last_seq + 1:
            self.stats.sequence_errors += 1
            self.push_error(
                ErrorCode.SEQUENCE_ERROR,
                f"batch sequence number {seq} received, expected {self.last_seq + 1}",
            )
            return self._ack(seq, ErrorCode.SEQUENCE_ERROR, self.backend.clock_s(), None)

        try:
            payloads = self._checked_payload(header, arguments_after_seq)
        except _CommandError as error:
            if error.code == ErrorCode.CHECKSUM_ERROR:
                self.stats.checksum_errors += 1
            self.push_error(error.code, error.text)
            # A request that was not understood does not consume its sequence number.
            return self._ack(seq, error.code, self.backend.clock_s(), None)

        code, data = self._execute(header, arguments_after_seq, payloads)
        clock_s = self.backend.clock_s()
        self.last_seq, self.last_client = seq, client
        self._stored = _StoredReply(seq, key, code, clock_s, data)
        self.stats.batches_executed += 1
        return self._ack(seq, code, clock_s, data)

    def _checked_payload(self, header: bytes, fields: list) -> list[memoryview]:
        """Return the blocks of a pulse or read request after checking their CRC-32."""
        if header == cs.WAIT:
            if len(fields) != 1 or isinstance(fields[0], Block):
                raise _CommandError(
                    ErrorCode.SYNTAX_ERROR, "CHIP:WAIT? takes <client>,<seq>,<seconds>"
                )
            return []
        block_count = len(_PULSE_BLOCKS) if header == cs.PULSE else 1
        if (
            len(fields) != 2 + block_count
            or isinstance(fields[0], Block)
            or isinstance(fields[1], Block)
            or not all(isinstance(field, Block) for field in fields[2:])
        ):
            layout = ",".join(_PULSE_BLOCKS) if header == cs.PULSE else "<ids>"
            raise _CommandError(
                ErrorCode.SYNTAX_ERROR,
                f"{header.decode()} takes <client>,<seq>,<wait_s>,<crc32>,{layout}",
            )
        payloads = [field.payload for field in fields[2:]]
        try:
            expected_crc = int(fields[1])
        except ValueError:
            raise _CommandError(ErrorCode.SYNTAX_ERROR, f"invalid CRC field {fields[1]!r}") from None
        crc = 0
        for payload in payloads:
            crc = zlib.crc32(payload, crc)
        if crc != expected_crc:
            raise _CommandError(
                ErrorCode.CHECKSUM_ERROR,
                f"block CRC-32 {crc} does not match the stated {expected_crc}",
            )
        return payloads

    def _execute(
        self, header: bytes, fields: list, payloads: list[memoryview]
    ) -> tuple[int, bytes | None]:
        try:
            # The wait of any sequenced request comes first, and stays done if the batch fails.
            duration_s = float(fields[0])
            if not (math.isfinite(duration_s) and duration_s >= 0):
                raise ValueError(f"wait duration {duration_s!r} s must be finite and >= 0")
            if duration_s > 0 or header == cs.WAIT:
                self.backend.wait_s(duration_s)

            if header == cs.PULSE:
                device_ids = blocks.unpack_device_ids(payloads[0])
                count = device_ids.size
                kinds, widths_ns = blocks.unpack_pulse_shapes(payloads[1], payloads[2], count)
                amplitudes_v = blocks.unpack_column(payloads[3], blocks.AMPLITUDES_V, count)
                if self.limits != self.hardware_limits:
                    # The backend checks its own limits; tighter client-set ones are checked here.
                    validate_pulses(self.limits, self.device_count, device_ids, kinds, amplitudes_v, widths_ns)
                self.backend.apply_pulses(device_ids, kinds, amplitudes_v, widths_ns)
                return ErrorCode.NO_ERROR, None
            if header == cs.READ:
                device_ids = blocks.unpack_device_ids(payloads[0])
                validate_device_ids(self.device_count, device_ids, require_unique=False)
                g_us = self.backend.read(device_ids)
                return ErrorCode.NO_ERROR, self._encode_reads(g_us)
            return ErrorCode.NO_ERROR, None
        except LimitError as error:
            self.push_error(ErrorCode.DATA_OUT_OF_RANGE, str(error))
            return ErrorCode.DATA_OUT_OF_RANGE, None
        except _ReadEncodingError as error:
            logger.error("%s", error)
            self.push_error(ErrorCode.DEVICE_SPECIFIC_ERROR, str(error))
            return ErrorCode.DEVICE_SPECIFIC_ERROR, None
        except (ValueError, blocks.BlockError) as error:
            self.push_error(ErrorCode.ILLEGAL_PARAMETER_VALUE, str(error))
            return ErrorCode.ILLEGAL_PARAMETER_VALUE, None
        except Exception as error:  # noqa: BLE001 -- reported to the client, and logged
            logger.exception("backend failed on %s", header.decode())
            self.push_error(ErrorCode.DEVICE_SPECIFIC_ERROR, f"{type(error).__name__}: {error}")
            return ErrorCode.DEVICE_SPECIFIC_ERROR, None

    def _encode_reads(self, g_us: np.ndarray) -> bytes:
        """Return read values in the read format in force (float64 values or ADC codes)."""
        if not self.read_codes:
            return np.ascontiguousarray(g_us, dtype=blocks.CONDUCTANCES_US).tobytes()
        try:
            return self.adc.encode(g_us)
        except blocks.BlockError as error:
            # Raised as its own type, so that it is reported as a device error (-300): the
            # reads took place, whereas -224 would tell the client its request was invalid.
            raise _ReadEncodingError(
                f"the backend's read cannot be sent as ADC codes ({error}); "
                "select the float64 read format with CHIP:READ:FORM F64"
            ) from error

    def _ack(self, seq: int, code: int, clock_s: float, data: bytes | None) -> bytes:
        text = f"{seq},{int(code)},{clock_s!r},{len(self.errors)}".encode("ascii")
        if data is None:
            return text
        return b"".join((text, b",", str(zlib.crc32(data)).encode("ascii"), b",", blocks.encode_block(data)))

    # ---- other commands ------------------------------------------------------------------

    def _reset(self, _arguments: bytes) -> None:
        self.limits = self.hardware_limits
        self.read_codes = False
        self.errors.clear()
        logger.info(
            "*RST: limits back to the chip's hardware limits, float64 reads, error queue cleared"
        )

    def _clear_status(self, _arguments: bytes) -> None:
        self.errors.clear()

    def _next_error(self, _arguments: bytes) -> bytes:
        code, text = self.errors.popleft() if self.errors else (0, "No error")
        return str(code).encode("ascii") + b"," + quote(text)

    def _sync(self, arguments: bytes) -> bytes:
        if not arguments or len(arguments) > 64 or not set(arguments) <= _NONCE_CHARACTERS:
            raise _CommandError(
                ErrorCode.ILLEGAL_PARAMETER_VALUE, "SYST:SYNC? needs a nonce of up to 64 [A-Za-z0-9-_.]"
            )
        return arguments

    def _geometry(self, _arguments: bytes) -> bytes:
        geometry = self.backend.geometry()
        return f"{geometry.arrays},{geometry.rows},{geometry.cols}".encode("ascii")

    def _set_read_format(self, arguments: bytes) -> None:
        choice = arguments.upper()
        if choice == cs.READ_FORMAT_FLOAT:
            self.read_codes = False
        elif choice != cs.READ_FORMAT_CODES:
            raise _CommandError(
                ErrorCode.ILLEGAL_PARAMETER_VALUE,
                f"read format {arguments[:20]!r} is not F64 or CODE",
            )
        elif self.adc is None:
            raise _CommandError(
                ErrorCode.SETTINGS_CONFLICT,
                "this controller's reads are not ADC codes, so only the F64 read format is "
                "available",
            )
        else:
            self.read_codes = True
        logger.info("read format set to %s", choice.decode("ascii"))

    def _read_format(self, _arguments: bytes) -> bytes:
        return cs.READ_FORMAT_CODES if self.read_codes else cs.READ_FORMAT_FLOAT

    def _adc_scale(self, _arguments: bytes) -> bytes:
        if self.adc is None:
            raise _CommandError(
                ErrorCode.SETTINGS_CONFLICT,
                "this controller's reads are not ADC codes, so it has no ADC scale",
            )
        return f"{self.adc.bits},{self.adc.lsb_us!r}".encode("ascii")

    def _abort(self, _arguments: bytes) -> None:
        # NOTE: batches run to completion before the next message is read, so there is never a
        # batch in progress to stop here. A controller with a pulse sequencer would stop it.
        logger.info("ABOR received; no batch in progress")

    def _limit_getter(self, name: str) -> Callable[[bytes], bytes]:
        def get(_arguments: bytes) -> bytes:
            value = getattr(self.limits, name)
            return (str(int(value)) if name in cs.INTEGER_LIMITS else repr(float(value))).encode()

        return get

    def _limit_setter(self, name: str) -> Callable[[bytes], None]:
        def set_limit(arguments: bytes) -> None:
            try:
                value = float(arguments)
            except ValueError:
                raise _CommandError(
                    ErrorCode.DATA_TYPE_ERROR, f"limit {name} needs a number, got {arguments[:40]!r}"
                ) from None
            low, high = _allowed_range(name, self.hardware_limits, self.limits)
            if not (math.isfinite(value) and low <= value <= high) or (
                name in cs.INTEGER_LIMITS and value != int(value)
            ):
                raise _CommandError(
                    ErrorCode.DATA_OUT_OF_RANGE,
                    f"limit {name}={value!r} is outside [{low}, {high}] allowed by the chip's "
                    "hardware limits and the other limits",
                )
            typed = int(value) if name in cs.INTEGER_LIMITS else value
            self.limits = replace(self.limits, **{name: typed})
            logger.info("limit %s set to %r", name, typed)

        return set_limit


def _allowed_range(name: str, hardware: Limits, current: Limits) -> tuple[float, float]:
    """Return the range a client may set ``name`` to: never looser than the hardware limit."""
    if name == "set_amplitude_min_v":
        return hardware.set_amplitude_min_v, current.set_amplitude_max_v
    if name == "set_amplitude_max_v":
        return current.set_amplitude_min_v, hardware.set_amplitude_max_v
    if name == "pulses_per_device_max":
        return 1, hardware.pulses_per_device_max
    return math.ulp(0.0), getattr(hardware, name)


def adc_scale_of(backend: Backend) -> blocks.AdcScale | None:
    """Return the ADC scale of an `EmulatedChip`'s reads, or None for other backends."""
    if not isinstance(backend, EmulatedChip):
        return None
    return blocks.AdcScale(backend.params.read_adc_bits, physics.adc_lsb_us(backend.params))


def _field_text(field: bytes | Block) -> bytes:
    return b"#block" if isinstance(field, Block) else field


class _ReadEncodingError(Exception):
    """Reads were taken but cannot be sent in the read format in force."""


class _CommandError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = int(code)
        self.text = text


# ---- byte streams ----------------------------------------------------------------------------


class _Idle(Exception):
    """No message started within the idle timeout."""


class _Disconnected(Exception):
    """The peer closed the stream, stalled inside a message, or the server is stopping."""


class _ServerStream:
    """Buffered, timeout-bounded reads and writes on one file descriptor."""

    def __init__(
        self,
        fileno: int,
        receive: Callable[[int], bytes],
        send: Callable[[bytes], int],
        stop: threading.Event,
    ) -> None:
        self._fileno = fileno
        self._receive = receive
        self._send = send
        self._stop = stop
        self._buffer = bytearray()
        self._scanned = 0

    def read_message(self, idle_timeout_s: float | None, max_block_bytes: int) -> bytes:
        if not self._buffer:
            self._fill(idle_timeout_s, idle=True)
        return read_message(self._read_line, self._read_exact, max_block_bytes)

    def write(self, data: bytes, timeout_s: float) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + timeout_s
        while view:
            if self._stop.is_set() or time.monotonic() > deadline:
                raise _Disconnected("client did not accept the reply in time")
            _, writable, _ = select.select([], [self._fileno], [], POLL_S)
            if not writable:
                continue
            try:
                sent = self._send(view[: 1 << 20])
            except BlockingIOError:
                continue
            except OSError as error:
                raise _Disconnected(f"write failed: {error}") from error
            view = view[sent:]

    def discard_input(self, quiet_s: float = 0.2) -> int:
        """Drop buffered input and whatever arrives until the line is quiet for ``quiet_s``."""
        discarded = len(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        for _ in range(10_000):
            readable, _, _ = select.select([self._fileno], [], [], quiet_s)
            if not readable:
                break
            try:
                chunk = self._receive(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                break
            if not chunk:
                break
            discarded += len(chunk)
        return discarded

    def _read_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end != -1:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buffer)
            self._fill(MESSAGE_TIMEOUT_S, idle=False)

    def _read_exact(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._fill(MESSAGE_TIMEOUT_S, idle=False)
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        self._scanned = 0
        return data

    def _fill(self, timeout_s: float | None, idle: bool) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._stop.is_set():
                raise _Disconnected("server stopping")
            if deadline is not None and time.monotonic() > deadline:
                if idle:
                    raise _Idle()
                raise _Disconnected(f"client stalled for {timeout_s} s inside a message")
            readable, _, _ = select.select([self._fileno], [], [], POLL_S)
            if not readable:
                continue
            try:
                chunk = self._receive(1 << 20)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as error:
                raise _Disconnected(f"read failed: {error}") from error
            if not chunk:
                raise _Disconnected("client closed the connection")
            self._buffer += chunk
            return


def _serve_messages(
    stream: _ServerStream,
    protocol: InstrumentProtocol,
    idle_timeout_s: float | None,
    write_timeout_s: float,
    stop: threading.Event,
    drops_connection: bool,
) -> str:
    """Reply to messages until the stream ends, and return why it ended."""
    while not stop.is_set():
        try:
            message = stream.read_message(idle_timeout_s, protocol.max_request_block_bytes)
        except _Idle:
            if drops_connection:
                return f"client idle for more than {idle_timeout_s} s"
            continue
        except _Disconnected as reason:
            return str(reason)
        except FramingError as error:
            protocol.push_error(ErrorCode.INVALID_BLOCK_DATA, f"malformed message: {error}")
            discarded = stream.discard_input()
            logger.warning("malformed message (%s); discarded %d input bytes", error, discarded)
            if drops_connection:
                return "malformed message"
            continue

        reply, faults = protocol.handle(message)
        kinds = {fault.kind for fault in faults}
        if FaultKind.DROP in kinds or FaultKind.DROP_AFTER in kinds:
            logger.warning("fault: no reply to batch request %d", protocol.stats.batches_received)
            if drops_connection:
                return "connection dropped by fault injection"
            continue
        for fault in faults:
            if fault.kind is FaultKind.DELAY:
                logger.warning("fault: delaying the reply by %s s", fault.delay_s)
                if stop.wait(fault.delay_s):
                    return "server stopping"
        if FaultKind.GARBAGE in kinds:
            logger.warning("fault: sending garbage instead of the reply")
            reply = protocol.faults.garbage(protocol.stats.batches_received)
        if reply is None:
            continue
        try:
            stream.write(reply, write_timeout_s)
        except _Disconnected as reason:
            return str(reason)
    return "server stopping"


# ---- servers ---------------------------------------------------------------------------------


class _ServerBase:
    def __init__(self, protocol: InstrumentProtocol, idle_timeout_s: float | None, deadline_s: float | None) -> None:
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be positive, got {idle_timeout_s!r}")
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s!r}")
        self.protocol = protocol
        self.idle_timeout_s = idle_timeout_s
        self.deadline_s = deadline_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def stop(self) -> None:
        """Ask the server to stop; `serve` returns within about `POLL_S` seconds."""
        self._stop.set()

    def start(self) -> None:
        """Run `serve` in a daemon thread (for tests and embedding)."""
        self._thread = threading.Thread(target=self.serve, name=type(self).__name__, daemon=True)
        self._thread.start()

    def wait_stopped(self, timeout_s: float) -> bool:
        """Wait for the thread started with `start` to end by itself; return whether it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def join(self, timeout_s: float = 10.0) -> None:
        """Stop the server started with `start` and wait for its thread."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"{type(self).__name__} did not stop within {timeout_s} s")

    def _deadline_watch(self) -> threading.Timer | None:
        if self.deadline_s is None:
            return None
        timer = threading.Timer(self.deadline_s, self._deadline_reached)
        timer.daemon = True
        timer.start()
        return timer

    def _deadline_reached(self) -> None:
        logger.info("deadline of %s s reached; stopping", self.deadline_s)
        self._stop.set()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.join()


class TcpInstrumentServer(_ServerBase):
    """The instrument on a TCP port; binds to loopback unless ``allow_remote`` is true.

    ``port=0`` picks a free port; `resource_name` gives the VISA resource string to connect to.
    """

    def __init__(
        self,
        protocol: InstrumentProtocol,
        host: str = "127.0.0.1",
        port: int = 0,
        allow_remote: bool = False,
        idle_timeout_s: float | None = 3600.0,
        deadline_s: float | None = None,
        write_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(protocol, idle_timeout_s, deadline_s)
        if not allow_remote and not _is_loopback(host):
            raise ValueError(
                f"refusing to bind the emulator to {host}, which is not a loopback address; "
                "use 127.0.0.1, or pass --allow-remote to expose it to the network"
            )
        self.write_timeout_s = write_timeout_s
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(POLL_S)
        self.host, self.port = self._listener.getsockname()[:2]
        self._active_peer: str | None = None
        self._lock = threading.Lock()
        self._sessions: queue.Queue[tuple[socket.socket, str]] = queue.Queue()

    @property
    def resource_name(self) -> str:
        return f"TCPIP0::{self.host}::{self.port}::SOCKET"

    def serve(self) -> None:
        """Serve clients one at a time until `stop()` or the deadline."""
        logger.info("serving %s on %s:%d", self.protocol.backend.identity().model, self.host, self.port)
        timer = self._deadline_watch()
        acceptor = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        acceptor.start()
        try:
            while not self._stop.is_set():
                try:
                    connection, peer = self._sessions.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                self._serve_client(connection, peer)
        finally:
            self._stop.set()
            acceptor.join()
            self._listener.close()
            self._drain_sessions()
            if timer is not None:
                timer.cancel()
            logger.info("server on %s:%d stopped", self.host, self.port)

    def _serve_client(self, connection: socket.socket, peer: str) -> None:
        logger.info("client %s connected", peer)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.setblocking(False)
        stream = _ServerStream(connection.fileno(), _quick_ack_receiver(connection), connection.send, self._stop)
        try:
            reason = _serve_messages(
                stream, self.protocol, self.idle_timeout_s, self.write_timeout_s, self._stop, True
            )
        finally:
            connection.close()
            with self._lock:
                self._active_peer = None
        logger.info("client %s disconnected: %s", peer, reason)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                connection, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as error:
                if not self._stop.is_set():
                    logger.error("accept failed: %s", error)
                continue
            peer = f"{address[0]}:{address[1]}"
            with self._lock:
                busy_with = self._active_peer
                if busy_with is None:
                    self._active_peer = peer
            if busy_with is None:
                self._sessions.put((connection, peer))
            else:
                _reject_busy(connection, peer, busy_with)

    def _drain_sessions(self) -> None:
        while True:
            try:
                connection, _ = self._sessions.get_nowait()
            except queue.Empty:
                return
            connection.close()


def _quick_ack_receiver(connection: socket.socket) -> Callable[[int], bytes]:
    """Return ``connection.recv``, made to acknowledge every segment at once where Linux allows.

    A client with Nagle's algorithm on delays the tail of a request until the server
    acknowledges what came before, and delayed acknowledgements made that about 20 ms per
    request on loopback here. pyvisa-py 0.8.1 cannot turn Nagle off on SOCKET resources.
    """
    quick_ack = getattr(socket, "TCP_QUICKACK", None)
    if quick_ack is None:
        return connection.recv

    def receive(count: int) -> bytes:
        data = connection.recv(count)
        # Linux clears TCP_QUICKACK after a while, so it is set again after every read.
        connection.setsockopt(socket.IPPROTO_TCP, quick_ack, 1)
        return data

    return receive


def _reject_busy(connection: socket.socket, peer: str, busy_with: str) -> None:
    """Tell a second client that the instrument is busy, then close its connection."""
    logger.warning("rejecting client %s: busy with %s", peer, busy_with)
    line = (
        cs.BUSY_PREFIX
        + f"instrument busy: it serves one client at a time and {busy_with} is connected; "
        "close that session or wait\n".encode("ascii")
    )
    try:
        connection.settimeout(1.0)
        connection.sendall(line)
        connection.shutdown(socket.SHUT_WR)
        # Read until the client closes, so the line is not lost to a connection reset.
        for _ in range(64):
            if not connection.recv(4096):
                break
    except OSError as error:
        logger.debug("closing the busy connection from %s: %s", peer, error)
    finally:
        connection.close()


class PtyInstrumentServer(_ServerBase):
    """The instrument on a pseudo-terminal; clients open `path` as a serial port.

    The server keeps its own descriptor of the terminal open, so that clients may close and
    reopen the port without the server seeing a hang-up. A pseudo-terminal has one line, so
    there is no busy check here; `drivers.transports.SerialTransport` locks the port instead.
    """

    def __init__(
        self,
        protocol: InstrumentProtocol,
        idle_timeout_s: float | None = None,
        deadline_s: float | None = None,
        write_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(protocol, idle_timeout_s, deadline_s)
        self.write_timeout_s = write_timeout_s
        self._controller_fd, self._terminal_fd = pty.openpty()
        tty.setraw(self._terminal_fd)
        os.set_blocking(self._controller_fd, False)
        self.path = os.ttyname(self._terminal_fd)

    def serve(self) -> None:
        """Reply to messages until `stop()` or the deadline."""
        logger.info("serving %s on %s", self.protocol.backend.identity().model, self.path)
        timer = self._deadline_watch()
        fd = self._controller_fd
        stream = _ServerStream(fd, lambda count: os.read(fd, count), lambda data: os.write(fd, data), self._stop)
        try:
            while not self._stop.is_set():
                reason = _serve_messages(
                    stream, self.protocol, self.idle_timeout_s, self.write_timeout_s, self._stop, False
                )
                if not self._stop.is_set():
                    # A reply the client never read: drop it so it cannot confuse the next client.
                    logger.warning("pseudo-terminal session interrupted (%s); flushing", reason)
                    termios.tcflush(self._terminal_fd, termios.TCIFLUSH)
        finally:
            if timer is not None:
                timer.cancel()
            os.close(self._controller_fd)
            os.close(self._terminal_fd)
            logger.info("server on %s stopped", self.path)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "InstrumentProtocol",
    "PtyInstrumentServer",
    "ServerStats",
    "TcpInstrumentServer",
    "adc_scale_of",
]
