"""A bench source-measure unit for single-device reads during characterization.

`SourceMeter` drives the SCPI subset that Keysight B2900-series and Keithley 2400-series
instruments share: source a DC voltage with a current compliance, measure the current, and
report whether the compliance tripped. A setting outside the limits given to the constructor is
rejected before anything is sent. A valid setting is written and read back, and a difference
raises `LimitError`.
"""

from __future__ import annotations

import logging
import math

import pyvisa

from drivers.errors import InstrumentError
from hwctl.backend import LimitError

logger = logging.getLogger(__name__)

#: Commands that differ between the supported families; the rest are common to both.
#: ``:FORM:ELEM`` makes ``:MEAS:CURR?`` return the current alone instead of several readings.
DIALECTS: dict[str, dict[str, str]] = {
    "b2900": {"current_only": ":FORM:ELEM:SENS CURR"},
    "keithley2400": {"current_only": ":FORM:ELEM CURR"},
}

#: Relative tolerance when comparing a setting with its read-back (the instrument's rounding).
READBACK_RELATIVE_TOLERANCE = 1e-6

#: Maximum number of entries popped from the instrument's error queue in one check.
ERROR_QUEUE_MAX = 32


class SourceMeter:
    """A voltage-sourcing, current-measuring SMU on a pyvisa message-based resource.

    ``max_voltage_v`` and ``max_compliance_a`` bound every setting: a read of a PCM device
    at 0.2 V needs no more, and a mistaken 2 V would disturb its state.
    """

    def __init__(
        self,
        resource: pyvisa.resources.MessageBasedResource,
        *,
        max_voltage_v: float,
        max_compliance_a: float,
        dialect: str = "b2900",
    ) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown SMU dialect {dialect!r}; use one of {', '.join(DIALECTS)}")
        for name, value in (("max_voltage_v", max_voltage_v), ("max_compliance_a", max_compliance_a)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self._resource = resource
        self._resource.read_termination = "\n"
        self._resource.write_termination = "\n"
        self.max_voltage_v = float(max_voltage_v)
        self.max_compliance_a = float(max_compliance_a)
        self._commands = DIALECTS[dialect]

    @classmethod
    def open(
        cls,
        resource_name: str,
        *,
        max_voltage_v: float,
        max_compliance_a: float,
        dialect: str = "b2900",
        timeout_s: float = 5.0,
        resource_manager: pyvisa.ResourceManager | None = None,
    ) -> SourceMeter:
        """Open ``resource_name`` (pyvisa-py unless a resource manager is given)."""
        manager = resource_manager or pyvisa.ResourceManager("@py")
        resource = manager.open_resource(resource_name)
        resource.timeout = int(timeout_s * 1000)
        return cls(resource, max_voltage_v=max_voltage_v, max_compliance_a=max_compliance_a, dialect=dialect)

    @property
    def resource(self) -> pyvisa.resources.MessageBasedResource:
        """The pyvisa resource, for commands this driver does not wrap."""
        return self._resource

    def identity(self) -> str:
        return self._resource.query("*IDN?").strip()

    def reset(self) -> None:
        """Reset the instrument (output off) and clear its error queue."""
        self._resource.write("*RST")
        self._resource.write("*CLS")
        self.check_errors()

    def configure(self, voltage_v: float, compliance_a: float) -> None:
        """Set up a DC voltage source with a current compliance, and verify both by read-back."""
        if not (math.isfinite(voltage_v) and abs(voltage_v) <= self.max_voltage_v):
            raise LimitError(
                f"source voltage {voltage_v!r} V is outside ±{self.max_voltage_v} V; nothing was sent"
            )
        if not (math.isfinite(compliance_a) and 0 < compliance_a <= self.max_compliance_a):
            raise LimitError(
                f"current compliance {compliance_a!r} A is outside (0, {self.max_compliance_a}] A; "
                "nothing was sent"
            )

        self._resource.write(":SOUR:FUNC:MODE VOLT")
        self._resource.write(f":SOUR:VOLT {voltage_v:.6E}")
        self._resource.write(f":SENS:CURR:PROT {compliance_a:.6E}")
        self._resource.write(self._commands["current_only"])
        self.check_errors()

        self._verify("source voltage", "V", voltage_v, self.source_voltage_v())
        self._verify("current compliance", "A", compliance_a, self.compliance_a())

    def source_voltage_v(self) -> float:
        return float(self._resource.query(":SOUR:VOLT?"))

    def compliance_a(self) -> float:
        """Return the current compliance as the instrument reports it, in A."""
        return float(self._resource.query(":SENS:CURR:PROT?"))

    def set_output(self, enabled: bool) -> None:
        self._resource.write(f":OUTP {'ON' if enabled else 'OFF'}")
        self.check_errors()

    def measure_current_a(self) -> float:
        """Measure the current once, in A."""
        reply = self._resource.query(":MEAS:CURR?").strip()
        if "," in reply:
            raise InstrumentError(
                0, f":MEAS:CURR? returned several readings {reply!r}; the format setting was lost"
            )
        return float(reply)

    def in_compliance(self) -> bool:
        """Return whether the last measurement hit the current compliance."""
        return self._resource.query(":SENS:CURR:PROT:TRIP?").strip() not in ("0", "+0")

    def read_conductance_us(self, read_voltage_v: float, compliance_a: float) -> float:
        """Measure one device's conductance, in µS, at ``read_voltage_v``; output off afterwards.

        Raises `InstrumentError` if the current hit the compliance, because the reading then
        reflects the compliance and not the device.
        """
        if read_voltage_v == 0:
            raise ValueError("read_voltage_v must be non-zero to compute a conductance")
        self.configure(read_voltage_v, compliance_a)
        self.set_output(True)
        try:
            current_a = self.measure_current_a()
            clipped = self.in_compliance()
        finally:
            self.set_output(False)
        if clipped:
            raise InstrumentError(
                0,
                f"current {current_a!r} A reached the compliance {compliance_a!r} A at "
                f"{read_voltage_v} V; raise the compliance (up to {self.max_compliance_a} A) "
                "or lower the read voltage",
            )
        return current_a / read_voltage_v * 1e6

    def check_errors(self) -> None:
        """Raise `InstrumentError` with every entry of the instrument's error queue, if any."""
        entries = []
        for _ in range(ERROR_QUEUE_MAX):
            entry = self._resource.query(":SYST:ERR?").strip()
            code_text, _, message = entry.partition(",")
            if int(code_text) == 0:
                break
            entries.append((int(code_text), message.strip().strip('"')))
        if entries:
            raise InstrumentError(
                entries[0][0], "SMU reported " + "; ".join(f"{code} {text}" for code, text in entries)
            )

    def close(self) -> None:
        """Turn the output off and close this instrument's own session."""
        try:
            self.set_output(False)
        finally:
            self._resource.close()

    def _verify(self, what: str, unit: str, requested: float, reported: float) -> None:
        if not math.isclose(requested, reported, rel_tol=READBACK_RELATIVE_TOLERANCE, abs_tol=1e-15):
            raise LimitError(
                f"{what} set to {requested!r} {unit} but the SMU reports {reported!r} {unit}; "
                "check the instrument's range and limits"
            )
