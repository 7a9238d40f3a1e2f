"""Published PCM device statistics that the emulator is calibrated against.

Source: IBM 90 nm doped-Ge2Sb2Te5 mushroom cells measured on a one-million-device array,
Joshi et al., "Accurate deep neural network inference using computational phase-change memory",
Nature Communications 11, 2473 (2020). The same expressions are the defaults of the PCM inference
noise model in IBM's aihwkit. Conductances are in µS, times in seconds; ``g`` is the conductance
normalised to ``G_MAX_US``.

These functions are the reference that tests and the fitter compare the emulator with. The
emulator itself reads its coefficients from ``calibration/data/pcm_default.toml``.
"""

from __future__ import annotations

import numpy as np

G_MAX_US = 25.0
"""Conductance that the largest weight maps to, in µS."""

T0_S = 20.0
"""Drift reference time after the last programming pulse, in s."""

T_READ_S = 250e-9
"""Duration of one read (integration time of the 1/f noise), in s."""

CONVERGED_FRACTION = 0.991
"""Share of devices with a non-zero target that program-and-verify brought into tolerance."""

MEDIAN_PROGRAMMING_ERROR_US = 0.94
"""Median absolute programming error over the reference ResNet-32, in µS."""

LEVELS_US = np.linspace(0.0, G_MAX_US, 11)
"""The 11 target levels at which the programming error was reported, in µS."""


def _normalised(g_us: np.ndarray | float) -> np.ndarray:
    g_us = np.asarray(g_us, dtype=np.float64)
    if np.any(~np.isfinite(g_us)) or np.any(g_us < 0):
        raise ValueError(f"conductances must be finite and >= 0 µS, got min {np.min(g_us)!r}")
    return g_us / G_MAX_US


def sigma_prog_us(g_us: np.ndarray | float) -> np.ndarray:
    """Return the standard deviation of the error left after program-and-verify, in µS.

    ``max(-1.1731 g² + 1.9650 g + 0.2635, 0)``: about 0.26 µS at 0 µS and at most about 1.09 µS.
    """
    g = _normalised(g_us)
    return np.maximum(-1.1731 * g**2 + 1.9650 * g + 0.2635, 0.0)


def drift_nu_mean(g_us: np.ndarray | float) -> np.ndarray:
    """Return the mean drift exponent ν of devices programmed to ``g_us`` (dimensionless).

    ``clip(-0.0155 ln g + 0.0244, 0.049, 0.1)``; ``g`` is floored at 1e-6 so that 0 µS is defined.
    """
    g = np.maximum(_normalised(g_us), 1e-6)
    return np.clip(-0.0155 * np.log(g) + 0.0244, 0.049, 0.1)


def drift_nu_std(g_us: np.ndarray | float) -> np.ndarray:
    """Return the device-to-device standard deviation of ν at ``g_us`` (dimensionless).

    ``clip(-0.0125 ln g - 0.0059, 0.008, 0.045)``; ``g`` is floored at 1e-6.
    """
    g = np.maximum(_normalised(g_us), 1e-6)
    return np.clip(-0.0125 * np.log(g) - 0.0059, 0.008, 0.045)


def read_noise_qs(g_us: np.ndarray | float) -> np.ndarray:
    """Return the 1/f read-noise coefficient Q_s at ``g_us`` (dimensionless).

    ``min(0.0088 / g^0.65, 0.2)``; at 0 µS the cap of 0.2 applies.
    """
    g = _normalised(g_us)
    with np.errstate(divide="ignore"):
        return np.minimum(0.0088 / g**0.65, 0.2)


def read_noise_sigma_us(g_us: np.ndarray | float, g_now_us: np.ndarray | float, t_s: np.ndarray | float) -> np.ndarray:
    """Return the 1/f read-noise standard deviation in µS of a read at age ``t_s``.

    ``G(t) · Q_s(g) · sqrt(ln((t + t_read) / (2 t_read)))``, with ``g_us`` the programmed level
    that sets Q_s and ``g_now_us`` the drifted conductance G(t) at the time of the read.
    """
    t_s = np.asarray(t_s, dtype=np.float64)
    if np.any(t_s <= 0):
        raise ValueError(f"read age must be > 0 s, got min {np.min(t_s)!r}")
    spread = np.sqrt(np.log((t_s + T_READ_S) / (2 * T_READ_S)))
    return np.asarray(g_now_us, dtype=np.float64) * read_noise_qs(g_us) * spread


def drift_factor(t_s: np.ndarray | float, nu: np.ndarray | float) -> np.ndarray:
    """Return G(t)/G(t0) = (t/t0)^(-ν) for a read at age ``t_s`` >= t0."""
    t_s = np.asarray(t_s, dtype=np.float64)
    if np.any(t_s < T0_S):
        raise ValueError(f"drift is defined from t0 = {T0_S} s on, got an age of {np.min(t_s)!r} s")
    return (t_s / T0_S) ** (-np.asarray(nu, dtype=np.float64))
