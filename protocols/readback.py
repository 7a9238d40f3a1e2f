"""Batched read-back of device conductances on the `hwctl.backend.Backend` primitives."""

from __future__ import annotations

import logging

import numpy as np

from hwctl.backend import Backend

logger = logging.getLogger(__name__)


def _check_ids(device_ids: np.ndarray, batch_size: int) -> np.ndarray:
    ids = np.asarray(device_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"device_ids must be a 1-D integer array, got shape {ids.shape} and dtype {ids.dtype}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return ids.astype(np.int64)


def read_devices(backend: Backend, device_ids: np.ndarray, batch_size: int = 65_536) -> np.ndarray:
    """Read every listed device once, ``batch_size`` devices per backend call; return µS in list order."""
    ids = _check_ids(device_ids, batch_size)
    g_us = np.empty(ids.size)
    for first in range(0, ids.size, batch_size):
        chosen = slice(first, first + batch_size)
        g_us[chosen] = backend.read(ids[chosen])
    return g_us


def read_at_age(
    backend: Backend,
    device_ids: np.ndarray,
    t_programmed_s: np.ndarray,
    age_s: float,
    batch_size: int = 65_536,
    group_s: float = 1.0,
) -> np.ndarray:
    """Read each device once when it is ``age_s`` to ``age_s + group_s`` old; return µS in list order.

    Devices are grouped by programming time into windows of ``group_s`` seconds and each window
    is read when its latest device reaches ``age_s``, waiting on the chip clock in between (a
    window's reads take their own time on top). Raises ValueError, before reading anything, if
    the earliest device is already older than ``age_s``.
    """
    ids = _check_ids(device_ids, batch_size)
    t_programmed_s = np.asarray(t_programmed_s, dtype=np.float64)
    if t_programmed_s.shape != ids.shape or not np.all(np.isfinite(t_programmed_s)):
        raise ValueError("t_programmed_s must hold one finite chip time per device")
    if not np.isfinite(age_s) or age_s < 0 or not np.isfinite(group_s) or group_s <= 0:
        raise ValueError(f"age_s must be >= 0 and group_s > 0 seconds, got {age_s!r} and {group_s!r}")
    g_us = np.empty(ids.size)
    if ids.size == 0:
        return g_us
    earliest = float(t_programmed_s.min())
    late_s = backend.clock_s() - (earliest + age_s)
    if late_s > 0:
        raise ValueError(
            f"the device programmed at chip time {earliest:.3f} s is already {late_s:.3f} s past the "
            f"requested age of {age_s} s; read sooner after programming or ask for a larger age"
        )

    order = np.argsort(t_programmed_s, kind="stable")
    window = np.floor((t_programmed_s[order] - earliest) / group_s).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, window[1:] != window[:-1]])
    ends = np.r_[starts[1:], order.size]
    for start, end in zip(starts, ends):
        rows = order[start:end]
        remaining = t_programmed_s[rows[-1]] + age_s - backend.clock_s()
        if remaining > 0:
            backend.wait_s(remaining)
        g_us[rows] = read_devices(backend, ids[rows], batch_size)
    return g_us
