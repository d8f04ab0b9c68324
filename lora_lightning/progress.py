"""Progress that reads well in a terminal and in a log file.

In a terminal a tqdm bar redraws itself in place. Written to a file (a redirected `fit` log, CI),
the same bar becomes one line of thousands of characters, so there we print a plain line instead
each time another `every_percent` of the work is done or `every_seconds` have passed.

`progress_bar` also prints a first line as a phase starts (`desc: 0/200 (0%) 0s`), as tqdm
draws its bar at once in a terminal: a phase whose first tenth takes minutes (a full MMLU) would
otherwise say nothing until then, and a log would not say what the process is waiting for.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["LineProgress", "progress_bar"]


class LineProgress:
    """A tqdm-like counter that prints whole lines: `desc: 40/200 (20%) 12s, ~48s left`.

    `announce`: print the first line at once (0 done), not only after the first share of work.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        initial: int = 0,
        every_percent: float = 10.0,
        every_seconds: float = 30.0,
        file: TextIO | None = None,
        announce: bool = False,
    ) -> None:
        self.total, self.desc, self.n = total, desc, initial
        self.every_percent, self.every_seconds = every_percent, every_seconds
        self.file = file if file is not None else sys.stderr
        self.postfix = ""
        self._start = self._last_time = time.monotonic()
        self._initial = self._last_n = initial  # a resumed job: the ETA counts this run's rate
        self._closed = False
        if announce:  # the phase's first line, before any of its work is done
            self._print(self._start)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        done_share = 100.0 * (self.n - self._last_n) / self.total if self.total else 0.0
        if done_share >= self.every_percent or now - self._last_time >= self.every_seconds:
            self._print(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _print(self, now: float) -> None:
        elapsed = now - self._start
        line = f"{self.desc}: {self.n}"
        if self.total:
            line += f"/{self.total} ({100.0 * self.n / self.total:.0f}%)"
        line += f" {elapsed:.0f}s"
        done = self.n - self._initial
        if self.total and done > 0 and self.n < self.total:
            line += f", ~{elapsed / done * (self.total - self.n):.0f}s left"
        if self.postfix:
            line += f" [{self.postfix}]"
        print(line, file=self.file, flush=True)
        self._last_time, self._last_n = now, self.n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._last_n:
                self._print(time.monotonic())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Silent:
    """What a disabled progress bar is: every call does nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(
    total: int | None, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it"
) -> Any:
    """A progress counter with `update(n)`, `set_postfix(**kw)` and `close()` (also a context
    manager): tqdm when stderr is a terminal, `LineProgress` otherwise, nothing when disabled."""
    if not enabled:
        return _Silent()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, initial=initial, unit=unit)
    return LineProgress(total, desc, initial=initial, announce=True)
