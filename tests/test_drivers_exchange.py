"""Exchange-level tests: the exact bytes the chip driver sends and the replies it accepts.

A scripted peer on a real loopback socket (or a real pseudo-terminal) checks each request
byte for byte and sends a fixed reply, so a change to the protocol fails here on one line.
Expected requests and replies are built with struct and zlib, independently of the driver.
The scripted controller has an 8-bit read ADC of 0.125 µS per code unless a test states another.
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
from drivers.errors import InstrumentBusy, InstrumentError, RecoveryFailed
from drivers.transports import SerialTransport, VisaTransport
from hwctl.backend import LimitError

SYNC = re.compile(rb"SYST:SYNC\? (\d+-\d+)\n")
LIMITS_REPLY = b"0.2,2.0,3.5,10000.0,1000,604800.0,25.0,0.2\n"
NO_ERROR = b'0,"No error"\n'
ADC_SCALE = b"8,0.125\n"
LSB_US = 0.125
NOT_CODES = b'-221,"this controller\'s reads are not ADC codes"\n'
RETRY = RetryPolicy(attempts=3, reconnects=3, backoff_s=0.01, backoff_max_s=0.05)
CLIENT = 77

Reply = bytes | Callable[[re.Match], bytes] | None


def handshake(
    last_seq: int = 41,
    limits: bytes = LIMITS_REPLY,
    last_client: int = 5,
    adc_scale: bytes | None = ADC_SCALE,
) -> list[tuple[bytes | re.Pattern, Reply]]:
    """The requests a driver makes on every connect, with the replies of a 4 x 4 test chip.

    ``adc_scale`` is the ``CHIP:ADC?`` reply, or None for a controller that rejects the CODE
    read format.
    """
    if adc_scale is None:
        read_format = [(b"SYST:ERR?\n", NOT_CODES), (b"SYST:ERR?\n", NO_ERROR)]
    else:
        read_format = [(b"SYST:ERR?\n", NO_ERROR), (b"CHIP:ADC?\n", adc_scale)]
    return [
        (SYNC, lambda match: match.group(1) + b"\n"),
        (b"*IDN?\n", b"hwctl,emulated-pcm,seed0,1.0\n"),
        (b"CHIP:GEOM?\n", b"1,4,4\n"),
        (b"CHIP:CLOC:MODE?\n", b"VIRT\n"),
        (b"SYST:ERR?\n", NO_ERROR),
        (b"CHIP:LIM?\n", limits),
        (b"CHIP:READ:FORM CODE\n", b""),
        *read_format,
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


def id_payload(device_ids: list[int]) -> bytes:
    """An id block payload: layout 1 (first id, then 1-byte steps) if it fits, else layout 4.

    The lists in these tests are too short for a bitmap (layout 8) to be shorter.
    """
    steps = [after - before for before, after in zip(device_ids, device_ids[1:])]
    if all(0 <= step <= 255 for step in steps):
        return b"\x01" + struct.pack("<I", device_ids[0]) + bytes(steps)
    return b"\x04" + struct.pack(f"<{len(device_ids)}I", *device_ids)


def read_request(seq: int, device_ids: list[int], wait_s: float = 0.0) -> bytes:
    payload = id_payload(device_ids)
    text = b"CHIP:READ? %d,%d,%r,%d," % (CLIENT, seq, wait_s, zlib.crc32(payload))
    return text + block(payload) + b"\n"


def read_reply(seq: int, clock_s: float, codes: list[int]) -> bytes:
    """A read reply carrying 8-bit ADC codes."""
    payload = bytes(codes)
    return b"%d,0,%r,0,%d," % (seq, clock_s, zlib.crc32(payload)) + block(payload) + b"\n"


def float_read_reply(seq: int, clock_s: float, values: list[float]) -> bytes:
    """A read reply carrying float64 conductances."""
    payload = struct.pack(f"<{len(values)}d", *values)
    return b"%d,0,%r,0,%d," % (seq, clock_s, zlib.crc32(payload)) + block(payload) + b"\n"


def conductances(codes: list[int]) -> bytes:
    """The float64 bytes the driver must return for ``codes``: code times the LSB."""
    return struct.pack(f"<{len(codes)}d", *(code * LSB_US for code in codes))


# Values whose float64 bytes contain 0x0A (a line feed), so a reply split at 0x0A is caught.
LINE_FEED_VALUES = [1.0000000000000022, float(np.frombuffer(b"\n" * 8, "<f8")[0])]
# Code 10 is the byte 0x0A.
LINE_FEED_CODES = [10, 200, 10]


def test_connect_read_apply_wait_bytes(tcp_peer):
    # The read is the example in docs/protocol.md: devices 3 and 1 read codes 12 and 18.
    # Pulse blocks: ids (layout 1: first id, then 1-byte steps), then the shape table of
    # distinct (kind uint8, width float64) records. Next, one shape index bit per pulse, because
    # the table has two entries (pulse 0 uses shape 0, pulse 1 shape 1). Last, the amplitudes.
    columns = [
        b"\x01" + struct.pack("<IB", 2, 1),
        struct.pack("<BdBd", 1, 250.0, 0, 50.0),
        bytes([0b10]),
        struct.pack("<2d", 1.0, 3.0),
    ]
    crc = zlib.crc32(b"".join(columns))
    peer, resource = tcp_peer(
        [
            *handshake(last_seq=41),
            (read_request(42, [3, 1]), read_reply(42, 1.25e-06, [12, 18])),
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
        np.array([2, 3]), np.array([1, 0], dtype=np.uint8), np.array([1.0, 3.0]), np.array([250.0, 50.0])
    )
    driver.wait_s(20.0)
    clock_s = driver.clock_s()
    driver.close()

    assert peer.failure is None
    assert peer.steps == []
    assert values.tobytes() == struct.pack("<2d", 1.5, 2.25)
    assert driver.adc_scale.bits == 8
    assert driver.adc_scale.lsb_us == LSB_US
    assert clock_s == 20.0000025, "a virtual clock is taken from the last batch reply"
    assert driver.stats.round_trips == 8 + 3


def test_float_reads_where_codes_rejected(tcp_peer):
    peer, resource = tcp_peer(
        [
            *handshake(last_seq=7, adc_scale=None),
            (read_request(8, [0, 15]), float_read_reply(8, 1e-6, LINE_FEED_VALUES)),
        ]
    )
    driver = ChipController(VisaTransport(resource, timeout_s=5.0), retry=RETRY, client_id=CLIENT)
    values = driver.read(np.array([0, 15]))
    driver.close()
    assert peer.failure is None
    assert driver.adc_scale is None
    assert values.tobytes() == struct.pack("<2d", *LINE_FEED_VALUES)


def test_codes_off_selects_float_format(tcp_peer):
    steps = handshake(last_seq=7)
    form = steps.index((b"CHIP:READ:FORM CODE\n", b""))
    steps[form : form + 3] = [(b"CHIP:READ:FORM F64\n", b""), (b"SYST:ERR?\n", NO_ERROR)]
    peer, resource = tcp_peer([*steps, (read_request(8, [4]), float_read_reply(8, 1e-6, [3.0]))])
    driver = ChipController(
        VisaTransport(resource, timeout_s=5.0), retry=RETRY, client_id=CLIENT, adc_codes=False
    )
    values = driver.read(np.array([4]))
    driver.close()
    assert peer.failure is None
    assert driver.adc_scale is None
    assert values.tolist() == [3.0]


def test_changed_adc_scale_after_reconnect_refused(tcp_peer):
    request = read_request(42, [0])
    peer, resource = tcp_peer(
        [
            *handshake(last_seq=41),
            (request, None),  # the link drops before a reply
            *handshake(last_seq=41, adc_scale=b"10,0.03\n"),
        ]
    )
    # pyvisa-py 0.8.1 reports a closed socket as a read timeout, so keep the timeout short.
    driver = ChipController(VisaTransport(resource, timeout_s=1.0), retry=RETRY, client_id=CLIENT)
    with pytest.raises(InstrumentError, match="sends reads as 10-bit ADC codes of 0.03 µS but the session"):
        driver.read(np.array([0]))
    driver.close()
    assert peer.failure is None


def test_code_reply_of_wrong_length_is_garbled(tcp_peer):
    request = read_request(42, [0, 1])
    peer, resource = tcp_peer(
        [
            *handshake(last_seq=41),
            (request, float_read_reply(42, 1.0, [4.0, 5.0])),  # 16 bytes for 2 codes
            *handshake(last_seq=42, last_client=CLIENT),
            (request, read_reply(42, 1.0, [32, 40])),
        ]
    )
    driver = ChipController(VisaTransport(resource, timeout_s=5.0), retry=RETRY, client_id=CLIENT)
    values = driver.read(np.array([0, 1]))
    driver.close()
    assert peer.failure is None
    assert values.tolist() == [4.0, 5.0]
    assert driver.stats.reconnects == 1


def test_wait_travels_with_next_read(tcp_peer):
    peer, resource = tcp_peer(
        [*handshake(last_seq=41), (read_request(42, [3], wait_s=0.1), read_reply(42, 0.1000001, [60]))]
    )
    driver = ChipController(VisaTransport(resource, timeout_s=5.0), retry=RETRY, client_id=CLIENT)
    driver.wait_s(0.1)
    values = driver.read(np.array([3]))
    clock_s = driver.clock_s()
    driver.close()

    assert peer.failure is None
    assert values.tolist() == [7.5]
    assert clock_s == 0.1000001
    assert driver.stats.round_trips == 8 + 1


def test_reply_to_other_batch_is_never_taken(tcp_peer):
    request = read_request(42, [0])
    peer, resource = tcp_peer(
        [
            *handshake(last_seq=41),
            (request, read_reply(41, 0.5, [72])),  # a stale reply: the driver must not use it
            *handshake(last_seq=42, last_client=CLIENT),  # batch 42 was applied before the failure
            (request, read_reply(42, 1.0, [32])),  # the same bytes again: the stored reply
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
            (re.compile(rb"CHIP:PULS\? 77,1,0.0,\d+,#15.{5},#19.{9},#10,#18.{8}\n", re.S), b"1,-222,0.0,1\n"),
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


@pytest.mark.parametrize("codes", [True, False], ids=["codes", "float64"])
def test_serial_read_keeps_line_feeds(pty_peer, codes):
    reply = (
        read_reply(8, 1e-6, LINE_FEED_CODES)
        if codes
        else float_read_reply(8, 1e-6, [*LINE_FEED_VALUES, 2.0])
    )
    peer, path = pty_peer(
        [*handshake(last_seq=7, adc_scale=ADC_SCALE if codes else None), (read_request(8, [0, 10, 15]), reply)]
    )
    driver = ChipController(SerialTransport(path, timeout_s=5.0), retry=RETRY, client_id=CLIENT)
    values = driver.read(np.array([0, 10, 15]))
    driver.close()
    assert peer.failure is None
    if codes:
        assert values.tobytes() == conductances(LINE_FEED_CODES)
    else:
        assert values.tobytes() == struct.pack("<3d", *LINE_FEED_VALUES, 2.0)


def test_visa_serial_resource_keeps_line_feeds(pty_peer):
    peer, path = pty_peer(
        [*handshake(last_seq=7), (read_request(8, [0, 10, 15]), read_reply(8, 1e-6, LINE_FEED_CODES))]
    )
    manager = pyvisa.ResourceManager("@py")
    transport = VisaTransport(f"ASRL{path}::INSTR", timeout_s=5.0, resource_manager=manager)
    driver = ChipController(transport, retry=RETRY, client_id=CLIENT)
    values = driver.read(np.array([0, 10, 15]))
    driver.close()
    manager.close()
    assert peer.failure is None
    assert values.tobytes() == conductances(LINE_FEED_CODES)
