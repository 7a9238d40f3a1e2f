"""Exceptions raised by the transports and the instrument drivers.

`TransportTimeout` and `ConnectionLost` are transient: the chip driver recovers from them by
reopening its session. `ProtocolError` means the byte stream can no longer be trusted, so the
driver resynchronises before it sends anything else. `InstrumentError` carries an error that
the instrument itself reported and is never retried.
"""

from __future__ import annotations


class TransportTimeout(TimeoutError):
    """No complete reply arrived within the transport timeout."""


class ConnectionLost(ConnectionError):
    """The transport session closed or failed; reopening it may help."""


class ProtocolError(RuntimeError):
    """A reply does not follow the protocol (garbage, wrong length, wrong sequence, bad CRC)."""


class InstrumentError(RuntimeError):
    """An error the instrument reported, with its SCPI error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"instrument error {code}: {message}")
        self.code = code
        self.message = message


class InstrumentBusy(InstrumentError):
    """The instrument serves another client; only one client at a time is allowed."""


class RecoveryFailed(ConnectionError):
    """Reconnecting to the instrument failed after the allowed number of attempts."""
