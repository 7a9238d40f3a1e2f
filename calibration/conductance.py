"""Weight ↔ conductance converters for differential device pairs, W ∝ G+ − G−.

A layer's weights are scaled by its largest magnitude ``w_max``. A positive weight is programmed
on G+ to ``|W| / w_max · G_max`` with G− left in RESET (target 0 µS); a negative weight the other
way round. Read-back weights are ``(G+ − G−) · w_max / G_max``. The two functions are exact
inverses on the targets (up to floating-point rounding).
"""

from __future__ import annotations

import numpy as np


def _check_scale(w_max: np.ndarray | float, g_max_us: float) -> np.ndarray:
    w_max = np.asarray(w_max, dtype=np.float64)
    if not np.all(np.isfinite(w_max)) or np.any(w_max <= 0):
        raise ValueError(f"w_max must be finite and > 0, got min {np.min(w_max)!r}; a layer of all-zero weights has no scale")
    if not np.isfinite(g_max_us) or g_max_us <= 0:
        raise ValueError(f"g_max_us must be finite and > 0 µS, got {g_max_us!r}")
    return w_max


def layer_w_max(weights: np.ndarray) -> float:
    """Return a layer's scale ``max |W|``; raise ValueError for empty, non-finite or all-zero weights."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.size == 0 or not np.all(np.isfinite(weights)):
        raise ValueError("weights must be a non-empty array of finite numbers")
    w_max = float(np.max(np.abs(weights)))
    if w_max == 0:
        raise ValueError("all weights are zero: the layer has no scale to map onto conductances")
    return w_max


def weights_to_conductances(
    weights: np.ndarray, w_max: np.ndarray | float, g_max_us: float = 25.0
) -> tuple[np.ndarray, np.ndarray]:
    """Return the target conductances (G+, G−) in µS of each weight's device pair.

    ``w_max`` is one number or an array broadcastable to ``weights`` (one scale per weight, for
    weights of several layers). Raises ValueError if a weight's magnitude exceeds its ``w_max``
    (it would need more than ``g_max_us``) or is not finite; nothing is clipped.
    """
    weights = np.asarray(weights, dtype=np.float64)
    w_max = _check_scale(w_max, g_max_us)
    if not np.all(np.isfinite(weights)):
        raise ValueError("weights must be finite")
    magnitude = np.abs(weights) / w_max
    over = np.flatnonzero(np.broadcast_to(magnitude, weights.shape).ravel() > 1.0)
    if over.size:
        index = int(over[0])
        raise ValueError(
            f"weight {weights.ravel()[index]!r} at flat index {index} exceeds its w_max; "
            "use the layer's max |W| as w_max"
        )
    g_target = magnitude * g_max_us
    g_plus = np.where(weights > 0, g_target, 0.0)
    g_minus = np.where(weights < 0, g_target, 0.0)
    return g_plus, g_minus


def conductances_to_weights(
    g_plus_us: np.ndarray, g_minus_us: np.ndarray, w_max: np.ndarray | float, g_max_us: float = 25.0
) -> np.ndarray:
    """Return the weights ``(G+ − G−) · w_max / g_max_us`` of read-back conductance pairs in µS.

    Read-back conductances may be anything the chip reports (drift and noise included), so they
    are not range-checked beyond being finite and of matching shape.
    """
    g_plus_us = np.asarray(g_plus_us, dtype=np.float64)
    g_minus_us = np.asarray(g_minus_us, dtype=np.float64)
    if g_plus_us.shape != g_minus_us.shape:
        raise ValueError(f"G+ and G− must have the same shape, got {g_plus_us.shape} and {g_minus_us.shape}")
    if not (np.all(np.isfinite(g_plus_us)) and np.all(np.isfinite(g_minus_us))):
        raise ValueError("conductances must be finite")
    w_max = _check_scale(w_max, g_max_us)
    return (g_plus_us - g_minus_us) * (w_max / g_max_us)
