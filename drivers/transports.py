"""Byte transports under the chip driver: a pyvisa resource or a pyserial port.

A transport moves bytes and nothing else: it writes a request, reads text through the next line
feed, and reads an exact number of bytes. Framing (`drivers.scpi.read_message`) sits on top.
Every read is bounded by ``timeout_s``; failures become `TransportTimeout` or `ConnectionLost`,
after which the caller closes and reopens the transport. `close` releases only this transport's
own session, never a shared resource manager.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import select
import time
from collections.abc import Iterator

import pyvisa
import serial
from pyvisa import constants
from pyvisa_py.sessions import UnknownAttribute

from drivers.errors import ConnectionLost, InstrumentBusy, TransportTimeout

logger = logging.getLogger(__name__)

LF = b"\n"

#: Bytes asked for per read from a serial port. A pseudo-terminal returns at most 4 KiB.
READ_CHUNK_BYTES = 1 << 16


class Transport(abc.ABC):
    """A byte stream to one instrument that can be closed and reopened."""

    def __init__(self, address: str, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.address = address
        self.timeout_s = float(timeout_s)

    @abc.abstractmethod
    def open(self) -> None:
        """Open the session; raise `ConnectionLost` or `InstrumentBusy` if that fails."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close this transport's session (safe to call when already closed)."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Write all of ``data``."""

    @abc.abstractmethod
    def read_line(self) -> bytes:
        """Return bytes through the next line feed (included)."""

    @abc.abstractmethod
    def read_exact(self, count: int) -> bytes:
        """Return exactly ``count`` bytes."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"


class VisaTransport(Transport):
    """A pyvisa message-based resource, e.g. ``TCPIP0::127.0.0.1::5025::SOCKET``.

    Uses the pure-Python pyvisa-py backend (``@py``) unless a resource manager is passed in.
    The resource manager is never closed here: pyvisa shares its session between all
    ResourceManager instances, so closing it would close other drivers' sessions too.
    Text is read with the line feed as VISA termination character. Block payloads are read with
    termination disabled, so a 0x0A inside a payload never ends a read.
    """

    def __init__(
        self,
        resource_name: str,
        timeout_s: float = 10.0,
        resource_manager: pyvisa.ResourceManager | None = None,
        baud_rate: int = 115200,
    ) -> None:
        super().__init__(resource_name, timeout_s)
        self._manager = resource_manager
        self._baud_rate = baud_rate
        self._resource: pyvisa.resources.MessageBasedResource | None = None

    @property
    def is_serial(self) -> bool:
        return self.address.upper().startswith("ASRL")

    def open(self) -> None:
        if self._manager is None:
            self._manager = pyvisa.ResourceManager("@py")
        try:
            # pyvisa-py 0.8 raises a plain Exception when a TCP connection cannot be made.
            resource = self._manager.open_resource(
                self.address, open_timeout=int(self.timeout_s * 1000)
            )
        except Exception as error:  # noqa: BLE001 -- see the comment above
            raise ConnectionLost(f"could not open VISA resource {self.address}: {error}") from error
        if not isinstance(resource, pyvisa.resources.MessageBasedResource):
            resource.close()
            raise ValueError(
                f"VISA resource {self.address} is not message based; use a SOCKET, INSTR or "
                "ASRL resource string"
            )
        resource.timeout = int(self.timeout_s * 1000)
        resource.read_termination = "\n"
        resource.write_termination = ""
        if self.is_serial:
            resource.baud_rate = self._baud_rate
        elif self.address.upper().endswith("::SOCKET"):
            self._disable_nagle(resource)
        self._resource = resource

    def _disable_nagle(self, resource) -> None:
        """Ask for TCP_NODELAY so that the last segment of a request is not held back."""
        try:
            resource.set_visa_attribute(constants.ResourceAttribute.tcpip_nodelay, True)
        except (pyvisa.errors.Error, UnknownAttribute) as error:
            # NOTE: pyvisa-py 0.8.1 routes this attribute of SOCKET sessions to a setter that
            # always fails, so requests there go out with Nagle's algorithm on.
            logger.debug("could not set TCP_NODELAY on %s: %s", self.address, error)

    def close(self) -> None:
        resource, self._resource = self._resource, None
        if resource is None:
            return
        try:
            resource.close()
        except (pyvisa.errors.Error, OSError) as error:
            logger.warning("closing VISA resource %s failed: %s", self.address, error)

    def write(self, data: bytes) -> None:
        with self._translate_errors("write"):
            self._open_resource().write_raw(data)

    def read_line(self) -> bytes:
        with self._translate_errors("read"):
            return bytes(self._open_resource().read_raw())

    def read_exact(self, count: int) -> bytes:
        resource = self._open_resource()
        with self._translate_errors("read"):
            self._set_termination_enabled(resource, False)
            try:
                data = resource.read_bytes(count, chunk_size=max(count, 1))
            finally:
                self._set_termination_enabled(resource, True)
        if len(data) != count:
            raise TransportTimeout(f"{self.address}: expected {count} bytes, got {len(data)}")
        return bytes(data)

    def _set_termination_enabled(self, resource, enabled: bool) -> None:
        resource.set_visa_attribute(constants.ResourceAttribute.termchar_enabled, enabled)
        if self.is_serial:
            end_in = (
                constants.SerialTermination.termination_char
                if enabled
                else constants.SerialTermination.none
            )
            resource.set_visa_attribute(constants.ResourceAttribute.asrl_end_in, end_in)

    def _open_resource(self):
        if self._resource is None:
            raise ConnectionLost(f"VISA resource {self.address} is not open")
        return self._resource

    @contextlib.contextmanager
    def _translate_errors(self, operation: str) -> Iterator[None]:
        """Turn pyvisa and socket errors into `TransportTimeout` or `ConnectionLost`."""
        try:
            yield
        except pyvisa.errors.VisaIOError as error:
            if error.error_code == constants.StatusCode.error_timeout:
                raise TransportTimeout(f"{self.address}: {operation} timed out") from error
            raise ConnectionLost(f"{self.address}: {operation} failed: {error}") from error
        except (OSError, pyvisa.errors.InvalidSession) as error:
            raise ConnectionLost(f"{self.address}: {operation} failed: {error}") from error


