"""The backend contract, run against every backend.

The backends are the emulator in this process and the emulator on a loopback TCP port driven
through pyvisa (pyvisa-py), once with reads as ADC codes and once as float64 values. Two more
serve it on a pseudo-terminal, driven through pyserial and through pyvisa's ASRL resource.

Each test compares the backend under test with a second, independent in-process emulator of the
same seed. The emulator's draws depend only on (seed, device, event number), so every backend
must give bit-identical conductances and clocks for the same calls.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from wire_fixtures import FAST_RETRY, assert_same_result, pty_server, tcp_server

from drivers.blocks import AdcScale
from drivers.controller import ChipController
from drivers.transports import SerialTransport, VisaTransport
from hwctl.backend import Geometry, LimitError, PulseKind
from protocols.program_verify import ProgramVerifySettings, program_verify
from sim_backend import physics
from sim_backend.chip import EmulatedChip

SEED = 11
GEOMETRY = Geometry(arrays=1, rows=32, cols=64)
BACKENDS = ["in-process", "visa-tcp", "visa-tcp-float64", "serial-pty", "visa-asrl-pty"]


def new_chip() -> EmulatedChip:
    return EmulatedChip(seed=SEED, geometry=GEOMETRY)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend under test, over a fresh emulated chip of seed `SEED`."""
    kind = request.param
    if kind == "in-process":
        chip = new_chip()
        yield chip
        chip.close()
        return

    chip = new_chip()
    if kind.startswith("visa-tcp"):
        with tcp_server(chip) as server:
            transport = VisaTransport(server.resource_name, timeout_s=5.0)
            driver = ChipController(transport, retry=FAST_RETRY, adc_codes=kind == "visa-tcp")
            yield driver
            driver.close()
    elif kind == "serial-pty":
        with pty_server(chip) as server:
            driver = ChipController(SerialTransport(server.path, timeout_s=5.0), retry=FAST_RETRY)
            yield driver
            driver.close()
    else:
        # pyvisa-py reads ASRL resources one byte per call: fine for these small batches.
        with pty_server(chip) as server:
            transport = VisaTransport(f"ASRL{server.path}::INSTR", timeout_s=5.0)
            driver = ChipController(transport, retry=FAST_RETRY)
            yield driver
            driver.close()
    chip.close()


@pytest.fixture
def reference():
    chip = new_chip()
    yield chip
    chip.close()


def set_pulses(device_ids: np.ndarray, amplitude_v: float = 1.0, width_ns: float = 250.0):
    count = len(device_ids)
    return (
        device_ids,
        np.full(count, PulseKind.SET, dtype=np.uint8),
        np.full(count, amplitude_v),
        np.full(count, width_ns),
    )


def test_identity_geometry_limits(backend, reference):
    assert backend.identity() == reference.identity()
    assert backend.geometry() == reference.geometry()
    assert backend.limits() == reference.limits()


def test_read_format_negotiated(backend, reference, request):
    kind = request.node.callspec.params["backend"]
    if kind == "in-process":
        pytest.skip("the in-process emulator has no wire format")
    params = reference.params
    if kind == "visa-tcp-float64":
        expected = None
    else:
        expected = AdcScale(params.read_adc_bits, physics.adc_lsb_us(params))
    assert backend.adc_scale == expected


def test_read_fresh_chip(backend, reference):
    ids = np.arange(0, GEOMETRY.devices, 7)
    assert backend.read(ids).tobytes() == reference.read(ids).tobytes()
    assert backend.clock_s() == reference.clock_s()


def test_pulses_then_read_bit_identical(backend, reference):
    ids = np.random.default_rng(5).permutation(GEOMETRY.devices)[:300]
    for chip in (backend, reference):
        chip.reset_devices(ids, 2.5, 50.0)
        chip.apply_pulses(*set_pulses(ids[:200], amplitude_v=1.2))
        chip.apply_pulses(*set_pulses(ids[100:], amplitude_v=0.8, width_ns=500.0))
    g_backend = backend.read(ids)
    g_reference = reference.read(ids)
    assert g_backend.dtype == np.float64
    assert g_backend.tobytes() == g_reference.tobytes()
    assert backend.clock_s() == reference.clock_s()


