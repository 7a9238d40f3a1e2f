"""The instrument server: binding, one client at a time, bounded lifetime, and the command
semantics a driver relies on (error queue, limits, batch sequence numbers, CRC checks).

Requests go over real loopback sockets as raw bytes, so each test states what is sent.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from wire_fixtures import FAST_RETRY, TinyChip, tcp_server, visa_controller

from drivers.blocks import AdcScale
from drivers.errors import RecoveryFailed
from drivers.scpi import read_message
from drivers.transports import SerialTransport
from drivers.controller import ChipController
from hwctl.backend import Geometry
from sim_backend import physics
from sim_backend.chip import EmulatedChip
from sim_backend.server import InstrumentProtocol, TcpInstrumentServer

REPO = Path(__file__).resolve().parents[1]


class RawClient:
    """A plain socket client that sends bytes and reads one framed reply."""

    def __init__(self, server: TcpInstrumentServer) -> None:
        self.socket = socket.create_connection((server.host, server.port), timeout=5.0)
        self.reader = self.socket.makefile("rb")

    def send(self, message: bytes) -> None:
        self.socket.sendall(message)

    def query(self, message: bytes) -> bytes:
        self.send(message)
        return read_message(self.reader.readline, self.reader.read, max_block_bytes=1 << 20)

    def close(self) -> None:
        self.reader.close()
        self.socket.close()


def pulse_request(seq: int, device: int, amplitude_v: float, crc_offset: int = 0) -> bytes:
    """Return a one-pulse SET request from client 9: id, shape table, shape index, amplitude."""
    columns = [b"\x01" + struct.pack("<I", device), struct.pack("<Bd", 1, 100.0), b"", struct.pack("<d", amplitude_v)]
    crc = zlib.crc32(b"".join(columns)) + crc_offset
    blocks = b"#15" + columns[0] + b",#19" + columns[1] + b",#10" + b",#18" + columns[3]
    return b"CHIP:PULS? 9,%d,0.0,%d," % (seq, crc) + blocks + b"\n"


def read_request(seq: int, first_device: int, count: int) -> bytes:
    """Return a request from client 9 to read ``count`` devices from ``first_device`` on."""
    ids = b"\x01" + struct.pack("<I", first_device) + b"\x01" * (count - 1)
    header = b"#1%d" % len(ids) if len(ids) < 10 else b"#2%d" % len(ids)
    return b"CHIP:READ? 9,%d,0.0,%d," % (seq, zlib.crc32(ids)) + header + ids + b"\n"


def reply_payload(reply: bytes) -> bytes:
    """Return the block payload at the end of a read reply, after checking its CRC field."""
    fields = reply[:-1].split(b",", 5)
    header_digits = int(fields[5][1:2])
    payload = fields[5][2 + header_digits :]
    assert int(fields[5][2 : 2 + header_digits]) == len(payload)
    assert zlib.crc32(payload) == int(fields[4])
    return payload


def test_refuses_non_loopback_without_allow_remote():
    protocol = InstrumentProtocol(TinyChip())
    with pytest.raises(ValueError, match="not a loopback address.*--allow-remote"):
        TcpInstrumentServer(protocol, host="192.0.2.10")


def test_second_client_gets_busy_line():
    with tcp_server(TinyChip()) as server:
        first = visa_controller(server)
        second = RawClient(server)
        line = second.reader.readline()
        assert line.startswith(b"BUSY ")
        assert b"one client at a time" in line
        assert second.reader.readline() == b"", "the server closes the busy connection"
        second.close()
        with pytest.raises(RecoveryFailed, match="busy"):
            visa_controller(server)
        assert first.temperature_c() == 25.0, "the first client keeps working"
        first.close()


def test_next_client_served_after_disconnect():
    with tcp_server(TinyChip()) as server:
        visa_controller(server).close()
        driver = visa_controller(server)
        assert driver.identity().model == "TinyChip"
        driver.close()


def test_idle_client_disconnected():
    with tcp_server(TinyChip(), idle_timeout_s=0.3) as server:
        client = RawClient(server)
        started = time.monotonic()
        assert client.reader.readline() == b""
        assert time.monotonic() - started >= 0.25
        client.close()


def test_deadline_stops_server():
    server = TcpInstrumentServer(InstrumentProtocol(TinyChip()), deadline_s=0.3)
    server.start()
    assert server.wait_stopped(5.0)
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.port), timeout=1.0)


def test_error_queue_order_and_overflow():
    with tcp_server(TinyChip()) as server:
        client = RawClient(server)
        client.send(b"CHIP:NOPE?\n")
        assert client.query(b"SYST:ERR:COUN?\n") == b"1\n"
        assert client.query(b"SYST:ERR?\n") == b"-113,\"undefined header b'CHIP:NOPE?'\"\n"
        assert client.query(b"SYST:ERR?\n") == b'0,"No error"\n'

        for _ in range(40):
            client.send(b"BAD\n")
        assert client.query(b"SYST:ERR:COUN?\n") == b"32\n"
        entries = [client.query(b"SYST:ERR?\n") for _ in range(32)]
        assert entries[0].startswith(b"-113,")
        assert entries[-1] == b'-350,"Queue overflow"\n'
        client.close()


def test_tighter_limit_enforced_and_reset():
    with tcp_server(TinyChip()) as server:
        client = RawClient(server)
        client.send(b"CHIP:LIM:SET:AMPL:MAX 1.0\n")
        assert client.query(b"CHIP:LIM:SET:AMPL:MAX?\n") == b"1.0\n"
        assert client.query(b"CHIP:LIM?\n") == b"0.5,1.0,3.0,1000.0,100,1000000.0,25.0,0.2\n"

        reply = client.query(pulse_request(1, device=4, amplitude_v=1.2))
        assert reply == b"1,-222,0.0,1\n"
        assert b"SET amplitude 1.2 for device 4" in client.query(b"SYST:ERR?\n")

        client.send(b"*RST\n")
        assert client.query(b"CHIP:LIM:SET:AMPL:MAX?\n") == b"1.5\n"
        client.close()


def test_looser_limit_rejected():
    with tcp_server(TinyChip()) as server:
        client = RawClient(server)
        client.send(b"CHIP:LIM:WIDT:MAX 2000\n")
        error = client.query(b"SYST:ERR?\n")
        assert error.startswith(b"-222,")
        assert b"width_max_ns=2000.0 is outside" in error
        assert client.query(b"CHIP:LIM:WIDT:MAX?\n") == b"1000.0\n"
        client.close()


def test_repeated_batch_returns_stored_reply():
    chip = TinyChip()
    with tcp_server(chip) as server:
        client = RawClient(server)
        first = client.query(pulse_request(1, device=3, amplitude_v=1.0))
        again = client.query(pulse_request(1, device=3, amplitude_v=1.0))
        assert first == again
        assert first.startswith(b"1,0,")
        assert chip.pulses_applied == 1
        assert server.protocol.stats.replies_replayed == 1
        client.close()


def test_out_of_order_batch_rejected():
    chip = TinyChip()
    with tcp_server(chip) as server:
        client = RawClient(server)
        assert client.query(pulse_request(5, device=3, amplitude_v=1.0)) == b"5,201,0.0,1\n"
        assert b"received, expected 1" in client.query(b"SYST:ERR?\n")
        assert chip.pulses_applied == 0
        assert client.query(b"CHIP:SEQ?\n") == b"0,0\n"
        client.close()


def test_crc_mismatch_not_applied_nor_consumed():
    chip = TinyChip()
    with tcp_server(chip) as server:
        client = RawClient(server)
        assert client.query(pulse_request(1, device=3, amplitude_v=1.0, crc_offset=1)) == b"1,202,0.0,1\n"
        assert chip.pulses_applied == 0
        assert client.query(b"CHIP:SEQ?\n") == b"0,0\n"
        assert client.query(pulse_request(1, device=3, amplitude_v=1.0)).startswith(b"1,0,")
        assert chip.pulses_applied == 1
        client.close()


def test_read_format_codes_match_emulator_and_reset():
    geometry = Geometry(1, 8, 8)
    reference = EmulatedChip(seed=5, geometry=geometry)
    lsb_us = physics.adc_lsb_us(reference.params)
    with tcp_server(EmulatedChip(seed=5, geometry=geometry)) as server:
        client = RawClient(server)
        assert client.query(b"CHIP:READ:FORM?\n") == b"F64\n"
        client.send(b"CHIP:READ:FORM CODE\n")
        assert client.query(b"SYST:ERR?\n") == b'0,"No error"\n'
        assert client.query(b"CHIP:READ:FORM?\n") == b"CODE\n"
        assert client.query(b"CHIP:ADC?\n") == f"{reference.params.read_adc_bits},{lsb_us!r}\n".encode()

        reply = client.query(read_request(1, first_device=3, count=20))
        codes = np.frombuffer(reply_payload(reply), dtype=np.uint8)
        expected_us = reference.read(np.arange(3, 23))
        assert (codes * lsb_us).tobytes() == expected_us.tobytes()

        client.send(b"*RST\n")
        assert client.query(b"CHIP:READ:FORM?\n") == b"F64\n"
        reply = client.query(read_request(2, first_device=3, count=20))
        assert reply_payload(reply) == reference.read(np.arange(3, 23)).astype("<f8").tobytes()
        client.close()


def test_code_format_rejected_without_adc():
    with tcp_server(TinyChip()) as server:
        client = RawClient(server)
        client.send(b"CHIP:READ:FORM CODE\n")
        error = client.query(b"SYST:ERR?\n")
        assert error.startswith(b"-221,")
        assert b"only the F64 read format is available" in error
        client.send(b"CHIP:READ:FORM BIN\n")
        assert client.query(b"SYST:ERR?\n").startswith(b"-224,")
        assert client.query(b"CHIP:READ:FORM?\n") == b"F64\n"
        client.close()


def test_read_off_the_code_grid_reported_not_rounded():
    # TinyChip's reads carry unquantised noise, so no ADC code reproduces them exactly.
    chip = TinyChip()
    server = TcpInstrumentServer(InstrumentProtocol(chip, adc=AdcScale(8, 0.125)), deadline_s=60.0)
    with server:
        client = RawClient(server)
        client.send(b"CHIP:READ:FORM CODE\n")
        reply = client.query(read_request(1, first_device=0, count=4))
        assert reply.startswith(b"1,-300,")
        error = client.query(b"SYST:ERR?\n")
        assert b"cannot be sent as ADC codes" in error
        assert b"CHIP:READ:FORM F64" in error
        client.close()


def test_sync_echoes_nonce():
    with tcp_server(TinyChip()) as server:
        client = RawClient(server)
        assert client.query(b"SYST:SYNC? 123-4\n") == b"123-4\n"
        client.close()


def serve_command(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hwctl.cli_emulator", "serve", *arguments],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_pty_serves_and_saves_state(tmp_path):
    state = tmp_path / "chip.npz"
    process = serve_command("--pty", "--seed", "3", "--geometry", "1x8x8", "--state", str(state), "--deadline-s", "60")
    try:
        path = process.stdout.readline().strip()
        assert path.startswith("/dev/pts/")
        driver = ChipController(SerialTransport(path, timeout_s=5.0), retry=FAST_RETRY)
        assert driver.identity().serial.startswith("seed3-")
        assert driver.geometry().devices == 64
        values = driver.read(np.arange(4))
        assert values.shape == (4,)
        driver.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    assert process.returncode == 0
    assert state.exists()


def test_cli_rejects_remote_address():
    process = serve_command("--tcp", "192.0.2.10:5025", "--geometry", "1x8x8")
    _, error = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "--allow-remote" in error


def test_cli_needs_one_endpoint():
    process = serve_command("--geometry", "1x8x8")
    _, error = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "exactly one of --tcp HOST:PORT or --pty" in error


def test_cli_tcp_first_line_is_resource(tmp_path):
    process = serve_command("--tcp", "127.0.0.1:0", "--geometry", "1x8x8", "--deadline-s", "60")
    try:
        resource = process.stdout.readline().strip()
        assert resource.startswith("TCPIP0::127.0.0.1::")
        assert resource.endswith("::SOCKET")
    finally:
        os.kill(process.pid, signal.SIGINT)
        process.wait(20)
    assert process.returncode == 0
