"""Exchange-level tests: the exact bytes the chip driver sends and the replies it accepts.

A scripted peer on a real loopback socket (or a real pseudo-terminal) checks each request
byte for byte and sends a fixed reply, so a change to the protocol fails here on one line.
Expected requests and replies are built with struct and zlib, independently of the driver.
"""

from __future__ import annotations

import io
import os
import pty
import re
import socket
import struct
import threading
import tty
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyvisa
import pytest

from drivers.controller import ChipController, RetryPolicy
from drivers.errors import InstrumentBusy, RecoveryFailed
from drivers.transports import SerialTransport, VisaTransport
from hwctl.backend import LimitError

SYNC = re.compile(rb"SYST:SYNC\? (\d+-\d+)\n")
LIMITS_REPLY = b"0.2,2.0,3.5,10000.0,1000,604800.0,25.0,0.2\n"
NO_ERROR = b'0,"No error"\n'
RETRY = RetryPolicy(attempts=3, reconnects=3, backoff_s=0.01, backoff_max_s=0.05)
CLIENT = 77

Reply = bytes | Callable[[re.Match], bytes] | None


def handshake(
    last_seq: int = 41, limits: bytes = LIMITS_REPLY, last_client: int = 5
) -> list[tuple[bytes | re.Pattern, Reply]]:
    """The requests a driver makes on every connect, with the replies of a 4 x 4 test chip."""
    return [
        (SYNC, lambda match: match.group(1) + b"\n"),
        (b"*IDN?\n", b"hwctl,emulated-pcm,seed0,1.0\n"),
        (b"CHIP:GEOM?\n", b"1,4,4\n"),
        (b"CHIP:CLOC:MODE?\n", b"VIRT\n"),
        (b"SYST:ERR?\n", NO_ERROR),
        (b"CHIP:LIM?\n", limits),
        (b"CHIP:SEQ?\n", f"{last_client},{last_seq}\n".encode()),
    ]


@dataclass
class ScriptedPeer:
    """A peer that sends one scripted reply per request; a ``None`` reply closes the connection."""

    steps: list[tuple[bytes | re.Pattern, Reply]]
    received: list[bytes] = field(default_factory=list)
    failure: str | None = None

    def serve(self, reader: io.BufferedReader, write: Callable[[bytes], None]) -> bool:
        """Serve steps on one connection; return False once the connection should close."""
        while self.steps:
            expected, reply = self.steps[0]
            request = self._read_request(reader, expected)
            if request is None:
                return True
            self.received.append(request)
            self.steps.pop(0)
            if isinstance(expected, re.Pattern):
                match = expected.fullmatch(request)
                if match is None:
                    self.failure = f"request {request!r} does not match {expected.pattern!r}"
                    return False
            elif request != expected:
                self.failure = f"request {request!r} differs from the expected {expected!r}"
                return False
            else:
                match = None
            if reply is None:
                return False
            write(reply(match) if callable(reply) else reply)
        return True

    def _read_request(self, reader: io.BufferedReader, expected) -> bytes | None:
        if isinstance(expected, bytes):
            data = reader.read(len(expected))
        else:
            data = reader.readline()
        return data or None


