"""Open the chip backend that a configuration names: the in-process emulator, or a controller
reached over VISA (``resource``) or a serial port (``port``).

The functions take any object with the attributes of `hwctl.config.BackendSection` (``kind``,
``resource``, ``port``, ``baud_rate``, ``timeout_s``, and for the emulator ``state_file``,
``calibration_file``, ``stuck_fraction``), so they also serve callers that build settings by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from hwctl.backend import Backend

logger = logging.getLogger(__name__)

BACKEND_KINDS = ("emulator", "visa", "serial")


class BackendSettings(Protocol):
    kind: str
    resource: str | None
    port: str | None
    baud_rate: int
    timeout_s: float
    state_file: Path | None
    calibration_file: Path | None
    stuck_fraction: float | None


def open_backend(
    settings: BackendSettings,
    *,
    seed: int = 0,
    expected_limits: Mapping[str, float | int] | None = None,
) -> Backend:
    """Open the backend ``settings.kind`` names.

    ``seed`` seeds the in-process emulator (a served emulator has its own ``--seed``).
    ``expected_limits`` (`Limits` field names to values) are compared with the backend's limits
    before this returns, so a mismatch stops a run before any pulse; `LimitError` names both
    values.
    """
    if settings.kind == "emulator":
        return _open_emulator(settings, seed, expected_limits)
    if settings.kind in ("visa", "serial"):
        return open_instrument(settings, expected_limits=expected_limits)
    raise ValueError(
        f"unknown backend kind {settings.kind!r}; use one of {', '.join(BACKEND_KINDS)}"
    )


def open_instrument(
    settings: BackendSettings, *, expected_limits: Mapping[str, float | int] | None = None
):
    """Connect a `drivers.controller.ChipController` over VISA or a serial port.

    The driver checks the controller's identity, reads its limits back and compares them with
    ``expected_limits`` before returning.
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


def _open_emulator(
    settings: BackendSettings, seed: int, expected_limits: Mapping[str, float | int] | None
) -> Backend:
    from calibration.params import load_params
    from drivers.limits import check_limits
    from sim_backend.chip import EmulatedChip

    params = load_params(settings.calibration_file)
    chip = EmulatedChip(
        seed=seed,
        params=params,
        state_path=settings.state_file,
        stuck_fraction=settings.stuck_fraction,
    )
    try:
        check_limits(expected_limits or {}, chip.limits())
    except BaseException:
        chip.close()
        raise
    return chip
