"""The emulated PCM chip: device physics behind the `hwctl.backend.Backend` primitives.

The chip addresses one device at a time. Every pulse advances its virtual clock by the pulse
width plus an addressing overhead, every read by the read time, and `wait_s` by the time asked
for. The clock is kept in integer nanoseconds, so that splitting a batch into several calls
yields exactly the same per-device times. Each device remembers the clock at its last effective
programming pulse, and drift, relaxation and read noise use that device's own age.

Random numbers come from `sim_backend.rng`, addressed by (seed, stream, device, event number),
where the event number counts that device's pulses and reads. Results therefore do not depend on
batch size, batch order or a save and reload in between, as long as each device receives the
same sequence of pulses and reads at the same ages.

A state file (``state_path``, numpy ``.npz``) holds everything that changes: per-device
conductance after the last pulse, relaxation offset, time of the last pulse, drift draw, event
counter, and the clock. Fixed device properties (efficiency, saturation conductance, stuck flags)
are recomputed from the seed and the parameters, whose digest the file records.

With ``clock="wall"`` the clock also follows the host's wall time, as a real chip's clock does.
It never runs slower than the host clock, and `wait_s` sleeps for real. A chip loaded from a
state file adds the wall time that passed since the file was saved. Modelled pulse and read
durations still advance it, so it may run ahead of wall time by their excess over the time the
computation took. This mode is for testing wall-clock schedules; results are not reproducible.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

import hwctl
from hwctl.backend import Backend, Geometry, Identity, Limits, LimitError, PulseKind
from sim_backend import physics, rng
from sim_backend.physics import DeviceParams
from sim_backend.rng import Stream

logger = logging.getLogger(__name__)

DEFAULT_GEOMETRY = Geometry(arrays=1, rows=512, cols=2048)
STATE_FORMAT_VERSION = 1

STUCK_NONE = 0
STUCK_LOW = 1
STUCK_HIGH = 2

_NS = 1e-9
_MAX_CLOCK_NS = 1 << 62
CLOCK_MODES = ("virtual", "wall")


class ChipStateError(ValueError):
    """A chip state file does not belong to this chip (seed, geometry or parameters differ)."""


class EmulatedChip(Backend):
    """A calibrated software PCM chip, in this process, with a virtual clock.

    ``params`` defaults to ``calibration/data/pcm_default.toml``; ``stuck_fraction`` overrides the
    parameter of that name. When ``state_path`` exists the chip continues from that state, and
    `close` and `save_state` write it back. ``clock`` is ``"virtual"`` (the default: only pulses,
    reads and waits move the clock) or ``"wall"`` (see the module docstring).
    """

    def __init__(
        self,
        seed: int = 0,
        params: DeviceParams | None = None,
        geometry: Geometry | None = None,
        state_path: str | Path | None = None,
        stuck_fraction: float | None = None,
        clock: str = "virtual",
    ) -> None:
        if clock not in CLOCK_MODES:
            raise ValueError(f"clock must be one of {CLOCK_MODES}, got {clock!r}")
        if params is None:
            from calibration.params import load_params

            params = load_params()
        if stuck_fraction is not None:
            params = dataclasses.replace(params, stuck_fraction=float(stuck_fraction))
        geometry = DEFAULT_GEOMETRY if geometry is None else geometry
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if min(geometry.arrays, geometry.rows, geometry.cols) < 1 or geometry.devices > rng.MAX_DEVICES:
            raise ValueError(
                f"geometry must have positive dimensions and at most {rng.MAX_DEVICES} devices, got {geometry}"
            )

        self._seed = int(seed)
        self._params = params
        self._geometry = geometry
        self._digest = params.digest()
        self._state_path = None if state_path is None else Path(state_path)
        self._lock = threading.RLock()
        self._closed = False
        count = geometry.devices
        self._mark = np.full(count, -1, dtype=np.int64)

        devices = np.arange(count, dtype=np.int64)
        self._draw_fixed_properties(devices)

        # Until the state is in place the clock only counts from zero, even on wall time.
        self._wall_clock = False
        if self._state_path is not None and self._state_path.exists():
            self._load_state(self._state_path)
        else:
            self._initialise_state(devices)

        self._wall_clock = clock == "wall"
        if self._wall_clock and self._saved_unix_s is not None:
            # A real chip's clock kept running while no process held it.
            self._clock_ns += max(0, int(round((time.time() - self._saved_unix_s) * 1e9)))
        self._anchor_clock_ns = self._clock_ns
        self._anchor_monotonic_ns = time.monotonic_ns()

    # Fixed device properties and the fresh state ---------------------------------------------

    def _draw_fixed_properties(self, devices: np.ndarray) -> None:
        params, seed, event = self._params, self._seed, rng.STATIC_EVENT
        self._efficiency = np.exp(params.set_efficiency_sigma_ln * rng.normal(seed, Stream.EFFICIENCY, devices, event))
        self._g_sat_us = params.set_g_sat_us * np.exp(
            params.set_g_sat_sigma_ln * rng.normal(seed, Stream.SATURATION, devices, event)
        )

        is_stuck = rng.uniform(seed, Stream.STUCK, devices, event) < params.stuck_fraction
        is_high = rng.uniform(seed, Stream.STUCK_KIND, devices, event) < params.stuck_high_share
        self._stuck = np.where(is_stuck, np.where(is_high, STUCK_HIGH, STUCK_LOW), STUCK_NONE).astype(np.int8)
        median = np.where(is_high, params.stuck_high_median_us, params.stuck_low_median_us)
        stuck_level = median * np.exp(params.stuck_sigma_ln * rng.normal(seed, Stream.STUCK_LEVEL, devices, event))
        self._stuck_level_us = np.where(is_stuck, stuck_level, 0.0)

    def _initialise_state(self, devices: np.ndarray) -> None:
        """Start as a chip whose devices were all RESET at clock 0."""
        params, seed, event = self._params, self._seed, rng.STATIC_EVENT
        g_reset = physics.reset_conductance_us(params, rng.normal(seed, Stream.RESET_LEVEL, devices, event))
        self._g_pulse_us = np.where(self._stuck != STUCK_NONE, self._stuck_level_us, g_reset)
        self._relax_us = np.zeros(devices.size)
        self._t_pulse_ns = np.zeros(devices.size, dtype=np.int64)
        self._events = np.zeros(devices.size, dtype=np.uint32)
        self._nu_z = rng.normal(seed, Stream.DRIFT_NU, devices, event)
        self._clock_ns = 0
        self._saved_unix_s = None

    # Backend primitives ----------------------------------------------------------------------

    def identity(self) -> Identity:
        return Identity(
            manufacturer="hwctl",
            model="emulated-pcm",
            serial=f"seed{self._seed}-{self._digest[:12]}",
            firmware=f"hwctl-{hwctl.__version__}",
        )

    def geometry(self) -> Geometry:
        return self._geometry

    def limits(self) -> Limits:
        params = self._params
        return Limits(
            set_amplitude_min_v=params.limits_set_amplitude_min_v,
            set_amplitude_max_v=params.limits_set_amplitude_max_v,
            reset_amplitude_max_v=params.limits_reset_amplitude_max_v,
            width_max_ns=params.limits_width_max_ns,
            pulses_per_device_max=params.limits_pulses_per_device_max,
            total_time_max_s=params.limits_total_time_max_s,
            g_max_us=params.chip_g_max_us,
            read_voltage_v=params.read_voltage_v,
        )

    def clock_s(self) -> float:
        with self._lock:
            self._follow_wall_clock()
            return self._clock_ns * _NS

    @property
    def clock_is_virtual(self) -> bool:
        """True when only pulses, reads and waits move the clock (not wall time)."""
        return not self._wall_clock

    def temperature_c(self) -> float:
        return physics.temperature_c(self._params, self.clock_s())

    def wait_s(self, duration_s: float) -> None:
        duration_s = float(duration_s)
        if not np.isfinite(duration_s) or duration_s < 0:
            raise ValueError(f"wait duration must be a finite number of seconds >= 0, got {duration_s!r}")
        duration_ns = int(round(duration_s * 1e9))
        if not self._wall_clock:
            with self._lock:
                self._check_open()
                self._advance_clock(duration_ns)
            return

        with self._lock:
            self._check_open()
            self._follow_wall_clock()
            target_ns = self._clock_ns + duration_ns
            self._check_clock(target_ns)
        # The lock is released while sleeping, so other threads can call `clock_s` meanwhile.
        time.sleep(max(0.0, (target_ns - self._wall_clock_ns()) * _NS))
        with self._lock:
            self._follow_wall_clock()
            self._clock_ns = max(self._clock_ns, target_ns)

    def apply_pulses(
        self,
        device_ids: np.ndarray,
        kinds: np.ndarray,
        amplitudes_v: np.ndarray,
        widths_ns: np.ndarray,
    ) -> None:
        with self._lock:
            self._check_open()
            self._follow_wall_clock()
            ids, kinds, amplitudes_v, widths_ns = self._validate_pulses(device_ids, kinds, amplitudes_v, widths_ns)
            if ids.size == 0:
                return
            params = self._params
            events = self._next_events(ids)

            # Each pulse ends at its own time: the device is addressed, then pulsed.
            durations_ns = np.rint(widths_ns + params.timing_address_ns).astype(np.int64)
            t_end_ns = self._clock_ns + np.cumsum(durations_ns)
            self._check_clock(int(t_end_ns[-1]))

            # Whatever part of the previous relaxation has developed stays in the device.
            age_s = (t_end_ns - self._t_pulse_ns[ids]) * _NS
            g_before = self._settled_conductance_us(ids, age_s)

            is_reset = (kinds == PulseKind.RESET) & physics.reset_melts(params, amplitudes_v)
            drive = np.where(kinds == PulseKind.SET, physics.set_drive(params, amplitudes_v, widths_ns), 0.0)
            is_set = drive > 0
            changes = (is_reset | is_set) & (self._stuck[ids] == STUCK_NONE)

            g_after = g_before.copy()
            relax_after = np.zeros(ids.size)
            reset_rows = np.flatnonzero(is_reset & changes)
            if reset_rows.size:
                z_level = rng.normal(self._seed, Stream.RESET_LEVEL, ids[reset_rows], events[reset_rows])
                g_after[reset_rows] = physics.reset_conductance_us(params, z_level)
            set_rows = np.flatnonzero(is_set & changes)
            if set_rows.size:
                set_ids = ids[set_rows]
                z_cycle = rng.normal(self._seed, Stream.SET_STEP, set_ids, events[set_rows])
                step = physics.set_step_us(
                    params, g_before[set_rows], drive[set_rows], self._efficiency[set_ids], self._g_sat_us[set_ids], z_cycle
                )
                g_after[set_rows] += step
                z_relax = rng.normal(self._seed, Stream.RELAXATION, set_ids, events[set_rows])
                relax_after[set_rows] = physics.relaxation_sigma_us(params, g_after[set_rows]) * z_relax

            changed = np.flatnonzero(changes)
            changed_ids = ids[changed]
            self._g_pulse_us[changed_ids] = g_after[changed]
            self._relax_us[changed_ids] = relax_after[changed]
            self._t_pulse_ns[changed_ids] = t_end_ns[changed]
            self._events[ids] = events + 1
            self._clock_ns = int(t_end_ns[-1])

    def read(self, device_ids: np.ndarray) -> np.ndarray:
        with self._lock:
            self._check_open()
            self._follow_wall_clock()
            ids = self._validate_ids(device_ids)
            if ids.size == 0:
                return np.zeros(0)
            params = self._params
            events = self._next_events(ids)

            read_ns = int(round(params.timing_read_ns))
            t_read_ns = self._clock_ns + read_ns * np.arange(1, ids.size + 1, dtype=np.int64)
            self._check_clock(int(t_read_ns[-1]))
            age_s = (t_read_ns - self._t_pulse_ns[ids]) * _NS

            g_settled = self._settled_conductance_us(ids, age_s)
            g_now = g_settled * self._drift_factor(ids, g_settled, age_s)
            # NOTE: each read draws fresh noise. On a real chip, reads much closer together than
            # the device's age share the slow part of the 1/f noise, so averaging them helps less.
            sigma = physics.read_noise_sigma_us(params, g_settled, g_now, age_s)
            g_noisy = g_now + sigma * rng.normal(self._seed, Stream.READ_NOISE, ids, events)

            self._events[ids] = events + 1
            self._clock_ns = int(t_read_ns[-1])
            return physics.adc_quantise_us(params, g_noisy)

    def close(self) -> None:
        """Save the state file, if the chip has one, and reject further calls."""
        with self._lock:
            if self._closed:
                return
            if self._state_path is not None:
                self.save_state()
            self._closed = True

    # Emulator-only inspection and state ------------------------------------------------------

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def params(self) -> DeviceParams:
        return self._params

    @property
    def state_path(self) -> Path | None:
        """State file that `close` and `save_state` write, or None."""
        return self._state_path

    def conductance_us(self, device_ids: np.ndarray, at_s: float | np.ndarray | None = None) -> np.ndarray:
        """Return the noiseless conductance at chip time ``at_s`` (default: now), in µS.

        ``at_s`` is one time or one per device. Emulator only: a real chip can only be read with
        noise. Neither the clock nor the event counters move, so calling this changes no later
        result.
        """
        with self._lock:
            ids = self._validate_ids(device_ids)
            if at_s is None:
                age_s = (self._clock_ns - self._t_pulse_ns[ids]) * _NS
            else:
                age_s = np.asarray(at_s, dtype=np.float64) - self._t_pulse_ns[ids] * _NS
            if np.any(age_s < 0):
                raise ValueError("at_s lies before the last pulse of a listed device")
            g_settled = self._settled_conductance_us(ids, age_s)
            return g_settled * self._drift_factor(ids, g_settled, age_s)

    def programmed_state(self, device_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return each device's conductance right after its last pulse and its relaxation offset, in µS.

        Emulator only. These depend on the device's own pulse history, not on the clock, so they
        are the arrays to compare when checking that batching does not change results.
        """
        with self._lock:
            ids = self._validate_ids(device_ids)
            return self._g_pulse_us[ids].copy(), self._relax_us[ids].copy()

    def event_counts(self, device_ids: np.ndarray) -> np.ndarray:
        """Return how many pulses and reads each device has seen (its next event number)."""
        with self._lock:
            ids = self._validate_ids(device_ids)
            return self._events[ids].astype(np.int64)

    def last_pulse_s(self, device_ids: np.ndarray) -> np.ndarray:
        """Return the chip time of each device's last effective programming pulse, in s."""
        with self._lock:
            ids = self._validate_ids(device_ids)
            return self._t_pulse_ns[ids] * _NS

    def stuck_kind(self, device_ids: np.ndarray) -> np.ndarray:
        """Return `STUCK_NONE`, `STUCK_LOW` or `STUCK_HIGH` per device (emulator only)."""
        with self._lock:
            ids = self._validate_ids(device_ids)
            return self._stuck[ids].copy()

    def save_state(self, path: str | Path | None = None) -> Path:
        """Write the chip state atomically (temporary file, then rename) and return its path."""
        with self._lock:
            path = self._state_path if path is None else Path(path)
            if path is None:
                raise ValueError("this chip has no state_path; pass the path to save_state")
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            with open(temporary, "wb") as handle:
                np.savez(
                    handle,
                    format_version=np.int64(STATE_FORMAT_VERSION),
                    seed=np.uint64(self._seed),
                    geometry=np.array(
                        [self._geometry.arrays, self._geometry.rows, self._geometry.cols], dtype=np.int64
                    ),
                    params_digest=np.array(self._digest),
                    clock_ns=np.int64(self._clock_ns),
                    g_pulse_us=self._g_pulse_us,
                    relax_us=self._relax_us,
                    t_pulse_ns=self._t_pulse_ns,
                    events=self._events,
                    nu_z=self._nu_z,
                    saved_unix_s=np.float64(time.time()),
                )
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            logger.info("saved chip state to %s at chip time %.6f s", path, self.clock_s())
            return path

    def _load_state(self, path: Path) -> None:
        try:
            self._read_state(path)
        except (ValueError, OSError, KeyError, EOFError) as error:
            if isinstance(error, ChipStateError):
                raise
            raise ChipStateError(
                f"{path} is not an emulated chip state file ({error}); point the state file "
                "option at the .npz file the emulator wrote, or at a new path for a new chip"
            ) from error

    def _read_state(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as data:
            version = int(data["format_version"])
            if version != STATE_FORMAT_VERSION:
                raise ChipStateError(f"{path}: state format {version}, this emulator reads {STATE_FORMAT_VERSION}")
            seed = int(data["seed"])
            if seed != self._seed:
                raise ChipStateError(
                    f"{path} contains the chip with seed {seed}, not {self._seed}; pass seed={seed} or another state_path"
                )
            geometry = Geometry(*(int(value) for value in data["geometry"]))
            if geometry != self._geometry:
                raise ChipStateError(f"{path} contains a chip of geometry {geometry}, not {self._geometry}")
            digest = str(data["params_digest"])
            if digest != self._digest:
                raise ChipStateError(
                    f"{path} was written with parameters of digest {digest[:12]}, these have {self._digest[:12]};"
                    " load the same parameter file and stuck_fraction, or start a new state file"
                )
            count = self._geometry.devices
            arrays = {
                "g_pulse_us": np.float64,
                "relax_us": np.float64,
                "t_pulse_ns": np.int64,
                "events": np.uint32,
                "nu_z": np.float64,
            }
            for name, dtype in arrays.items():
                array = data[name]
                if array.shape != (count,) or array.dtype != dtype:
                    raise ChipStateError(f"{path}: {name} has shape {array.shape} and type {array.dtype}")
                setattr(self, f"_{name}", array.copy())
            self._clock_ns = int(data["clock_ns"])
            # Files written before this field existed load as if saved just now.
            self._saved_unix_s = float(data["saved_unix_s"]) if "saved_unix_s" in data.files else None
        logger.info("loaded chip state from %s at chip time %.6f s", path, self.clock_s())

    # Helpers ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the emulated chip is closed; create a new EmulatedChip to continue")

    def _wall_clock_ns(self) -> int:
        return self._anchor_clock_ns + time.monotonic_ns() - self._anchor_monotonic_ns

    def _follow_wall_clock(self) -> None:
        """In wall-clock mode, move the clock up to the host's wall time; never move it back."""
        if self._wall_clock:
            self._clock_ns = max(self._clock_ns, self._wall_clock_ns())

    def _advance_clock(self, duration_ns: int) -> None:
        self._check_clock(self._clock_ns + duration_ns)
        self._clock_ns += duration_ns

    def _check_clock(self, clock_ns: int) -> None:
        if clock_ns >= _MAX_CLOCK_NS:
            raise OverflowError(f"chip clock would pass {_MAX_CLOCK_NS * _NS:.3g} s")

    def _next_events(self, ids: np.ndarray) -> np.ndarray:
        events = self._events[ids]
        if events.size and int(events.max()) >= rng.STATIC_EVENT - 1:
            raise OverflowError("a device has used up its event counter (2**32 - 2 pulses and reads)")
        return events

    def _settled_conductance_us(self, ids: np.ndarray, age_s: np.ndarray) -> np.ndarray:
        """Return conductance after the last pulse plus the part of its relaxation developed by ``age_s``."""
        relax = self._relax_us[ids]
        g = self._g_pulse_us[ids].copy()
        moving = np.flatnonzero(relax)
        if moving.size:
            g[moving] += relax[moving] * physics.relaxation_fraction(self._params, age_s[moving])
            np.maximum(g, 0.0, out=g)
        return g

    def _drift_factor(self, ids: np.ndarray, g_settled: np.ndarray, age_s: np.ndarray) -> np.ndarray:
        factor = np.ones(ids.size)
        drifting = np.flatnonzero(age_s > self._params.drift_t0_s)
        if drifting.size:
            nu = physics.drift_nu(self._params, g_settled[drifting], self._nu_z[ids[drifting]])
            factor[drifting] = physics.drift_factor(self._params, age_s[drifting], nu)
        return factor

    def _validate_ids(self, device_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(device_ids)
        if ids.ndim != 1:
            raise LimitError(f"device_ids must be a 1-D array, got shape {ids.shape}")
        if ids.size == 0:
            return ids.astype(np.int64)
        if not np.issubdtype(ids.dtype, np.integer):
            raise LimitError(f"device_ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        count = self._geometry.devices
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= count:
            bad = low if low < 0 else high
            raise LimitError(f"device id {bad} is outside this chip's range 0..{count - 1}")
        positions = np.arange(ids.size, dtype=np.int64)
        self._mark[ids] = positions
        repeated = np.flatnonzero(self._mark[ids] != positions)
        if repeated.size:
            raise LimitError(f"device id {int(ids[repeated[0]])} appears more than once in one batch; ids must be unique")
        return ids

    def _validate_pulses(
        self, device_ids: np.ndarray, kinds: np.ndarray, amplitudes_v: np.ndarray, widths_ns: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ids = self._validate_ids(device_ids)
        kinds = np.asarray(kinds)
        amplitudes_v = np.asarray(amplitudes_v, dtype=np.float64)
        widths_ns = np.asarray(widths_ns, dtype=np.float64)
        for name, array in (("kinds", kinds), ("amplitudes_v", amplitudes_v), ("widths_ns", widths_ns)):
            if array.shape != ids.shape:
                raise LimitError(f"{name} has shape {array.shape}, device_ids has {ids.shape}; give one value per device")
        if ids.size == 0:
            return ids, kinds.astype(np.uint8), amplitudes_v, widths_ns
        if not np.issubdtype(kinds.dtype, np.integer):
            raise LimitError(f"kinds must be integer PulseKind values, got dtype {kinds.dtype}")
        known = (kinds == PulseKind.RESET) | (kinds == PulseKind.SET)
        if not known.all():
            raise LimitError(
                f"pulse kind {int(kinds[~known][0])} is unknown; use {int(PulseKind.RESET)} (RESET) or {int(PulseKind.SET)} (SET)"
            )
        limits = self.limits()
        _reject_outside(widths_ns, 0.0, limits.width_max_ns, "pulse width", "ns", "width_max_ns", ids, low_open=True)
        is_set = kinds == PulseKind.SET
        _reject_outside(
            amplitudes_v[is_set], limits.set_amplitude_min_v, limits.set_amplitude_max_v,
            "SET amplitude", "V", "set_amplitude_min_v/max_v", ids[is_set],
        )
        _reject_outside(
            amplitudes_v[~is_set], 0.0, limits.reset_amplitude_max_v,
            "RESET amplitude", "V", "reset_amplitude_max_v", ids[~is_set], low_open=True,
        )
        return ids, kinds.astype(np.uint8), amplitudes_v, widths_ns


def _reject_outside(
    values: np.ndarray,
    low: float,
    high: float,
    quantity: str,
    unit: str,
    limit_name: str,
    ids: np.ndarray,
    low_open: bool = False,
) -> None:
    """Raise `LimitError` for the first value outside [low, high] (or (low, high]), or not finite."""
    if values.size == 0:
        return
    below = values <= low if low_open else values < low
    bad = np.flatnonzero(below | (values > high) | ~np.isfinite(values))
    if bad.size:
        index = bad[0]
        bracket = "(" if low_open else "["
        raise LimitError(
            f"{quantity} {float(values[index])!r} {unit} for device {int(ids[index])} is outside the limit "
            f"{bracket}{low}, {high}] {unit} ({limit_name}); nothing was applied"
        )
