"""The bench SMU driver against pyvisa-sim instruments defined here.

pyvisa-sim replays a fixed table, so these tests check what the driver sends and how it reads
replies, not an instrument's behaviour. The simulated SMU remembers the settings the driver
writes, rejects values outside its range into an error queue, and returns a fixed current.
"""

from __future__ import annotations

import pytest
import pyvisa

from drivers.errors import InstrumentError
from drivers.smu import SourceMeter
from hwctl.backend import LimitError

# A B2900-like SMU; the last device reports a different compliance than the one it was given.
SIMULATED_SMUS = """
spec: "1.1"
devices:
  smu:
    eom:
      USB INSTR:
        q: "\\n"
        r: "\\n"
    error:
      error_queue:
        - q: ":SYST:ERR?"
          default: '+0,"No error"'
          command_error: '-222,"Data out of range"'
    dialogues:
      - q: "*IDN?"
        r: "Keysight Technologies,B2901A,SIM0001,1.0"
      - q: "*RST"
      - q: "*CLS"
      - q: ":SOUR:FUNC:MODE VOLT"
      - q: ":FORM:ELEM:SENS CURR"
      - q: ":MEAS:CURR?"
        r: "+5.000000E-06"
    properties:
      voltage:
        default: 0.0
        getter:
          q: ":SOUR:VOLT?"
          r: "{:+.6E}"
        setter:
          q: ":SOUR:VOLT {:g}"
        specs:
          min: -21
          max: 21
          type: float
      compliance:
        default: 1.0E-4
        getter:
          q: ":SENS:CURR:PROT?"
          r: "{:+.6E}"
        setter:
          q: ":SENS:CURR:PROT {:g}"
        specs:
          min: 1.0E-9
          max: 1.5
          type: float
      output:
        default: "OFF"
        getter:
          q: ":OUTP?"
          r: "{:s}"
        setter:
          q: ":OUTP {:s}"
        specs:
          valid: ["ON", "OFF"]
          type: str
      tripped:
        default: 0
        getter:
          q: ":SENS:CURR:PROT:TRIP?"
          r: "{:d}"
        setter:
          q: "SIM:TRIP {:d}"
        specs:
          valid: [0, 1]
          type: int
  stubborn smu:
    eom:
      USB INSTR:
        q: "\\n"
        r: "\\n"
    error:
      error_queue:
        - q: ":SYST:ERR?"
          default: '+0,"No error"'
    dialogues:
      - q: ":SOUR:FUNC:MODE VOLT"
      - q: ":FORM:ELEM:SENS CURR"
      - q: ":SENS:CURR:PROT?"
        r: "+1.000000E-04"
    properties:
      voltage:
        default: 0.0
        getter:
          q: ":SOUR:VOLT?"
          r: "{:+.6E}"
        setter:
          q: ":SOUR:VOLT {:g}"
        specs:
          type: float
      ignored_compliance:
        default: 0.0
        getter:
          q: "SIM:COMP?"
          r: "{:g}"
        setter:
          q: ":SENS:CURR:PROT {:g}"
        specs:
          type: float
resources:
  USB0::0x0957::0x8B18::SIM0001::INSTR:
    device: smu
  USB0::0x0957::0x8B18::SIM0002::INSTR:
    device: stubborn smu
"""


@pytest.fixture
def manager(tmp_path):
    definition = tmp_path / "smu.yaml"
    definition.write_text(SIMULATED_SMUS)
    manager = pyvisa.ResourceManager(f"{definition}@sim")
    yield manager
    manager.close()


def open_smu(manager, serial: str = "SIM0001") -> SourceMeter:
    return SourceMeter.open(
        f"USB0::0x0957::0x8B18::{serial}::INSTR",
        max_voltage_v=0.5,
        max_compliance_a=1e-3,
        resource_manager=manager,
    )


def test_identity(manager):
    assert open_smu(manager).identity() == "Keysight Technologies,B2901A,SIM0001,1.0"


def test_configure_reads_back_settings(manager):
    smu = open_smu(manager)
    smu.configure(0.2, 1e-4)
    assert smu.source_voltage_v() == 0.2
    assert smu.compliance_a() == 1e-4


def test_read_conductance_from_current(manager):
    smu = open_smu(manager)
    # 5 µA at 0.2 V is 25 µS.
    assert smu.read_conductance_us(0.2, 1e-4) == pytest.approx(25.0, rel=1e-12)
    assert smu.resource.query(":OUTP?").strip() == "OFF", "output is switched off after a read"


def test_compliance_trip_is_error(manager):
    smu = open_smu(manager)
    smu.resource.write("SIM:TRIP 1")
    with pytest.raises(InstrumentError, match="reached the compliance 0.0001 A"):
        smu.read_conductance_us(0.2, 1e-4)


@pytest.mark.parametrize(
    "voltage_v, compliance_a, message",
    [(0.6, 1e-4, "source voltage 0.6 V is outside ±0.5 V"), (0.2, 2e-3, "compliance 0.002 A is outside")],
)
def test_setting_outside_limits_rejected(manager, voltage_v, compliance_a, message):
    smu = open_smu(manager)
    with pytest.raises(LimitError, match=message):
        smu.configure(voltage_v, compliance_a)
    assert smu.source_voltage_v() == 0.0, "nothing was sent"


def test_compliance_readback_mismatch(manager):
    smu = open_smu(manager, "SIM0002")
    with pytest.raises(LimitError, match="compliance set to 5e-05 A but the SMU reports 0.0001 A"):
        smu.configure(0.2, 5e-5)


def test_instrument_error_queue_reported(manager):
    smu = open_smu(manager)
    smu.resource.write(":SOUR:VOLT 5.000000E+01")  # outside the simulated range
    with pytest.raises(InstrumentError, match="-222 Data out of range"):
        smu.check_errors()