def test_wait_advances_clock_and_drift(backend, reference):
    ids = np.arange(64)
    for chip in (backend, reference):
        chip.apply_pulses(*set_pulses(ids, amplitude_v=1.4))
    start_s = backend.clock_s()
    backend.wait_s(3600.0)
    reference.wait_s(3600.0)
    assert backend.clock_s() == pytest.approx(start_s + 3600.0, abs=1e-9)
    assert backend.clock_s() == reference.clock_s()
    assert backend.read(ids).tobytes() == reference.read(ids).tobytes()
    assert backend.temperature_c() == reference.temperature_c()


def test_empty_batches(backend, reference):
    backend.apply_pulses(*set_pulses(np.zeros(0, dtype=np.int64)))
    assert backend.read(np.zeros(0, dtype=np.int64)).size == 0
    assert backend.clock_s() == reference.clock_s()


@pytest.mark.parametrize(
    "make_request, message",
    [
        (lambda ids: set_pulses(ids, amplitude_v=9.0), "SET amplitude .*9.0"),
        (lambda ids: set_pulses(ids, width_ns=1e9), "width"),
        (lambda ids: set_pulses(np.array([1, 2, 1])), "device id 1 appears more than once"),
        (lambda ids: set_pulses(np.array([0, GEOMETRY.devices])), str(GEOMETRY.devices)),
        (
            lambda ids: (ids, np.full(len(ids), 5, dtype=np.uint8), np.ones(len(ids)), np.full(len(ids), 50.0)),
            "kind 5",
        ),
    ],
)
def test_out_of_limit_batch_rejected_unapplied(backend, reference, make_request, message):
    ids = np.arange(10, 20)
    with pytest.raises(LimitError, match=message):
        backend.apply_pulses(*make_request(ids))
    assert backend.read(ids).tobytes() == reference.read(ids).tobytes()
    assert backend.clock_s() == reference.clock_s()


def test_read_out_of_range_rejected(backend):
    with pytest.raises(LimitError, match=str(GEOMETRY.devices)):
        backend.read(np.array([GEOMETRY.devices]))


def test_negative_wait_rejected(backend):
    with pytest.raises(ValueError, match="-1.0"):
        backend.wait_s(-1.0)


def test_program_verify_bit_identical(backend, reference):
    rng = np.random.default_rng(2)
    ids = rng.permutation(GEOMETRY.devices)[:600]
    targets = np.where(rng.random(600) < 0.3, 0.0, rng.uniform(1.0, 24.0, 600))
    settings = ProgramVerifySettings(batch_size=256)

    got = program_verify(backend, ids, targets, settings)
    expected = program_verify(reference, ids, targets, settings)

    assert_same_result(got, expected)
    assert backend.read(ids).tobytes() == reference.read(ids).tobytes()


def test_twelve_bit_adc_reads_bit_identical():
    params = dataclasses.replace(new_chip().params, read_adc_bits=12)
    ids = np.arange(0, GEOMETRY.devices, 3)
    reference = EmulatedChip(seed=SEED, geometry=GEOMETRY, params=params)
    with tcp_server(EmulatedChip(seed=SEED, geometry=GEOMETRY, params=params)) as server:
        driver = ChipController(VisaTransport(server.resource_name, timeout_s=5.0), retry=FAST_RETRY)
        reference.apply_pulses(*set_pulses(ids, amplitude_v=1.3))
        driver.apply_pulses(*set_pulses(ids, amplitude_v=1.3))
        got = driver.read(ids)
        received = driver.stats.bytes_received
        driver.read(ids)
        driver.close()
    assert driver.adc_scale == AdcScale(12, physics.adc_lsb_us(params))
    assert got.tobytes() == reference.read(ids).tobytes()
    reply_bytes = driver.stats.bytes_received - received
    assert reply_bytes >= 2 * ids.size, "two bytes per 12-bit code"
    assert reply_bytes < 2 * ids.size + 100, "two bytes per 12-bit code and a short text part"
