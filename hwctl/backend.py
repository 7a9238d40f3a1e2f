"""The backend interface: device-level primitives that every chip backend offers.

Program-and-verify, read-back and drift schedules in `protocols` are written against this
interface only, so the same procedure runs on the in-process emulator and on a real controller.
Devices are addressed by a flat index, ``(array * rows + row) * cols + col``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class PulseKind(IntEnum):
    """Pulse shapes a controller can apply to one device."""

    RESET = 0  # melt and quench: conductance near zero
    SET = 1  # partial SET: raises the conductance by a stochastic step


@dataclass(frozen=True)
class Identity:
    """Identity of the chip behind a backend, as an ``*IDN?`` reply states it."""

    manufacturer: str
    model: str
    serial: str
    firmware: str

    def as_idn(self) -> str:
        return f"{self.manufacturer},{self.model},{self.serial},{self.firmware}"


@dataclass(frozen=True)
class Geometry:
    """Crossbar arrays of ``rows`` word lines by ``cols`` bit lines."""

    arrays: int
    rows: int
    cols: int

    @property
    def devices(self) -> int:
        return self.arrays * self.rows * self.cols


@dataclass(frozen=True)
class Limits:
    """Hard safety limits; a request outside them is an error, never clamped."""

    set_amplitude_min_v: float
    set_amplitude_max_v: float
    reset_amplitude_max_v: float
    width_max_ns: float
    pulses_per_device_max: int
    total_time_max_s: float
    g_max_us: float
    read_voltage_v: float


class LimitError(ValueError):
    """A pulse request or a configured limit lies outside the controller's safe range."""


class Backend(abc.ABC):
    """A PCM chip: the emulator in this process, or a controller reached over a wire."""

    @abc.abstractmethod
    def identity(self) -> Identity: ...

    @abc.abstractmethod
    def geometry(self) -> Geometry: ...

    @abc.abstractmethod
    def limits(self) -> Limits: ...

    @abc.abstractmethod
    def clock_s(self) -> float:
        """Return the chip's clock in seconds (virtual time on the emulator)."""

    @abc.abstractmethod
    def apply_pulses(
        self,
        device_ids: np.ndarray,
        kinds: np.ndarray,
        amplitudes_v: np.ndarray,
        widths_ns: np.ndarray,
    ) -> None:
        """Apply one pulse to each listed device, in list order.

        ``device_ids`` are unique int64 flat indices; ``kinds`` holds `PulseKind` values as
        uint8. Raises `LimitError` before anything is applied if any pulse is outside `limits`.
        """

    @abc.abstractmethod
    def read(self, device_ids: np.ndarray) -> np.ndarray:
        """Read the conductances of the listed devices, in µS, one read each, in list order."""

    @abc.abstractmethod
    def wait_s(self, duration_s: float) -> None:
        """Let ``duration_s`` seconds pass on the chip's clock (virtual on the emulator)."""

    @abc.abstractmethod
    def temperature_c(self) -> float:
        """Return the chip temperature in °C."""

    def reset_devices(self, device_ids: np.ndarray, amplitude_v: float, width_ns: float) -> None:
        """Apply one RESET pulse of the given shape to each listed device."""
        count = len(device_ids)
        self.apply_pulses(
            np.asarray(device_ids, dtype=np.int64),
            np.full(count, PulseKind.RESET, dtype=np.uint8),
            np.full(count, amplitude_v, dtype=np.float64),
            np.full(count, width_ns, dtype=np.float64),
        )

    def close(self) -> None:
        """Release the chip; the emulator saves its state file here."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
