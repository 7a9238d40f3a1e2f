"""Open the instrument backend: a chip controller reached over VISA (``resource``) or a serial
port (``port``), as `hwctl.config.BackendSection` names it.

`open_instrument` takes any object with the attributes ``kind``, ``resource``, ``port``,
``baud_rate`` and ``timeout_s``, so callers may also build the settings by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from drivers.controller import ChipController

logger = logging.getLogger(__name__)


class InstrumentSettings(Protocol):
    kind: str
    resource: str | None
    port: str | None
    baud_rate: int
    timeout_s: float


def open_instrument(
    settings: InstrumentSettings, *, expected_limits: Mapping[str, float | int] | None = None
) -> ChipController:
    """Connect a `drivers.controller.ChipController` over VISA or a serial port.

    The driver reads the controller's identity and limits before returning, and compares the
    limits with ``expected_limits`` (`Limits` field names to values). A mismatch raises
    `hwctl.backend.LimitError` naming both values, so a run stops before any pulse.
    """
    from drivers.controller import ChipController
    from drivers.transports import SerialTransport, VisaTransport

    if settings.kind == "visa":
        if not settings.resource:
            raise ValueError(
                "backend kind 'visa' needs a VISA resource string, such as "
                "TCPIP0::127.0.0.1::5025::SOCKET or ASRL/dev/ttyUSB0::INSTR (--resource)"
            )
        transport = VisaTransport(
            settings.resource, timeout_s=settings.timeout_s, baud_rate=settings.baud_rate
        )
    elif settings.kind == "serial":
        if not settings.port:
            raise ValueError(
                "backend kind 'serial' needs a serial port path, such as /dev/ttyUSB0 (--port)"
            )
        transport = SerialTransport(
            settings.port, baud_rate=settings.baud_rate, timeout_s=settings.timeout_s
        )
    else:
        raise ValueError(
            f"open_instrument needs backend kind 'visa' or 'serial', got {settings.kind!r}"
        )
    logger.info("connecting to the chip controller at %s", transport.address)
    return ChipController(transport, expected_limits=expected_limits)