class SerialTransport(Transport):
    """A serial port through pyserial, e.g. ``/dev/ttyUSB0`` or a pseudo-terminal ``/dev/pts/N``.

    The port is opened with an exclusive lock, so a second client on the same machine gets
    `InstrumentBusy` instead of interleaving its bytes with ours. pyserial opens, locks and
    configures the port. Reads and writes then go straight to its POSIX file descriptor with
    ``select``, ``os.read`` and ``os.write``, which costs less than pyserial 3.5's ``read`` and
    ``write``: its ``write`` copies the unsent rest of the data after every partial write.
    """

    def __init__(self, port: str, baud_rate: int = 115200, timeout_s: float = 10.0) -> None:
        super().__init__(port, timeout_s)
        self._baud_rate = baud_rate
        self._serial: serial.Serial | None = None
        self._buffer = bytearray()
        self._line_scanned = 0

    def open(self) -> None:
        try:
            port = serial.Serial(
                self.address,
                baudrate=self._baud_rate,
                timeout=self.timeout_s,
                write_timeout=self.timeout_s,
                exclusive=True,
            )
        except serial.SerialException as error:
            if "lock" in str(error).lower():
                raise InstrumentBusy(
                    -300, f"serial port {self.address} is in use by another client: {error}"
                ) from error
            raise ConnectionLost(f"could not open serial port {self.address}: {error}") from error
        port.reset_input_buffer()
        self._serial = port
        self._buffer.clear()
        self._line_scanned = 0

    def close(self) -> None:
        port, self._serial = self._serial, None
        self._buffer.clear()
        self._line_scanned = 0
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError) as error:
                logger.warning("closing serial port %s failed: %s", self.address, error)

    def write(self, data: bytes) -> None:
        fd = self._open_fd()
        unsent = memoryview(data)
        deadline = time.monotonic() + self.timeout_s
        while unsent:
            try:
                unsent = unsent[os.write(fd, unsent) :]
            except BlockingIOError:
                pass
            except OSError as error:
                raise ConnectionLost(f"{self.address}: write failed: {error}") from error
            if unsent and not self._wait(fd, deadline, for_write=True):
                raise TransportTimeout(f"{self.address}: write timed out after {self.timeout_s} s")
        # Wait until a real serial line has sent the bytes (tcdrain), so that the reply timeout
        # does not run while they are still on their way.
        try:
            self._serial.flush()
        except (serial.SerialException, OSError) as error:
            raise ConnectionLost(f"{self.address}: write failed: {error}") from error

    def read_line(self) -> bytes:
        fd = self._open_fd()
        deadline = time.monotonic() + self.timeout_s
        while True:
            line_end = self._buffer.find(LF, self._line_scanned)
            if line_end != -1:
                line = bytes(self._buffer[: line_end + 1])
                del self._buffer[: line_end + 1]
                self._line_scanned = 0
                return line
            self._line_scanned = len(self._buffer)
            if not self._receive(fd, deadline):
                raise TransportTimeout(f"{self.address}: no line feed within {self.timeout_s} s")

    def read_exact(self, count: int) -> bytes:
        fd = self._open_fd()
        deadline = time.monotonic() + self.timeout_s
        while len(self._buffer) < count:
            if not self._receive(fd, deadline):
                raise TransportTimeout(
                    f"{self.address}: expected {count} bytes, got {len(self._buffer)}"
                )
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        self._line_scanned = 0
        return data

    def _receive(self, fd: int, deadline: float) -> bool:
        """Append the bytes that arrive before ``deadline``; return False if none did."""
        if not self._wait(fd, deadline, for_write=False):
            return False
        try:
            chunk = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return True
        except OSError as error:
            raise ConnectionLost(f"{self.address}: read failed: {error}") from error
        if not chunk:
            # On Linux a serial device that went away reads as ready but returns no data.
            raise ConnectionLost(f"{self.address}: port reported data but returned none")
        self._buffer += chunk
        return True

    def _wait(self, fd: int, deadline: float, for_write: bool) -> bool:
        """Wait until ``fd`` is ready; return False at ``deadline``."""
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return False
        try:
            if for_write:
                _, ready, _ = select.select([], [fd], [], remaining_s)
            else:
                ready, _, _ = select.select([fd], [], [], remaining_s)
        except (OSError, ValueError) as error:
            raise ConnectionLost(f"{self.address}: select failed: {error}") from error
        return bool(ready)

    def _open_fd(self) -> int:
        if self._serial is None:
            raise ConnectionLost(f"serial port {self.address} is not open")
        return self._serial.fileno()
