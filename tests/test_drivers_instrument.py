"""Opening the instrument backend from backend settings (hwctl.instrument.open_instrument)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from wire_fixtures import TinyChip, pty_server, tcp_server

from hwctl.backend import LimitError
from hwctl.instrument import open_instrument


def settings(**values) -> SimpleNamespace:
    defaults = {"kind": "visa", "resource": None, "port": None, "baud_rate": 115200, "timeout_s": 5.0}
    return SimpleNamespace(**{**defaults, **values})


def test_visa_resource_opens_controller():
    with tcp_server(TinyChip()) as server:
        backend = open_instrument(settings(resource=server.resource_name))
        assert backend.identity().model == "TinyChip"
        assert backend.read(np.arange(3)).shape == (3,)
        backend.close()


def test_serial_port_opens_controller():
    with pty_server(TinyChip()) as server:
        backend = open_instrument(settings(kind="serial", port=server.path))
        assert backend.geometry().devices == 128
        backend.close()


def test_configured_limit_mismatch_stops():
    with tcp_server(TinyChip()) as server:
        with pytest.raises(LimitError, match="width_max_ns: configuration expects 500.0, controller reports 1000.0"):
            open_instrument(settings(resource=server.resource_name), expected_limits={"width_max_ns": 500.0})
        assert server.protocol.stats.batches_received == 0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"kind": "visa"}, "needs a VISA resource string"),
        ({"kind": "serial"}, "needs a serial port path"),
        ({"kind": "emulator"}, "needs backend kind 'visa' or 'serial'"),
    ],
)
def test_missing_address_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        open_instrument(settings(**values))