@pytest.fixture
def tcp_peer():
    """Start a scripted peer on a loopback port; yields a function that takes the script."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5.0)
    threads = []

    def start(steps) -> tuple[ScriptedPeer, str]:
        peer = ScriptedPeer(list(steps))

        def run() -> None:
            for _ in range(10):
                if not peer.steps or peer.failure:
                    return
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                with connection:
                    connection.settimeout(5.0)
                    reader = connection.makefile("rb")
                    peer.serve(reader, connection.sendall)
                    reader.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        host, port = listener.getsockname()
        return peer, f"TCPIP0::{host}::{port}::SOCKET"

    yield start
    listener.close()
    for thread in threads:
        thread.join(5.0)


@pytest.fixture
def pty_peer():
    """Start a scripted peer on a new pseudo-terminal; yields a function that takes the script."""
    controller_fd, terminal_fd = pty.openpty()
    tty.setraw(terminal_fd)
    path = os.ttyname(terminal_fd)
    threads = []

    def start(steps) -> tuple[ScriptedPeer, str]:
        peer = ScriptedPeer(list(steps))
        reader = io.BufferedReader(io.FileIO(controller_fd, "rb", closefd=False))

        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(controller_fd, view) :]

        thread = threading.Thread(target=peer.serve, args=(reader, write), daemon=True)
        thread.start()
        threads.append(thread)
        return peer, path

    yield start
    os.close(terminal_fd)
    os.close(controller_fd)
    for thread in threads:
        thread.join(5.0)


def block(payload: bytes) -> bytes:
    length = str(len(payload)).encode()
    return b"#" + str(len(length)).encode() + length + payload


def read_request(seq: int, device_ids: list[int], wait_s: float = 0.0) -> bytes:
    payload = struct.pack(f"<{len(device_ids)}I", *device_ids)
    text = b"CHIP:READ? %d,%d,%r,%d," % (CLIENT, seq, wait_s, zlib.crc32(payload))
    return text + block(payload) + b"\n"


def read_reply(seq: int, clock_s: float, values: list[float]) -> bytes:
    payload = struct.pack(f"<{len(values)}d", *values)
    return b"%d,0,%r,0,%d," % (seq, clock_s, zlib.crc32(payload)) + block(payload) + b"\n"


# Values whose float64 bytes contain 0x0A (a line feed), so a reply split at 0x0A is caught.
LINE_FEED_VALUES = [1.0000000000000022, float(np.frombuffer(b"\n" * 8, "<f8")[0])]


def test_connect_read_apply_wait_bytes(tcp_peer):
    # Columns: ids uint32, kinds uint8, amplitudes float64, widths float64 (one value if equal).
    columns = [struct.pack("<2I", 2, 3), b"\x01\x00", struct.pack("<2d", 1.0, 3.0), struct.pack("<d", 50.0)]
    crc = zlib.crc32(b"".join(columns))
    peer, resource = tcp_peer(
        [
            *handshake(last_seq=41),
            (read_request(42, [3, 1]), read_reply(42, 1.25e-06, LINE_FEED_VALUES)),
            (
                b"CHIP:PULS? 77,43,0.0,%d," % crc + b",".join(block(column) for column in columns) + b"\n",
                b"43,0,2.5e-06,0\n",
            ),
            (b"CHIP:WAIT? 77,44,20.0\n", b"44,0,20.0000025,0\n"),
        ]
    )
    driver = ChipController(VisaTransport(resource, timeout_s=5.0), retry=RETRY, client_id=CLIENT)

    values = driver.read(np.array([3, 1]))
    driver.apply_pulses(
        np.array([2, 3]), np.array([1, 0], dtype=np.uint8), np.array([1.0, 3.0]), np.array([50.0, 50.0])
    )
    driver.wait_s(20.0)
    clock_s = driver.clock_s()
    driver.close()

    assert peer.failure is None
    assert peer.steps == []
    assert values.tobytes() == struct.pack("<2d", *LINE_FEED_VALUES)
    assert clock_s == 20.0000025, "a virtual clock is taken from the last batch reply"
    assert driver.stats.round_trips == 6 + 3


def test_wait_travels_with_next_read(tcp_peer):
    peer, resource = tcp_peer(
        [*handshake(last_seq=41), (read_request(42, [3], wait_s=0.1), read_reply(42, 0.1000001, [7.5]))]
    )
    driver = ChipController(VisaTransport(resource, timeout_s=5.0), retry=RETRY, client_id=CLIENT)
    driver.wait_s(0.1)
    values = driver.read(np.array([3]))
    clock_s = driver.clock_s()
    driver.close()

    assert peer.failure is None
    assert values.tolist() == [7.5]
    assert clock_s == 0.1000001
    assert driver.stats.round_trips == 6 + 1


def test_reply_to_other_batch_is_never_taken(tcp_peer):
    request = read_request(42, [0])
    peer, resource = tcp_peer(
        [
            *handshake(last_seq=41),
            (request, read_reply(41, 0.5, [9.0])),  # a stale reply: the driver must not use it
            *handshake(last_seq=42, last_client=CLIENT),  # batch 42 was applied before the failure
            (request, read_reply(42, 1.0, [4.0])),  # the same bytes again: the stored reply
        ]
    )
    driver = ChipController(VisaTransport(resource, timeout_s=5.0), retry=RETRY, client_id=CLIENT)
    values = driver.read(np.array([0]))
    driver.close()

    assert peer.failure is None
    assert values.tolist() == [4.0]
    assert driver.stats.reconnects == 1
    assert driver.next_sequence == 43


def test_controller_error_reply_raises_limit_error(tcp_peer):
    peer, resource = tcp_peer(
        [
            *handshake(last_seq=0),
            (re.compile(rb"CHIP:PULS\? 77,1,0.0,\d+,#14.{4},#11.,#18.{8},#18.{8}\n", re.S), b"1,-222,0.0,1\n"),
            (b"SYST:ERR?\n", b'-222,"SET amplitude 1.9 V for device 0 is outside the limit"\n'),
            (b"SYST:ERR?\n", NO_ERROR),
        ]
    )
    driver = ChipController(VisaTransport(resource, timeout_s=5.0), retry=RETRY, client_id=CLIENT)
    with pytest.raises(LimitError, match="batch 1: SET amplitude 1.9 V for device 0"):
        driver.apply_pulses(np.array([0]), np.array([1], dtype=np.uint8), np.array([1.9]), np.array([10.0]))
    assert driver.next_sequence == 2, "a rejected batch still used its sequence number"
    driver.close()
    assert peer.failure is None


def test_limit_mismatch_stops_before_any_pulse(tcp_peer):
    peer, resource = tcp_peer(handshake(last_seq=0))
    with pytest.raises(LimitError) as raised:
        ChipController(
            VisaTransport(resource, timeout_s=5.0),
            expected_limits={"set_amplitude_max_v": 1.5},
            retry=RETRY,
            client_id=CLIENT,
        )
    assert "set_amplitude_max_v: configuration expects 1.5, controller reports 2.0" in str(raised.value)
    assert peer.failure is None
    assert not any(request.startswith(b"CHIP:PULS") for request in peer.received)


def test_limit_settings_sent_then_verified(tcp_peer):
    steps = handshake(last_seq=0, limits=b"0.2,1.5,3.5,10000.0,1000,604800.0,25.0,0.2\n")
    # After the first error-queue check: the setting (a command, so no reply), another check.
    steps.insert(5, (b"CHIP:LIM:SET:AMPL:MAX 1.5\n", b""))
    steps.insert(6, (b"SYST:ERR?\n", NO_ERROR))
    peer, resource = tcp_peer(steps)
    driver = ChipController(
        VisaTransport(resource, timeout_s=5.0),
        limit_settings={"set_amplitude_max_v": 1.5},
        retry=RETRY,
            client_id=CLIENT,
    )
    assert driver.limits().set_amplitude_max_v == 1.5
    driver.close()
    assert peer.failure is None


def test_busy_controller_is_reported(tcp_peer):
    busy_line = b"BUSY instrument busy: it serves one client at a time\n"
    peer, resource = tcp_peer([(SYNC, busy_line)] * 3)
    with pytest.raises(RecoveryFailed, match="after 3 attempts; last error: .*busy"):
        ChipController(VisaTransport(resource, timeout_s=5.0), retry=RETRY, client_id=CLIENT)
    assert peer.failure is None


def test_serial_read_keeps_line_feeds(pty_peer):
    peer, path = pty_peer(
        [*handshake(last_seq=7), (read_request(8, [0, 15]), read_reply(8, 1e-6, LINE_FEED_VALUES))]
    )
    driver = ChipController(SerialTransport(path, timeout_s=5.0), retry=RETRY, client_id=CLIENT)
    values = driver.read(np.array([0, 15]))
    driver.close()
    assert peer.failure is None
    assert values.tobytes() == struct.pack("<2d", *LINE_FEED_VALUES)


def test_visa_serial_resource_keeps_line_feeds(pty_peer):
    peer, path = pty_peer(
        [*handshake(last_seq=7), (read_request(8, [0, 15]), read_reply(8, 1e-6, LINE_FEED_VALUES))]
    )
    manager = pyvisa.ResourceManager("@py")
    transport = VisaTransport(f"ASRL{path}::INSTR", timeout_s=5.0, resource_manager=manager)
    driver = ChipController(transport, retry=RETRY, client_id=CLIENT)
    values = driver.read(np.array([0, 15]))
    driver.close()
    manager.close()
    assert peer.failure is None
    assert values.tobytes() == struct.pack("<2d", *LINE_FEED_VALUES)
