"""Fault injection for the instrument server, for testing the drivers' recovery.

A fault fires once, on the Nth sequenced request (pulse, read or wait batch) the server
receives, counting from 1 over the server's lifetime and counting retried requests too. The
text form, used by ``hwctl emulator serve --fault``, is ``KIND@N`` or ``KIND@N:VALUE``:

- ``delay@N:S``: wait S seconds before sending the reply (the batch is applied);
- ``drop@N``: close the connection without applying the batch (on a pseudo-terminal, stay silent);
- ``drop-after@N``: apply the batch, then close the connection without replying;
- ``garbage@N``: apply the batch, then send random bytes instead of the reply;
- ``error@N`` or ``error@N:CODE``: apply the batch and push an error-queue entry (code 301 unless
  given) that the reply's error count announces.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from drivers.command_set import ErrorCode


class FaultKind(enum.Enum):
    DELAY = "delay"
    DROP = "drop"
    DROP_AFTER = "drop-after"
    GARBAGE = "garbage"
    ERROR = "error"


@dataclass(frozen=True)
class Fault:
    """One injected fault on sequenced request number ``batch`` (1-based)."""

    kind: FaultKind
    batch: int
    delay_s: float = 0.0
    error_code: int = int(ErrorCode.INJECTED_FAULT)

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"fault batch number must be >= 1, got {self.batch}")
        if self.kind is FaultKind.DELAY and not self.delay_s > 0:
            raise ValueError(f"delay fault needs a positive delay in seconds, got {self.delay_s}")

    @classmethod
    def parse(cls, text: str) -> Fault:
        """Parse ``KIND@N[:VALUE]`` (see the module docstring)."""
        kind_text, at, rest = text.strip().partition("@")
        try:
            kind = FaultKind(kind_text.lower())
        except ValueError:
            raise ValueError(
                f"unknown fault kind {kind_text!r} in {text!r}; use one of "
                f"{', '.join(k.value for k in FaultKind)}"
            ) from None
        number_text, _, value_text = rest.partition(":")
        if not at or not number_text.isdigit():
            raise ValueError(f"fault {text!r} needs a batch number, e.g. {kind.value}@3")
        batch = int(number_text)
        if kind is FaultKind.DELAY:
            if not value_text:
                raise ValueError(f"delay fault {text!r} needs seconds, e.g. delay@{batch}:2.5")
            return cls(kind, batch, delay_s=float(value_text))
        if kind is FaultKind.ERROR and value_text:
            return cls(kind, batch, error_code=int(value_text))
        if value_text:
            raise ValueError(f"fault {text!r}: {kind.value} takes no value")
        return cls(kind, batch)


class FaultPlan:
    """The faults to inject, looked up by sequenced request number."""

    def __init__(self, faults: Iterable[Fault] = (), seed: int = 0) -> None:
        self.faults = tuple(faults)
        self.seed = seed

    @classmethod
    def parse(cls, specs: Iterable[str], seed: int = 0) -> FaultPlan:
        return cls([Fault.parse(spec) for spec in specs], seed)

    def for_batch(self, batch: int) -> list[Fault]:
        return [fault for fault in self.faults if fault.batch == batch]

    def garbage(self, batch: int, length: int = 96) -> bytes:
        """Return reproducible random bytes ending in a line feed, with no other line feed."""
        noise = np.random.default_rng([self.seed, batch]).integers(0, 256, length, dtype=np.uint8)
        noise[noise == 0x0A] = 0x0B
        return noise.tobytes() + b"\n"

    def __bool__(self) -> bool:
        return bool(self.faults)
