"""A one-line status while a study trains, whenever nothing was printed for a while (in logs as on terminals).

Trials print a line only when they end, and a cohort's epochs can take minutes: without this a log
stays silent that long, and a reader cannot tell a slow study from a hung one.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from cnnexp.tuning import counts

INTERVAL_S = 10.0  # the longest silence in a study's output


class _Stamped:
    """The stream it wraps, noting when anything was last written (by any thread of this process)."""

    def __init__(self, stream):
        self.stream, self.last = stream, time.monotonic()

    def write(self, text: str) -> int:
        self.last = time.monotonic()
        return self.stream.write(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, ...: the stream's own
        return getattr(self.stream, name)


class StatusLine:
    """Prints describe() when stdout has been silent for `interval` seconds, from a daemon thread, while
    the `with` block runs. describe() reads the study; a failure there (a storage hiccup) skips one line.

    Lines of spawned worker processes reach the terminal without passing here, so with several workers a
    status line may follow one of theirs closely; it never leaves the log silent longer than `interval`.
    """

    def __init__(self, describe: Callable[[], str], interval: float = INTERVAL_S):
        self.describe, self.interval = describe, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="status-line", daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(max(self.out.last + self.interval - time.monotonic(), 0.0)):
            if time.monotonic() - self.out.last < self.interval:
                continue  # something was printed meanwhile
            try:
                line = self.describe()
            except Exception:  # noqa: BLE001 - a status line is never worth stopping the study for
                self.out.last = time.monotonic()
                continue
            print(line, file=self.out, flush=True)

    def __enter__(self) -> StatusLine:
        self.original, self.out = sys.stdout, _Stamped(sys.stdout)
        sys.stdout = self.out
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        sys.stdout = self.original


def of_study(study, planned: int | None, epochs: int) -> StatusLine:
    """The status line of a study's call: trials done since it started (of `planned`, where the call has a
    budget), running and at which epoch, the best so far, seconds since it started."""
    done_before, started = counts.done_count(counts.state_counts(study)), time.monotonic()
    return StatusLine(lambda: counts.status_text(study, done_before, planned, epochs, time.monotonic() - started),
                      interval=INTERVAL_S)
