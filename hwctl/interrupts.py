"""Stop a long run at a safe point on the first Ctrl-C, and at once on the second.

While `StopRequest` is active, the first SIGINT or SIGTERM only sets `requested`. The run
checks it after each program batch, read and evaluation, when the run file is flushed, and
stops there with a file that resumes cleanly. A second signal raises `KeyboardInterrupt` at
once, wherever the run is; the file is then consistent up to its last flush. Both are logged.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """The run stopped at a safe point because a stop was requested."""


class StopRequest:
    """Context manager that defers SIGINT and SIGTERM to the run's safe points.

    Outside the main thread, where Python cannot install signal handlers, it installs none
    and `requested` only changes through `request`.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in HANDLED_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def request(self, reason: str) -> None:
        """Ask the run to stop at its next safe point."""
        self.requested = True
        self.signal_name = reason

    def check(self, where: str) -> None:
        """Raise `RunInterrupted` if a stop was requested; ``where`` names the safe point."""
        if self.requested:
            raise RunInterrupted(f"stopped on {self.signal_name} {where}")

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.requested:
            log.warning("second %s: stopping at once; the run file is consistent up to its last flush", name)
            raise KeyboardInterrupt(f"second {name}")
        self.request(name)
        log.warning(
            "%s: finishing the current step, then stopping with a resumable run file; "
            "send it again to stop at once",
            name,
        )
