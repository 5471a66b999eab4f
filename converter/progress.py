"""Progress of long steps on stderr: a tqdm bar on a terminal, plain lines in a log, nothing with ``-q``."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

# Seconds between two plain progress lines: often enough to show life in a log, rarely enough to read it.
PROGRESS_INTERVAL_S = 10.0


class LineProgress:
    """tqdm's interface as plain lines, for a stderr that is not a terminal (a log file, a CI pipe): there
    ``\\r`` bars turn into one unreadable line. Writes ``[slimformer] DESC: N/TOTAL UNIT (P%), Ts`` at most
    every :data:`PROGRESS_INTERVAL_S` seconds, and a last line at the end if it wrote any, so a step
    shorter than the interval stays silent and a long one is never silent for longer than it."""

    def __init__(self, total: int, desc: str, unit: str, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.postfix, self.lines, self.written = 0, "", 0, -1
        self.started = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.interval:
            self._write()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def _write(self) -> None:
        self.last = time.perf_counter()
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(
            f"[slimformer] {self.desc}: {self.n}/{self.total} {self.unit}{share}, "
            f"{self.last - self.started:.0f}s{extra}",
            file=sys.stderr,
            flush=True,
        )
        self.lines, self.written = self.lines + 1, self.n

    def close(self) -> None:
        if self.lines and self.n != self.written:  # the last state, unless the last line already showed it
            self._write()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _NoProgress(LineProgress):
    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, *, unit: str = "batch") -> Any:
    """Progress of a long step on stderr: a tqdm bar on a terminal, :class:`LineProgress` lines otherwise,
    nothing when ``enabled`` is false (``-q``). Supports ``update``, ``set_postfix_str``, ``close`` and
    ``with``."""
    if not enabled:
        return _NoProgress(total, desc, unit)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
    return LineProgress(total, desc, unit)
