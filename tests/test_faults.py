"""Injected faults: every recoverable fault leaves results bit-identical to an undisturbed
in-process run, with no batch applied twice; the others stop with a clear error.

Program-and-verify runs on a served emulated chip with one fault on one batch request. A batch
applied twice would shift the per-device event counters that seed every random draw, so
bit-identical results are an independent check that it did not happen. The server's counters
show how the driver recovered.
"""

from __future__ import annotations

import numpy as np
import pytest
from wire_fixtures import FAST_RETRY, assert_same_result, pty_server, tcp_server

from drivers.controller import ChipController
from drivers.errors import InstrumentError, RecoveryFailed
from drivers.transports import SerialTransport, VisaTransport
from hwctl.backend import Geometry
from protocols.program_verify import ProgramVerifySettings, program_verify
from sim_backend.chip import EmulatedChip
from sim_backend.faults import Fault, FaultKind, FaultPlan
from sim_backend.server import InstrumentProtocol, TcpInstrumentServer

SEED = 4
GEOMETRY = Geometry(arrays=1, rows=16, cols=32)
SETTINGS = ProgramVerifySettings(batch_size=128)
TIMEOUT_S = 1.0


def targets() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(9)
    ids = rng.permutation(GEOMETRY.devices)[:300]
    return ids, np.where(rng.random(300) < 0.3, 0.0, rng.uniform(1.0, 24.0, 300))


@pytest.fixture(scope="module")
def reference_result():
    chip = EmulatedChip(seed=SEED, geometry=GEOMETRY)
    result = program_verify(chip, *targets(), SETTINGS)
    return result, chip.read(targets()[0])


def open_driver(server, kind: str) -> ChipController:
    if kind == "visa-tcp":
        transport = VisaTransport(server.resource_name, timeout_s=TIMEOUT_S)
    else:
        transport = SerialTransport(server.path, timeout_s=TIMEOUT_S)
    return ChipController(transport, retry=FAST_RETRY)


def serve(kind: str, chip: EmulatedChip, fault: str):
    plan = FaultPlan.parse([fault], seed=SEED)
    return tcp_server(chip, plan) if kind == "visa-tcp" else pty_server(chip, plan)


@pytest.mark.parametrize("kind", ["visa-tcp", "serial-pty"])
@pytest.mark.parametrize(
    "fault, applied_before_failure",
    [
        (f"delay@5:{TIMEOUT_S + 0.5}", True),  # the reply comes after the driver timed out
        ("drop@6", False),  # link lost before the controller applied the batch
        ("drop-after@7", True),  # link lost after the batch was applied
        ("garbage@8", True),  # the reply is random bytes
    ],
)
def test_recoverable_fault_gives_identical_results(kind, fault, applied_before_failure, reference_result):
    expected, expected_reads = reference_result
    chip = EmulatedChip(seed=SEED, geometry=GEOMETRY)
    with serve(kind, chip, fault) as server:
        driver = open_driver(server, kind)
        result = program_verify(driver, *targets(), SETTINGS)
        reads = driver.read(targets()[0])
        stats = server.protocol.stats
        driver.close()

    assert_same_result(result, expected)
    assert reads.tobytes() == expected_reads.tobytes()
    assert driver.stats.reconnects >= 1
    if applied_before_failure:
        assert stats.replies_replayed >= 1, "the lost reply is fetched again, not the batch reapplied"
    # Every request was executed once, except the dropped one and repeats of stored replies.
    # (A machine too slow for TIMEOUT_S adds repeats, which this count still accounts for.)
    unapplied = 0 if applied_before_failure else 1
    assert stats.batches_executed == stats.batches_received - unapplied - stats.replies_replayed


@pytest.mark.parametrize("kind", ["visa-tcp", "serial-pty"])
def test_error_entry_stops_before_next_batch(kind):
    chip = EmulatedChip(seed=SEED, geometry=GEOMETRY)
    with serve(kind, chip, "error@3:-240") as server:
        driver = open_driver(server, kind)
        with pytest.raises(InstrumentError) as raised:
            program_verify(driver, *targets(), SETTINGS)
        executed = server.protocol.stats.batches_executed
        driver.close()

    message = str(raised.value)
    assert raised.value.code == -240
    assert "injected fault: error-queue entry" in message
    assert "after batch 3" in message
    assert "resume the run" in message
    assert executed == 3, "no batch is sent after the one that reported the error"


def test_server_gone_raises_recovery_failed():
    chip = EmulatedChip(seed=SEED, geometry=GEOMETRY)
    server = TcpInstrumentServer(InstrumentProtocol(chip), deadline_s=60.0)
    server.start()
    driver = open_driver(server, "visa-tcp")
    driver.read(np.arange(4))
    server.join()

    with pytest.raises(RecoveryFailed, match="could not connect .* after 6 attempts"):
        driver.read(np.arange(4))
    driver.close()


def test_reconnect_to_other_chip_refused():
    first = TcpInstrumentServer(InstrumentProtocol(EmulatedChip(seed=1, geometry=GEOMETRY)), deadline_s=60.0)
    first.start()
    driver = open_driver(first, "visa-tcp")
    driver.read(np.arange(4))
    first.join()

    second = TcpInstrumentServer(
        InstrumentProtocol(EmulatedChip(seed=2, geometry=GEOMETRY)), port=first.port, deadline_s=60.0
    )
    with second:
        with pytest.raises(InstrumentError, match="refusing to continue on a different chip"):
            driver.read(np.arange(4))
    driver.close()


def test_other_client_in_between_detected():
    chip = EmulatedChip(seed=SEED, geometry=GEOMETRY)
    with tcp_server(chip) as server:
        transport = VisaTransport(server.resource_name, timeout_s=TIMEOUT_S)
        driver = ChipController(transport, retry=FAST_RETRY)
        driver.read(np.arange(4))
        transport.close()  # the link goes down ...

        intruder = open_driver(server, "visa-tcp")  # ... and another client changes the chip
        intruder.read(np.arange(4))
        intruder.close()

        with pytest.raises(InstrumentError, match="last batch is 2 from client .* expected \\[1, 2\\]"):
            driver.read(np.arange(4))
        driver.close()


@pytest.mark.parametrize(
    "text, fault",
    [
        ("delay@3:2.5", Fault(FaultKind.DELAY, 3, delay_s=2.5)),
        ("drop@1", Fault(FaultKind.DROP, 1)),
        ("drop-after@2", Fault(FaultKind.DROP_AFTER, 2)),
        ("garbage@7", Fault(FaultKind.GARBAGE, 7)),
        ("error@4", Fault(FaultKind.ERROR, 4)),
        ("error@4:-240", Fault(FaultKind.ERROR, 4, error_code=-240)),
    ],
)
def test_fault_spec_parsing(text, fault):
    assert Fault.parse(text) == fault


@pytest.mark.parametrize(
    "text, message",
    [
        ("lag@3", "unknown fault kind 'lag'"),
        ("drop", "needs a batch number"),
        ("delay@3", "needs seconds"),
        ("drop@0", "must be >= 1"),
        ("garbage@2:5", "takes no value"),
    ],
)
def test_fault_spec_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        Fault.parse(text)


def test_garbage_is_reproducible_single_line():
    plan = FaultPlan([], seed=3)
    garbage = plan.garbage(8)
    assert garbage == FaultPlan([], seed=3).garbage(8)
    assert garbage.count(b"\n") == 1
    assert garbage.endswith(b"\n")
