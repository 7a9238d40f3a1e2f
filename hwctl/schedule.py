"""Read schedules: durations such as ``"25s"``, ``"1.5h"`` or ``"1d"``, and lists of them.

A schedule lists the times, in seconds after programming, at which every device is read back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# Seconds per unit. Minutes are "min", because "m" reads as metres or months.
UNIT_SECONDS: dict[str, float] = {
    "ms": 1e-3,
    "s": 1.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}

# Units that format_duration uses, largest first; weeks are left out because "7d" reads better.
_FORMAT_UNITS = ("d", "h", "min", "s", "ms")

_DURATION_PATTERN = re.compile(
    r"""^\s*
    (?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    \s*
    (?P<unit>[A-Za-z]*)
    \s*$""",
    re.VERBOSE,
)


class ScheduleError(ValueError):
    """A duration or a schedule that cannot be parsed or is out of range."""


def _accepted_units() -> str:
    return ", ".join(UNIT_SECONDS)


def parse_duration_s(value: str | int | float) -> float:
    """Parse a duration such as ``"25s"``, ``"10min"``, ``"250ms"`` or ``3600`` into seconds.

    A bare number, or a string without a unit, is in seconds. Units: ms, s, min, h, d, w
    (case-insensitive). The result is finite and not negative; `ScheduleError` otherwise.
    """
    if isinstance(value, bool):
        raise ScheduleError(
            f"invalid duration {value!r}: expected a number of seconds or text such as '25s'"
        )

    if isinstance(value, (int, float)):
        seconds = float(value)
        text = repr(value)
    elif isinstance(value, str):
        text = repr(value)
        match = _DURATION_PATTERN.match(value)
        if match is None:
            raise ScheduleError(
                f"invalid duration {value!r}: expected a number followed by a unit, "
                f"such as '25s', '1.5h' or '250ms' (units: {_accepted_units()})"
            )
        unit = match["unit"].lower() or "s"
        if unit not in UNIT_SECONDS:
            raise ScheduleError(
                f"invalid duration {value!r}: unknown unit {match['unit']!r}; "
                f"accepted units: {_accepted_units()}"
            )
        seconds = float(match["number"]) * UNIT_SECONDS[unit]
    else:
        raise ScheduleError(
            f"invalid duration {value!r} of type {type(value).__name__}: "
            "expected a number of seconds or text such as '25s'"
        )

    if not math.isfinite(seconds):
        raise ScheduleError(f"invalid duration {text}: it must be finite")
    if seconds < 0:
        raise ScheduleError(f"invalid duration {text}: it must not be negative")
    return seconds


def parse_schedule(value: str | Sequence[str | int | float]) -> list[float]:
    """Parse read times after programming into seconds, sorted in increasing order.

    ``value`` is comma-separated text (``"25s,1h,1d"``) or a sequence of durations. Every time
    must be positive, and two entries that name the same time (``"60s,1min"``) are rejected.
    """
    if isinstance(value, str) and not value.strip():
        raise ScheduleError(
            "invalid schedule '': it is empty; expected durations such as '25s,1h,1d'"
        )
    if isinstance(value, str):
        items: list[str | int | float] = [item.strip() for item in value.split(",")]
        if any(item == "" for item in items):
            raise ScheduleError(
                f"invalid schedule {value!r}: it has an empty entry; "
                "expected comma-separated durations such as '25s,1h,1d'"
            )
    else:
        items = list(value)
    if not items:
        raise ScheduleError(
            "invalid schedule: it is empty; expected at least one read time such as '25s'"
        )

    times_s = []
    for item in items:
        seconds = parse_duration_s(item)
        if seconds <= 0:
            raise ScheduleError(
                f"invalid read time {item!r} in the schedule: it must be after programming (> 0 s)"
            )
        times_s.append(seconds)

    # Entries such as "0.1h" and "360s" may differ in the last bit, so compare with a tolerance.
    ordered = sorted(zip(times_s, items, strict=True), key=lambda pair: pair[0])
    for (earlier_s, earlier), (later_s, later) in zip(ordered, ordered[1:], strict=False):
        if math.isclose(earlier_s, later_s, rel_tol=1e-9):
            raise ScheduleError(
                f"invalid schedule: {earlier!r} and {later!r} are the same time "
                f"({format_duration(later_s)}); list each read time once"
            )
    return [seconds for seconds, _ in ordered]


def format_duration(seconds: float) -> str:
    """Format seconds in the largest unit that keeps the number at least 1: ``3600 -> "1h"``.

    The number keeps at most four significant digits, so 3601 s formats as ``"1h"``; use the
    seconds themselves where exact values matter. Durations below 1 ms are given in ms.
    """
    seconds = float(seconds)
    if not math.isfinite(seconds):
        raise ValueError(f"cannot format the duration {seconds!r} s: it must be finite")
    if seconds == 0:
        return "0s"

    sign = "-" if seconds < 0 else ""
    magnitude = abs(seconds)
    for unit in _FORMAT_UNITS:
        if magnitude >= UNIT_SECONDS[unit]:
            break
    value = magnitude / UNIT_SECONDS[unit]
    # Four significant digits, without switching to exponent notation for thousands of days.
    number = f"{value:.0f}" if value >= 1000 else f"{value:.4g}"
    return f"{sign}{number}{unit}"
