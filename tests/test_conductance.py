"""Weight ↔ conductance converters for differential pairs."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.conductance import conductances_to_weights, layer_w_max, weights_to_conductances


def test_round_trip_is_exact() -> None:
    weights = np.random.default_rng(0).standard_normal(10_000) * 0.03
    w_max = layer_w_max(weights)
    g_plus, g_minus = weights_to_conductances(weights, w_max, 25.0)
    assert np.allclose(conductances_to_weights(g_plus, g_minus, w_max, 25.0), weights, rtol=1e-12, atol=0)


def test_sign_chooses_the_device() -> None:
    weights = np.array([0.5, -0.25, 0.0, -1.0, 1.0])
    g_plus, g_minus = weights_to_conductances(weights, 1.0, 25.0)
    assert np.array_equal(g_plus, [12.5, 0.0, 0.0, 0.0, 25.0])
    assert np.array_equal(g_minus, [0.0, 6.25, 0.0, 25.0, 0.0])


def test_largest_weight_maps_to_g_max() -> None:
    weights = np.array([0.1, -0.4, 0.2])
    g_plus, g_minus = weights_to_conductances(weights, layer_w_max(weights), 20.0)
    assert max(g_plus.max(), g_minus.max()) == 20.0


def test_per_weight_scales_broadcast() -> None:
    weights = np.array([1.0, 2.0, -3.0, 0.5])
    w_max = np.array([1.0, 4.0, 3.0, 0.5])
    g_plus, g_minus = weights_to_conductances(weights, w_max, 25.0)
    assert np.array_equal(g_plus - g_minus, [25.0, 12.5, -25.0, 25.0])
    assert np.allclose(conductances_to_weights(g_plus, g_minus, w_max, 25.0), weights)


def test_read_back_of_drifted_pair() -> None:
    assert conductances_to_weights(np.array([10.0]), np.array([2.5]), 0.2, 25.0)[0] == pytest.approx(0.06)


@pytest.mark.parametrize(
    ("weights", "w_max", "g_max", "message"),
    [
        (np.array([0.5, 1.2]), 1.0, 25.0, "exceeds its w_max"),
        (np.array([0.5]), 0.0, 25.0, "w_max must be finite and > 0"),
        (np.array([0.5]), np.nan, 25.0, "w_max"),
        (np.array([0.5]), 1.0, -25.0, "g_max_us"),
        (np.array([np.inf]), 1.0, 25.0, "finite"),
    ],
)
def test_forward_rejects_bad_arguments(weights, w_max, g_max, message) -> None:
    with pytest.raises(ValueError, match=message):
        weights_to_conductances(weights, w_max, g_max)


def test_inverse_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="same shape"):
        conductances_to_weights(np.ones(3), np.ones(4), 1.0)
    with pytest.raises(ValueError, match="finite"):
        conductances_to_weights(np.array([np.nan]), np.ones(1), 1.0)
    with pytest.raises(ValueError, match="w_max"):
        conductances_to_weights(np.ones(1), np.ones(1), -1.0)


def test_layer_scale_rejects_empty_and_zero_layers() -> None:
    with pytest.raises(ValueError, match="all weights are zero"):
        layer_w_max(np.zeros(5))
    with pytest.raises(ValueError, match="non-empty"):
        layer_w_max(np.array([]))
