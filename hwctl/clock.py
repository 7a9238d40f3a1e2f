"""Waiting for a time on the chip clock, virtual or real.

On a virtual clock (the emulator by default) a wait is one `Backend.wait_s` call and costs no
wall time. On a real clock the host sleeps in short steps and rereads the chip clock after
each, so a stop request ends the wait within a step and a controller is never asked to block
for hours inside one command.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from hwctl.backend import Backend

log = logging.getLogger(__name__)

# Host sleep between rereads of a real chip clock, s.
POLL_S = 1.0
# Extra polls allowed for a chip clock that runs slower than the host clock.
SLOW_CLOCK_POLLS = 100


class ClockError(RuntimeError):
    """The chip clock does not advance as a real clock should."""


def clock_is_virtual(backend: Backend) -> bool:
    """Return True if only the backend's own operations move its clock.

    The emulated chip and the controller driver have a ``clock_is_virtual`` attribute. A
    backend without it is taken to have a real clock.
    """
    return bool(getattr(backend, "clock_is_virtual", False))


def wait_until(
    backend: Backend,
    target_s: float,
    should_stop: Callable[[], bool] = lambda: False,
    on_poll: Callable[[], None] = lambda: None,
    poll_s: float = POLL_S,
) -> bool:
    """Wait until the chip clock reaches ``target_s``; return False if stopped before.

    ``should_stop`` is checked before every host sleep on a real clock, and ``on_poll`` is
    called after each (to show the run is alive). Raises `ClockError` if a real clock falls
    far behind the host's.
    """
    remaining_s = target_s - backend.clock_s()
    if remaining_s <= 0:
        return True
    if clock_is_virtual(backend):
        backend.wait_s(remaining_s)
        return True

    polls = math.ceil(remaining_s / poll_s) + SLOW_CLOCK_POLLS
    started_s = time.monotonic()
    for _ in range(polls):
        if should_stop():
            return False
        time.sleep(min(poll_s, remaining_s))
        on_poll()
        remaining_s = target_s - backend.clock_s()
        if remaining_s <= 0:
            return True
    raise ClockError(
        f"the chip clock is still {remaining_s:.1f} s short of {target_s:.1f} s after "
        f"{time.monotonic() - started_s:.0f} s of host time; check the controller's clock"
    )
