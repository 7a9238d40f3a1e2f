"""Counter-based random numbers: every draw is a pure function of its coordinates.

A draw is addressed by ``(seed, stream, device, event)``: the chip seed, a small integer naming
what the number is for (see ``Stream``), the flat device index and the device's own event number
(it counts that device's pulses and reads). The value never depends on which other devices were
in the same batch, on the batch order, or on whether the chip was saved and reloaded in between,
because nothing sequential is consumed.

The hash is the SplitMix64 output mixer (Stafford's "Mix13" shifts and multipliers) applied twice
to ``device << 32 | event``, keyed by the seed and the stream. It runs as a handful of vectorised
uint64 operations, which numpy wraps modulo 2**64.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_SHIFT1 = np.uint64(30)
_SHIFT2 = np.uint64(27)
_SHIFT3 = np.uint64(31)
_SHIFT32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)

MAX_DEVICES = 1 << 32
"""Device indices must be below this: they fill the upper 32 bits of the hashed word."""

MAX_EVENTS = 1 << 32
"""Per-device event numbers must be below this: they fill the lower 32 bits."""

STATIC_EVENT = MAX_EVENTS - 1
"""Event number reserved for a device's fixed properties (efficiency, drift draw, stuck flag)."""


class Stream(IntEnum):
    """Purpose of a draw. Each stream gives independent numbers for the same device and event."""

    RESET_LEVEL = 1
    SET_STEP = 2
    RELAXATION = 3
    READ_NOISE = 4
    EFFICIENCY = 10
    SATURATION = 11
    DRIFT_NU = 12
    STUCK = 13
    STUCK_KIND = 14
    STUCK_LEVEL = 15


def _mix_scalar(value: int) -> int:
    """Apply the same mixer to one Python int, for deriving keys."""
    value &= _MASK64
    value = ((value ^ (value >> 30)) * int(_MUL1)) & _MASK64
    value = ((value ^ (value >> 27)) * int(_MUL2)) & _MASK64
    return value ^ (value >> 31)


def _keys(seed: int, stream: int) -> tuple[np.uint64, np.uint64]:
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    first = _mix_scalar(seed * _GOLDEN_GAMMA + stream)
    second = _mix_scalar(first + _GOLDEN_GAMMA)
    return np.uint64(first), np.uint64(second)


def _mix_inplace(x: np.ndarray, scratch: np.ndarray) -> None:
    np.right_shift(x, _SHIFT1, out=scratch)
    x ^= scratch
    x *= _MUL1
    np.right_shift(x, _SHIFT2, out=scratch)
    x ^= scratch
    x *= _MUL2
    np.right_shift(x, _SHIFT3, out=scratch)
    x ^= scratch


def hash64(seed: int, stream: int, device: np.ndarray, event: np.ndarray | int) -> np.ndarray:
    """Return one uniformly distributed uint64 per ``(device, event)`` pair.

    ``device`` is an integer array of flat indices below `MAX_DEVICES`; ``event`` is an integer
    array of the same shape or one integer, below `MAX_EVENTS`.
    """
    device = np.asarray(device)
    event_array = np.asarray(event)
    if device.size and (device.min() < 0 or device.max() >= MAX_DEVICES):
        raise ValueError(f"device indices must lie in [0, {MAX_DEVICES}), got {device.min()}..{device.max()}")
    if event_array.size and (event_array.min() < 0 or event_array.max() >= MAX_EVENTS):
        raise ValueError(f"event numbers must lie in [0, {MAX_EVENTS}), got max {event_array.max()}")
    first, second = _keys(int(seed), int(stream))

    x = device.astype(np.uint64) << _SHIFT32
    x |= event_array.astype(np.uint64)
    x ^= first
    scratch = np.empty_like(x)
    _mix_inplace(x, scratch)
    x ^= second
    _mix_inplace(x, scratch)
    return x


def uniform(seed: int, stream: int, device: np.ndarray, event: np.ndarray | int) -> np.ndarray:
    """Return uniform float64 numbers in [0, 1), 53 bits each, one per ``(device, event)``."""
    bits = hash64(seed, stream, device, event)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal(seed: int, stream: int, device: np.ndarray, event: np.ndarray | int) -> np.ndarray:
    """Return standard-normal float64 numbers, one per ``(device, event)``, by Box-Muller.

    The upper 32 bits of the hash give the radius uniform in (0, 1] and the lower 32 bits the
    angle, so the largest magnitude is sqrt(-2 ln 2**-32), about 6.7.
    """
    bits = hash64(seed, stream, device, event)
    radius_u = ((bits >> _SHIFT32).astype(np.float64) + 1.0) * (1.0 / (1 << 32))
    angle_u = (bits & _LOW32).astype(np.float64) * (2.0 * np.pi / (1 << 32))
    np.log(radius_u, out=radius_u)
    radius_u *= -2.0
    np.sqrt(radius_u, out=radius_u)
    np.cos(angle_u, out=angle_u)
    radius_u *= angle_u
    return radius_u
