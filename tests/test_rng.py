"""Counter-based random numbers: purity, distribution and independence of the draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim_backend import rng


def test_draws_ignore_chunking_and_order() -> None:
    devices = np.arange(10_000, dtype=np.int64)
    events = (devices * 7) % 13
    whole = rng.normal(5, rng.Stream.READ_NOISE, devices, events)

    order = np.random.default_rng(1).permutation(devices.size)
    shuffled = np.empty(devices.size)
    shuffled[order] = rng.normal(5, rng.Stream.READ_NOISE, devices[order], events[order])
    pieces = np.concatenate(
        [rng.normal(5, rng.Stream.READ_NOISE, devices[i : i + 777], events[i : i + 777]) for i in range(0, devices.size, 777)]
    )

    assert np.array_equal(whole, shuffled)
    assert np.array_equal(whole, pieces)


def test_every_coordinate_changes_the_draw() -> None:
    devices = np.arange(1000)
    base = rng.hash64(3, 1, devices, 4)

    assert not np.any(base == rng.hash64(4, 1, devices, 4))
    assert not np.any(base == rng.hash64(3, 2, devices, 4))
    assert not np.any(base == rng.hash64(3, 1, devices, 5))
    assert not np.any(base == rng.hash64(3, 1, devices + 1000, 4))
    assert np.unique(base).size == base.size


def test_uniform_moments() -> None:
    values = rng.uniform(11, 1, np.arange(1_000_000), 0)
    assert values.min() >= 0.0
    assert values.max() < 1.0
    # Standard errors: mean 0.00029, variance 0.000075.
    assert abs(values.mean() - 0.5) < 0.0015
    assert abs(values.var() - 1 / 12) < 0.0005
    counts = np.bincount((values * 20).astype(int), minlength=20)
    chi_square = np.sum((counts - 50_000) ** 2 / 50_000)
    assert chi_square < 45  # 99.9th percentile of chi-square with 19 degrees of freedom is 43.8


def test_normal_moments_and_tails() -> None:
    values = rng.normal(12, 2, np.arange(1_000_000), 3)
    assert abs(values.mean()) < 0.005
    assert abs(values.std() - 1.0) < 0.005
    assert abs(np.mean(values**3)) < 0.02
    assert abs(np.mean(values**4) - 3.0) < 0.05
    beyond_two = np.mean(np.abs(values) > 2)
    assert abs(beyond_two - math.erfc(2 / math.sqrt(2))) < 0.001
    assert np.abs(values).max() < 6.7


def test_streams_and_events_are_uncorrelated() -> None:
    devices = np.arange(500_000)
    first = rng.normal(0, rng.Stream.SET_STEP, devices, 9)
    other_stream = rng.normal(0, rng.Stream.RELAXATION, devices, 9)
    next_event = rng.normal(0, rng.Stream.SET_STEP, devices, 10)
    neighbour = rng.normal(0, rng.Stream.SET_STEP, devices + 1, 9)
    bound = 5 / math.sqrt(devices.size)
    for other in (other_stream, next_event, neighbour):
        assert abs(np.corrcoef(first, other)[0, 1]) < bound


def test_out_of_range_coordinates_rejected() -> None:
    with pytest.raises(ValueError, match="device indices"):
        rng.hash64(0, 1, np.array([-1]), 0)
    with pytest.raises(ValueError, match="device indices"):
        rng.hash64(0, 1, np.array([rng.MAX_DEVICES]), 0)
    with pytest.raises(ValueError, match="event numbers"):
        rng.hash64(0, 1, np.array([0]), rng.MAX_EVENTS)
    with pytest.raises(ValueError, match="seed"):
        rng.hash64(-1, 1, np.array([0]), 0)
