"""Shared helpers for the driver, server and contract tests: servers on loopback and a pty.

`TinyChip` is a test-only backend with trivial, deterministic physics. It exists so that the
framing and recovery tests do not depend on the calibrated emulator; the contract tests run
against `sim_backend.chip.EmulatedChip`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np

from drivers.controller import ChipController, RetryPolicy
from drivers.limits import validate_device_ids, validate_pulses
from drivers.transports import SerialTransport, VisaTransport
from hwctl.backend import Backend, Geometry, Identity, Limits, PulseKind
from sim_backend.faults import FaultPlan
from sim_backend.server import InstrumentProtocol, PtyInstrumentServer, TcpInstrumentServer

TINY_LIMITS = Limits(
    set_amplitude_min_v=0.5,
    set_amplitude_max_v=1.5,
    reset_amplitude_max_v=3.0,
    width_max_ns=1000.0,
    pulses_per_device_max=100,
    total_time_max_s=1e6,
    g_max_us=25.0,
    read_voltage_v=0.2,
)

#: Short timeouts and backoff so that fault tests finish in seconds.
FAST_RETRY = RetryPolicy(attempts=3, reconnects=6, backoff_s=0.05, backoff_max_s=0.4)


class TinyChip(Backend):
    """Test-only backend: G rises linearly with SET amplitude × width; reads add hashed noise.

    Every read and pulse advances a per-device event counter and the clock, so applying a batch
    twice, or reading twice, changes later results: exactly what the recovery tests must detect.
    """

    def __init__(self, seed: int = 0, geometry: Geometry = Geometry(1, 8, 16)) -> None:
        self.seed = seed
        self._geometry = geometry
        self.g_us = np.zeros(geometry.devices)
        self.events = np.zeros(geometry.devices, dtype=np.int64)
        self.clock = 0.0
        self.pulses_applied = 0

    def identity(self) -> Identity:
        return Identity("hwctl-tests", "TinyChip", f"seed{self.seed}", "0.1")

    def geometry(self) -> Geometry:
        return self._geometry

    def limits(self) -> Limits:
        return TINY_LIMITS

    def clock_s(self) -> float:
        return self.clock

    def apply_pulses(self, device_ids, kinds, amplitudes_v, widths_ns) -> None:
        validate_pulses(TINY_LIMITS, self._geometry.devices, device_ids, kinds, amplitudes_v, widths_ns)
        device_ids = np.asarray(device_ids)
        is_set = np.asarray(kinds) == PulseKind.SET
        step = 0.01 * np.asarray(amplitudes_v) * np.asarray(widths_ns) * (1 + 0.1 * self._noise(device_ids))
        self.g_us[device_ids] = np.where(is_set, np.minimum(self.g_us[device_ids] + step, 25.0), 0.05)
        self.events[device_ids] += 1
        self.clock += float(np.sum(widths_ns)) * 1e-9 + 1e-6 * len(device_ids)
        self.pulses_applied += len(device_ids)

    def read(self, device_ids) -> np.ndarray:
        device_ids = np.asarray(device_ids)
        validate_device_ids(self._geometry.devices, device_ids, require_unique=False)
        values = self.g_us[device_ids] + 0.01 * self._noise(device_ids)
        self.events[device_ids] += 1
        self.clock += 1e-6 * len(device_ids)
        return values

    def wait_s(self, duration_s: float) -> None:
        self.clock += duration_s

    def temperature_c(self) -> float:
        return 25.0

    def _noise(self, device_ids: np.ndarray) -> np.ndarray:
        mixed = (device_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            self.events[device_ids].astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        ) ^ np.uint64(self.seed)
        return (mixed >> np.uint64(11)).astype(np.float64) / 2.0**53 - 0.5


@contextlib.contextmanager
def tcp_server(backend: Backend, faults: FaultPlan | None = None, **options) -> Iterator[TcpInstrumentServer]:
    """Serve ``backend`` on a free loopback port for the duration of the block (deadline 120 s)."""
    server = TcpInstrumentServer(InstrumentProtocol(backend, faults), deadline_s=120.0, **options)
    with server:
        yield server


@contextlib.contextmanager
def pty_server(backend: Backend, faults: FaultPlan | None = None) -> Iterator[PtyInstrumentServer]:
    """Serve ``backend`` on a new pseudo-terminal for the duration of the block (deadline 120 s)."""
    server = PtyInstrumentServer(InstrumentProtocol(backend, faults), deadline_s=120.0)
    with server:
        yield server


def visa_controller(server: TcpInstrumentServer, timeout_s: float = 2.0, **options) -> ChipController:
    options.setdefault("retry", FAST_RETRY)
    return ChipController(VisaTransport(server.resource_name, timeout_s=timeout_s), **options)


def serial_controller(server: PtyInstrumentServer, timeout_s: float = 2.0, **options) -> ChipController:
    options.setdefault("retry", FAST_RETRY)
    return ChipController(SerialTransport(server.path, timeout_s=timeout_s), **options)


def assert_same_result(got, expected) -> None:
    """Assert that two `ProgramResult` objects are bit-identical, field by field."""
    for field in dataclasses.fields(expected):
        got_value, expected_value = getattr(got, field.name), getattr(expected, field.name)
        if isinstance(expected_value, np.ndarray):
            assert got_value.tobytes() == expected_value.tobytes(), field.name
        else:
            assert got_value == expected_value, field.name
