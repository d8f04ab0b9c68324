"""The sweep's progress line: cells done of the total, failures, and an ETA."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["SweepProgress", "duration"]


def duration(seconds: float) -> str:
    """`1h02m`, `4m10s`, `12s`."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class SweepProgress:
    """Prints one line per finished cell: `sweep: 7/20 cells done, 1 failed; n=10__mix=+0:
    done in 3m02s; 21m elapsed, about 40m left`.

    The ETA is the mean time of the cells run by this process times the cells left, divided by
    the cells that run at once; cells found finished count as done but not in the mean.
    """

    def __init__(self, total: int, done: int, parallel: int, file: TextIO | None = None) -> None:
        self.total, self.done, self.failed, self.parallel = total, done, 0, max(1, parallel)
        self.file = file if file is not None else sys.stdout
        self.seconds: list[float] = []
        self._start = time.monotonic()
        self._lock = threading.Lock()

    def eta(self) -> float | None:
        left = self.total - self.done - self.failed
        if not self.seconds or left <= 0:
            return None if left > 0 else 0.0
        return sum(self.seconds) / len(self.seconds) * left / min(self.parallel, left)

    def line(self, note: str = "") -> str:
        line = f"sweep: {self.done}/{self.total} cells done"
        if self.failed:
            line += f", {self.failed} failed"
        if note:
            line += f"; {note}"
        line += f"; {duration(time.monotonic() - self._start)} elapsed"
        eta = self.eta()
        if eta is not None and self.done + self.failed < self.total:
            line += f", about {duration(eta)} left"
        return line

    def show(self, note: str = "") -> None:
        print(self.line(note), file=self.file, flush=True)

    def finished(self, name: str, status: dict[str, Any], seconds: float) -> None:
        """Count a cell that this process ran (or found done) and print the progress line."""
        with self._lock:
            state = status.get("state", "?")
            if state == "done":
                self.done += 1
                if not status.get("skipped"):  # finished by another process meanwhile
                    self.seconds.append(seconds)
            elif state == "failed":
                self.failed += 1
                self.seconds.append(seconds)
            note = f"{name}: {state} in {duration(seconds)}"
            if state == "failed":
                note += f" ({status.get('error')})"
            self.show(note)
